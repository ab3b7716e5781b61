"""
`run_evaluation`: read a benchmark, answer every item (resumably), score, write the results.

Output folder (an af2 `runstore.RunFolder`: af2 writes only into a folder it created, one run at a time):
- `run.json`: the run's record: task, data (file digest, items digest, release), each audio file's size and mtime,
  model (weights fingerprint, dtype), prompt template and prompts digest, engine, generation settings, package
  versions. A later run into the folder must match it, or it stops naming each difference (a resumed run never mixes
  models, data or settings).
- `run.lock`: held while a run is on; a second run into the folder is refused, naming the running one.
- `predictions.jsonl`: one line per item: the reader's fields, `prompt` (the question sent, before AF2's
  lower-casing) and `prediction`. A killed run resumes from what its engine kept (see `engines`).
- `results.json` and `results.md`: the scores, the per-group tables and the metrics skipped with their reason.
- MMAU: `mmau-submission.json`, the benchmark file with each item's `model_prediction` (the official format).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

from ..runstore import RunFolder, file_sha256, file_stamp, model_fingerprint, strict_versions
from .engines import GENERATIONS, PREDICTIONS, LoopEngine
from .readers import mmau_release
from .scoring import mmau_submission, score_items
from .tasks import EvalTask, get_task

__all__ = ["PREDICTIONS", "run_evaluation"]

RESULTS, RESULTS_MD, MMAU_SUBMISSION = "results.json", "results.md", "mmau-submission.json"
# Everything af2 eval writes in its folder (removed by --overwrite; nothing else in the folder is touched).
FOLDER_FILES = [
    PREDICTIONS,
    f"{PREDICTIONS}.tmp",
    GENERATIONS,
    f"{GENERATIONS}.meta.json",
    f"{GENERATIONS}.errors.jsonl",
    f"{GENERATIONS}.parts",
    RESULTS,
    RESULTS_MD,
    MMAU_SUBMISSION,
]


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _data_record(task: EvalTask, data: Path, items: list[dict]) -> dict:
    """The data a run's predictions depend on: the file's digest (a folder's: its items'), and the items' digest."""
    record = {"path": str(data.resolve()), "items": len(items)}
    if data.is_file():
        record["sha256"] = file_sha256(data)
        if task.reader == "mmau":
            record["release"] = mmau_release(record["sha256"], items)
    # What the readers took from the files (questions, choices, answers, labels, references), paths aside.
    record["items_sha256"] = _digest([{k: v for k, v in item.items() if k != "audio"} for item in items])
    return record


def _cell(value) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def _markdown(task: EvalTask, metrics: dict, breakdown: dict, skipped: dict, data: dict) -> str:
    lines = [f"# {task.name}: {task.description}", ""]
    if data.get("release"):
        lines += [f"Data: {data['path']} ({data['release']}).", ""]
    lines += ["| metric | value |", "| --- | --- |"]
    lines += [f"| {name} | {_cell(value)} |" for name, value in metrics.items()]
    # One table per kind of group (MMAU: task, difficulty, sub-category, as the official script prints them).
    kinds: dict[str, dict[str, dict]] = {}
    for group, values in breakdown.items():
        kind, _, name = group.partition("=")
        kinds.setdefault(kind if name else "group", {})[name or group] = values
    for kind, groups in kinds.items():
        columns = list(dict.fromkeys(key for values in groups.values() for key in values))
        lines += ["", f"| {kind} | " + " | ".join(columns) + " |", "| --- |" + " --- |" * len(columns)]
        for name, values in groups.items():
            lines.append(f"| {name} | " + " | ".join(_cell(values.get(c, "")) for c in columns) + " |")
    for name, reason in skipped.items():
        lines += ["", f"{name}: skipped ({reason})"]
    return "\n".join(lines) + "\n"


