"""
`run_evaluation`: read a benchmark, answer every item (resumably), score, write the results.

Output folder:
- `run.json`: what the predictions depend on (task, data, prompt template, model, engine, generation settings). A later run into
  the same folder must match it, or it stops with the difference (a resumed run never mixes settings).
- `predictions.jsonl`: one line per item: the reader's fields, `prompt` (the question sent, before AF2's
  lower-casing) and `prediction`. A killed run resumes from what its engine kept (see `engines`).
- `results.json` and `results.md`: the scores, the per-group breakdown and the metrics skipped with their reason.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from .engines import PREDICTIONS, LoopEngine
from .scoring import score_items
from .tasks import EvalTask, get_task

__all__ = ["PREDICTIONS", "run_evaluation"]


def _check_run_record(output: Path, record: dict) -> None:
    path = output / "run.json"
    if path.is_file():
        previous = json.loads(path.read_text(encoding="utf-8"))
        different = {k: (previous.get(k), v) for k, v in record.items() if previous.get(k) != v}
        if different:
            detail = "; ".join(f"{k}: was {a!r}, now {b!r}" for k, (a, b) in different.items())
            raise ValueError(
                f"{output} holds predictions made with other settings ({detail}); use another --output or delete it."
            )
        return
    output.mkdir(parents=True, exist_ok=True)
    # Written whole and renamed: data-parallel processes may all get here first, and none may read half a file.
    temporary = output / f"run.json.{os.getpid()}.tmp"
    temporary.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(temporary, path)


def _markdown(task: EvalTask, metrics: dict, breakdown: dict, skipped: dict) -> str:
    lines = [f"# {task.name}: {task.description}", "", "| metric | value |", "| --- | --- |"]
    for name, value in metrics.items():
        lines.append(f"| {name} | {value:.2f} |" if isinstance(value, float) else f"| {name} | {value} |")
    if breakdown:
        columns = sorted({key for values in breakdown.values() for key in values})
        lines += ["", "| group | " + " | ".join(columns) + " |", "| --- |" + " --- |" * len(columns)]
        for group, values in breakdown.items():
            cells = [values.get(c, "") for c in columns]
            cells = [f"{c:.2f}" if isinstance(c, float) else str(c) for c in cells]
            lines.append(f"| {group} | " + " | ".join(cells) + " |")
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
) -> dict:
    """
    Evaluates `generator` on a benchmark file and returns the results (also written to `output`).

    Args:
        task: a name of `tasks.TASKS` or an `EvalTask`.
        data: the benchmark's file or folder in its public format (see the task's `data_hint`).
        output: folder for run.json, predictions.jsonl, results.json, results.md.
        engine: a `LoopEngine` or `CaptionEngine` (see `engines`), or an `AnswerGenerator` such as
            `BatchedAnswerGenerator` (run in a `LoopEngine`).
        audio_root: where the audio files are, when not where the task looks by default.
        model_name: recorded in run.json and the results.
        prompt_template: overrides the task's prompt template.
        batch_size: questions per generator call.
        limit: evaluate the first `limit` items only (a quick look; recorded in run.json).
        progress: called with (done, total) after each batch (loop engine).

    Returns:
        the results, or None on the non-main processes of a data-parallel run (the main one scores).
    """
    task = get_task(task) if isinstance(task, str) else task
    engine = engine if hasattr(engine, "answer_items") else LoopEngine(engine)
    output = Path(output)
    items = task.read(Path(data), Path(audio_root) if audio_root is not None else None)
    if limit is not None:
        items = items[:limit]
    prompts = [task.build_prompt(item, prompt_template) for item in items]
    record = {
        "task": task.name,
        "data": str(Path(data).resolve()),
        "model": model_name,
        "prompt_template": task.prompt if prompt_template is None else prompt_template,
        "engine": type(engine).__name__,
        "generation": engine.settings,
        "limit": limit,
    }
    _check_run_record(output, record)
    rows = engine.answer_items(items, prompts, output, batch_size, progress)
    if rows is None:
        return None
    ordered = [rows[item["id"]] for item in items]
    metrics, breakdown = score_items(task.scorer, ordered)
    skipped = {k[len("skipped ") :]: v["reason"] for k, v in breakdown.items() if k.startswith("skipped ")}
    breakdown = {k: v for k, v in breakdown.items() if not k.startswith("skipped ")}
    results = {
        "task": task.name,
        "model": model_name,
        "data": record["data"],
        "headline": task.headline,
        "metrics": metrics,
        "breakdown": breakdown,
        "skipped": skipped,
        "generation": record["generation"],
        "prompt_template": record["prompt_template"],
    }
    (output / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (output / "results.md").write_text(_markdown(task, metrics, breakdown, skipped), encoding="utf-8")
    return results
