"""
Engines: how an evaluation gets its predictions. Both leave OUTPUT/predictions.jsonl (one row per item: the reader's
fields, `prompt`, `prediction`) and return the rows by id.

- `LoopEngine`: a batched loop in this process over an `AnswerGenerator`; rows appended and flushed batch by batch,
  so a killed run resumes from the rows written (a torn last line is generated again).
- `CaptionEngine`: `af2 caption`'s engine (`transformers_af2.caption.run_generation_jobs`): audio read ahead in
  worker processes, batches grouped by length, data-parallel under torchrun / accelerate, resumable through its own
  store (`generations.jsonl` and its parts); predictions.jsonl is written from its rows at the end.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from ..runstore import Progress, file_stamp
from .generation import AnswerGenerator

logger = logging.getLogger(__name__)

PREDICTIONS = "predictions.jsonl"
GENERATIONS = "generations.jsonl"


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


def _generate_missing(
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
    bar = Progress(len(todo), already=len(done), label="af2 eval")
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
            bar.update(len(batch))
            if progress is not None:
                progress(len(done), len(items))
    bar.close()
    return done


class LoopEngine:
    """Predictions from a batched loop over `generator` (see `generation.BatchedAnswerGenerator`) in this process."""

    is_main = True

    def __init__(self, generator: AnswerGenerator):
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # Every process would answer every item into the same file.
            raise ValueError(
                "the loop engine runs in one process; under torchrun / accelerate use the caption engine "
                "(--engine caption)."
            )
        self.generator = generator
        self.settings = dict(getattr(generator, "settings", {}))
        self.model = getattr(generator, "model", None)  # for the run's record (weights fingerprint, dtype)

    def answer_items(self, items, prompts, output: Path, batch_size: int, progress=None) -> dict[str, dict]:
        return _generate_missing(items, prompts, self.generator, output / PREDICTIONS, batch_size, progress)


class CaptionEngine:
    """
    Predictions through `af2 caption`'s engine. Under torchrun / `accelerate launch` each process answers its share;
    `answer_items` returns the rows on the main process and None on the others (which then skip scoring).
    """

    def __init__(self, model, processor, settings: dict, num_workers: int = 2):
        self.model = model
        self.processor = processor
        self.settings = dict(settings)
        self.num_workers = num_workers
        self.is_main = int(os.environ.get("RANK", "0")) == 0

    def answer_items(self, items, prompts, output: Path, batch_size: int, progress=None) -> dict[str, dict] | None:
        from ..caption import Clip, GenerationJob, ProcessGroup, row_id, run_generation_jobs
        from ..families import family_for
        from ..runstore import RunStore

        generate_kwargs = {**self.settings, **family_for(self.model, self.processor).stop_kwargs(self.model)}
        # A row is the answer to one prompt about one item's audio: a changed prompt or audio is never reused.
        jobs = [
            GenerationJob(
                row_id(item["id"], prompt),
                Clip(clip_id=item["id"], audio=item["audio"], path=item["audio"]),
                prompt,
                {"_source": file_stamp(item["audio"])},
            )
            for item, prompt in zip(items, prompts)
        ]
        with ProcessGroup() as processes:
            self.is_main = processes.is_main
            summary = run_generation_jobs(
                jobs,
                self.model,
                self.processor,
                RunStore(output / GENERATIONS, command="eval"),
                settings={"generation": self.settings},
                generate_kwargs=generate_kwargs,
                batch_size=batch_size,
                num_workers=self.num_workers,
                processes=processes,
            )
        if not self.is_main:
            return None
        if summary.failed:
            raise ValueError(
                f"{summary.failed} item(s) could not be answered (their audio could not be read); reasons in "
                f"{summary.errors_file}. Fix or remove them from the data and run again."
            )
        by_row = {}
        for line in (output / GENERATIONS).read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                by_row[row["id"]] = row["answer"]
        answers = {job.clip.clip_id: by_row[job.id] for job in jobs if job.id in by_row}
        missing = [item["id"] for item in items if item["id"] not in answers]
        if missing:
            raise RuntimeError(
                f"the caption engine returned no answer for {len(missing)} item(s), e.g. {missing[:3]}."
            )
        rows = {
            item["id"]: {**item, "prompt": prompt, "prediction": answers[item["id"]]}
            for item, prompt in zip(items, prompts)
        }
        temporary = output / (PREDICTIONS + ".tmp")
        with open(temporary, "w", encoding="utf-8") as handle:
            for item in items:
                handle.write(json.dumps(rows[item["id"]], ensure_ascii=False) + "\n")
        os.replace(temporary, output / PREDICTIONS)
        return rows