def run_evaluation(
    task: str | EvalTask,
    data: str | os.PathLike,
    output: str | os.PathLike,
    engine,
    *,
    audio_root: str | os.PathLike | None = None,
    model_name: str = "",
    prompt_template: str | None = None,
    batch_size: int = 8,
    limit: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    overwrite: bool = False,
) -> dict:
    """
    Evaluates `generator` on a benchmark file and returns the results (also written to `output`).

    Args:
        task: a name of `tasks.TASKS` or an `EvalTask`.
        data: the benchmark's file or folder in its public format (see the task's `data_hint`).
        output: folder for run.json, predictions.jsonl, results.json, results.md (see the module docstring for
            what is refused).
        engine: a `LoopEngine` or `CaptionEngine` (see `engines`), or an `AnswerGenerator` such as
            `BatchedAnswerGenerator` (run in a `LoopEngine`).
        audio_root: where the audio files are, when not where the task looks by default.
        model_name: recorded in run.json and the results.
        prompt_template: overrides the task's prompt template.
        batch_size: questions per generator call.
        limit: evaluate the first `limit` items only (a quick look; recorded in run.json).
        progress: called with (done, total) after each batch (loop engine); progress lines are printed anyway.
        overwrite: start anew in `output`, removing af2's files there (others are left alone).

    Returns:
        the results, or None on the non-main processes of a data-parallel run (the main one scores).
    """
    task = get_task(task) if isinstance(task, str) else task
    engine = engine if hasattr(engine, "answer_items") else LoopEngine(engine)
    output, data = Path(output), Path(data)
    items = task.read(data, Path(audio_root) if audio_root is not None else None)
    if limit is not None:
        items = items[:limit]
    prompts = [task.build_prompt(item, prompt_template) for item in items]
    model = getattr(engine, "model", None)
    provenance = {
        "task": task.name,
        "data": _data_record(task, data, items),
        # Per item, so that a refused resume names the clip whose audio changed.
        "audio": {item["id"]: file_stamp(item["audio"]) for item in items},
        "model": model_fingerprint(model, model_name) if model is not None else {"id": model_name},
        "prompt_template": task.prompt if prompt_template is None else prompt_template,
        "prompts_sha256": _digest(prompts),
        "engine": type(engine).__name__,
        "generation": engine.settings,
        "limit": limit,
        "versions": strict_versions(),
    }
    folder = RunFolder(
        output,
        FOLDER_FILES,
        final=[RESULTS, RESULTS_MD, MMAU_SUBMISSION],
        inputs=[data, *(item["audio"] for item in items)],
        overwrite=overwrite,
    )
    # Data-parallel helpers (caption engine under torchrun) leave the folder to the first process; the caption
    # engine's own store keeps them in step.
    main = int(os.environ.get("RANK", "0")) == 0
    if main:
        folder.open(provenance)
    try:
        rows = engine.answer_items(items, prompts, output, batch_size, progress)
        if rows is None:
            return None
        ordered = [rows[item["id"]] for item in items]
        return _score_and_write(task, ordered, folder, provenance, model_name)
    finally:
        if main:
            folder.close()


def _score_and_write(task: EvalTask, rows: list[dict], folder: RunFolder, provenance: dict, model_name: str) -> dict:
    output = folder.folder
    withheld = task.reader == "mmau" and all(row["answer"] == "" for row in rows)
    if withheld:
        # MMAU's test split: answers withheld; the official server scores the submission file.
        metrics, breakdown = {"count": len(rows)}, {}
        skipped = {"accuracy": f"the answers are withheld (test split); submit {output / MMAU_SUBMISSION}"}
    else:
        metrics, breakdown = score_items(task.scorer, rows, task.scorer_options)
        skipped = {k[len("skipped ") :]: v["reason"] for k, v in breakdown.items() if k.startswith("skipped ")}
        breakdown = {k: v for k, v in breakdown.items() if not k.startswith("skipped ")}
    if task.reader == "mmau":
        submission = mmau_submission(rows)
        folder.write_final(output / MMAU_SUBMISSION, lambda tmp: _write_json(tmp, submission))
    results = {
        "task": task.name,
        "model": model_name,
        "data": provenance["data"],
        "headline": task.headline,
        "metrics": metrics,
        "breakdown": breakdown,
        "skipped": skipped,
        "generation": provenance["generation"],
        "prompt_template": provenance["prompt_template"],
    }
    folder.write_final(output / RESULTS, lambda tmp: _write_json(tmp, results))
    markdown = _markdown(task, metrics, breakdown, skipped, provenance["data"])
    folder.write_final(output / RESULTS_MD, lambda tmp: tmp.write_text(markdown, encoding="utf-8"))
    return results


def _write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
