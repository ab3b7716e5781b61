"""
`run_evaluation`: read a benchmark, answer every item (resumably), score, write the results.

Output folder:
- `run.json`: what the predictions depend on (task, prompt template, model, generation settings). A later run into
  the same folder must match it, or it stops with the difference (a resumed run never mixes settings).
- `predictions.jsonl`: one line per item in data order within each batch: the reader's fields, `prompt` (the question
  sent, before AF2's lower-casing) and `prediction`. Lines are appended and flushed batch by batch; a run that was
  killed resumes from what is there (a torn last line is dropped and its item generated again).
- `results.json` and `results.md`: the scores, the per-group breakdown and the metrics skipped with their reason.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from .generation import AnswerGenerator
from .scoring import score_items
from .tasks import GENERATION_SETTINGS, EvalTask, get_task

logger = logging.getLogger(__name__)

PREDICTIONS = "predictions.jsonl"


def _read_predictions(path: Path, wanted: dict[str, dict]) -> dict[str, dict]:
    """Rows already in `path`, by id. A torn last line (killed mid-write) is cut off the file."""
    if not path.is_file():
        return {}
    raw = path.read_bytes()
    complete_end = raw.rfind(b"\n") + 1
    if complete_end < len(raw):
        # Every row is written with its newline: text after the last newline is a write the previous run did not
        # finish. Cut it off; its item is generated again.
        logger.warning("%s: dropping an incomplete last line (the previous run was interrupted)", path)
        with open(path, "r+b") as handle:
            handle.truncate(complete_end)
        raw = raw[:complete_end]
    done: dict[str, dict] = {}
    for number, line in enumerate(raw.split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(
                f"{path} line {number}: not valid JSON; the file is damaged (delete it to start over)."
            ) from None
        if not isinstance(row, dict) or "id" not in row or "prediction" not in row:
            raise ValueError(f"{path} line {number}: a row needs 'id' and 'prediction'.")
        if row["id"] not in wanted:
            raise ValueError(
                f"{path} line {number}: id {row['id']!r} is not in this data set; the folder holds another run "
                "(use another --output)."
            )
        if row["id"] in done:
            raise ValueError(f"{path} line {number}: id {row['id']!r} appears twice.")
        done[row["id"]] = row
    return done


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
    path.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def generate_missing(
    items: Sequence[dict],
    prompts: Sequence[str],
    generator: AnswerGenerator,
    path: Path,
    batch_size: int,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, dict]:
    """Answers every item not yet in `path`, appending each batch's rows; returns all rows by id."""
    wanted = {item["id"]: item for item in items}
    done = _read_predictions(path, wanted)
    todo = [(item, prompt) for item, prompt in zip(items, prompts) if item["id"] not in done]
    with open(path, "a", encoding="utf-8") as handle:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            answers = generator([item["audio"] for item, _ in batch], [prompt for _, prompt in batch])
            if len(answers) != len(batch):
                raise RuntimeError(f"the generator returned {len(answers)} answers for {len(batch)} questions.")
            for (item, prompt), answer in zip(batch, answers):
                row = {**item, "prompt": prompt, "prediction": answer}
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
                done[item["id"]] = row
            handle.flush()
            os.fsync(handle.fileno())
            if progress is not None:
                progress(len(done), len(items))
    return done


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
    generator: AnswerGenerator,
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
        generator: answers (audio, question) batches, e.g. `BatchedAnswerGenerator`.
        audio_root: where the audio files are, when not where the task looks by default.
        model_name: recorded in run.json and the results.
        prompt_template: overrides the task's prompt template.
        batch_size: questions per generator call.
        limit: evaluate the first `limit` items only (a quick look; recorded in run.json).
        progress: called with (done, total) after each batch.
    """
    task = get_task(task) if isinstance(task, str) else task
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
        "generation": getattr(generator, "settings", GENERATION_SETTINGS),
        "limit": limit,
    }
    _check_run_record(output, record)
    rows = generate_missing(items, prompts, generator, output / PREDICTIONS, batch_size, progress)
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
