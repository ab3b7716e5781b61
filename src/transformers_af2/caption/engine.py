"""
The batched, resumable, data-parallel generation engine behind `af2 caption` (and any other command that asks a
model of the Flamingo family questions about many clips). What differs between families (prompt, front end, answer
extraction) comes from the model's `families.ModelFamily`; nothing here depends on the family.

    jobs = jobs_for_clips(clips, ["Describe the audio."])
    summary = run_generation_jobs(jobs, model, processor, "out.jsonl", settings=..., generate_kwargs=...)

Clips are read (decoded, resampled, turned into log-mel windows by the family's front end) in DataLoader
worker processes while the model runs. The main process keeps a look-ahead buffer of read clips, sorts it by
number of windows and generates batches of similar length, then appends the rows of each batch to its own part
file (see `runstore.RunStore`). Under torchrun or `accelerate launch` every process takes the clips whose id hashes
to its rank; rank 0 merges all parts once every process is done.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from ..families import EncodedAudio, ModelFamily, family_for, source_seconds
from ..generation_utils import through_first_eos
from ..runstore import OutputRefused, Progress, RunStore, package_versions, strict_versions
from .inputs import Clip, row_id, shard_of


@dataclass(frozen=True)
class GenerationJob:
    """
    One row to generate: `prompt` about `clip`. `id` is stable across runs (see `inputs.row_id`); `fields` are extra
    columns copied into the row as they are (e.g. an evaluation's reference answer).
    """

    id: str
    clip: Clip
    prompt: str
    fields: dict = field(default_factory=dict)


def jobs_for_clips(clips: list[Clip], prompts: list[str]) -> list[GenerationJob]:
    """Every clip asked every prompt, or its own prompt when it has one; an error when a clip has neither."""
    prompts = list(dict.fromkeys(prompts))  # a prompt given twice is asked once
    jobs = []
    for clip in clips:
        asked = [clip.prompt] if clip.prompt is not None else prompts
        if not asked:
            where = f" ({clip.path})" if clip.path not in (None, clip.clip_id) else ""
            raise ValueError(f"clip {clip.clip_id!r}{where}: no prompt; give --prompt or fill its prompt column.")
        # `_source` stays in the store's parts: a resume reuses a row only if its clip is still the same file.
        fields = {"_source": clip.source} if clip.source is not None else {}
        jobs.extend(GenerationJob(row_id(clip.clip_id, prompt), clip, prompt, fields) for prompt in asked)
    return jobs


@dataclass
class RunSummary:
    """Counts of one run, over all processes, in rows (one per clip and prompt)."""

    done: int = 0  # generated in this run
    failed: int = 0  # could not be generated (their reasons are in the errors file)
    skipped: int = 0  # already in the output from an earlier run
    total_rows: int = 0  # rows in the merged output
    output: str = ""
    errors_file: str | None = None

    def line(self) -> str:
        text = f"{self.done} done, {self.failed} failed, {self.skipped} skipped as already done"
        text += f"; {self.total_rows} rows in {self.output}"
        if self.errors_file:
            text += f"; reasons of failures in {self.errors_file}"
        return text


# ---------------------------------------------------------------------------------------------------------------------
# processes
# ---------------------------------------------------------------------------------------------------------------------


class ProcessGroup:
    """
    This process's place among the data-parallel processes, from the environment torchrun and `accelerate launch`
    set (RANK, WORLD_SIZE, LOCAL_RANK). With several processes it joins (or reuses) a torch.distributed group with a
    gloo group on the side for the few CPU synchronisations the engine needs; one process needs none.
    """

    def __init__(self, timeout: datetime.timedelta = datetime.timedelta(days=7)):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self._group = None
        self._owns_default_group = False
        if self.world_size > 1:
            import torch.distributed as dist

            # Ranks finish their shards at different times; the default 30 min timeout would cut a long run short.
            if not dist.is_initialized():
                dist.init_process_group(backend="gloo", timeout=timeout)
                self._owns_default_group = True
            self._group = dist.new_group(backend="gloo", timeout=timeout) if dist.get_backend() != "gloo" else None
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier(group=self._group)

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Leaves the process group if this object joined it (a caller's own group stays)."""
        if self._owns_default_group:
            import torch.distributed as dist

            dist.destroy_process_group()
            self._owns_default_group = False

    def sum(self, values: list[int]) -> list[int]:
        if self.world_size == 1:
            return list(values)
        import torch.distributed as dist

        tensor = torch.tensor(values, dtype=torch.long)
        dist.all_reduce(tensor, group=self._group)
        return tensor.tolist()


# ---------------------------------------------------------------------------------------------------------------------
# reading clips (in DataLoader workers)
# ---------------------------------------------------------------------------------------------------------------------


class ClipReader(torch.utils.data.Dataset):
    """
    Clip `i` -> its model inputs' per-clip part (`families.EncodedAudio`: windows, features), computed by the model
    family's front end, plus the seconds its windows cannot hold. A clip that cannot be read returns its error
    instead, so that the run goes on.
    """

    def __init__(self, clips: list[Clip], family: ModelFamily):
        self.clips = clips
        self.family = family

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, position: int) -> dict:
        clip = self.clips[position]
        try:
            encoded = self.family.encode_audio(clip.read_audio())
        except Exception as error:  # any unreadable clip: recorded with its reason, never fatal to the run
            reason = " ".join(str(error).split()) or type(error).__name__
            name = clip.path or clip.clip_id
            # The extractor names the input "audio[0]" and often the path after it: name the clip once.
            reason = reason.replace(f"audio[0]: {clip.audio}: ", "audio[0]: ").replace("audio[0]", name)
            return {"position": position, "error": f"{type(error).__name__}: {reason}"}
        return {
            "position": position,
            "error": None,
            "clip": encoded,
            "windows": encoded.windows,
            "seconds_dropped": encoded.seconds_dropped,
        }


def _worker_init(quiet_loggers: tuple[str, ...], _):
    # Workers decode one clip each; the model's process owns the cores' threads.
    torch.set_num_threads(1)
    # The rows carry `seconds_dropped`; a warning per long clip from every worker would only bury the progress bar.
    for name in quiet_loggers:
        logging.getLogger(name).setLevel(logging.ERROR)


def read_clips(clips: list[Clip], family: ModelFamily, num_workers: int, prefetch: int = 4) -> Iterator[dict]:
    """The read clips in order, `num_workers` processes reading ahead (0: read in this process)."""
    loader = torch.utils.data.DataLoader(
        ClipReader(clips, family),
        batch_size=None,
        num_workers=num_workers,
        worker_init_fn=functools.partial(_worker_init, family.per_clip_loggers) if num_workers else None,
        prefetch_factor=prefetch if num_workers else None,
        collate_fn=lambda item: item,
    )
    yield from loader


# ---------------------------------------------------------------------------------------------------------------------
# batching and generation
# ---------------------------------------------------------------------------------------------------------------------


def length_grouped_batches(items: list, batch_size: int, windows_of: Callable) -> list[list]:
    """The items in batches of `batch_size`, sorted by window count (stable) so a batch's windows differ little."""
    ordered = sorted(items, key=windows_of)
    return [ordered[start : start + batch_size] for start in range(0, len(ordered), batch_size)]


def stop_reasons(new_tokens: torch.Tensor, eos_token_ids: list[int]) -> tuple[list[int], list[str]]:
    """
    For each row of generated tokens (prompt removed, padded after eos by `generate`): how many tokens were
    generated (up to and including the first eos) and why generation stopped, "eos" or "length".
    """
    eos_ids = set(eos_token_ids)
    # One transfer of the whole batch (a device sync per row otherwise).
    rows = through_first_eos(new_tokens.tolist(), eos_ids)
    counts = [len(row) for row in rows]
    reasons = ["eos" if row and row[-1] in eos_ids else "length" for row in rows]
    return counts, reasons


class BatchGenerator:
    """Turns read clips and their prompts into model inputs through the model's family and generates their rows."""

    def __init__(self, model, processor, generate_kwargs: dict):
        self.model = model
        self.family = family_for(model, processor)
        self.generate_kwargs = dict(generate_kwargs)
        eos = self.generate_kwargs.get("eos_token_id", model.generation_config.eos_token_id)
        self.eos_token_ids = [eos] if isinstance(eos, int) else list(eos or [])

    def check_prompts(self, prompts: list[str]) -> None:
        """Every prompt must be one the family can ask (see `ModelFamily.check_questions`)."""
        self.family.check_questions(prompts)

    def inputs(self, prompts: list[str], clips: list[EncodedAudio]):
        """The family's batch of `prompts[i]` about `clips[i]`, on the model's device."""
        return self.family.to_model(self.family.batch_inputs(prompts, clips), self.model)

    @torch.inference_mode()
    def __call__(self, jobs: list[GenerationJob], read: list[dict]) -> list[dict]:
        inputs = self.inputs([job.prompt for job in jobs], [item["clip"] for item in read])
        generated = self.model.generate(**inputs, **self.generate_kwargs)
        new_tokens = generated[:, inputs["input_ids"].shape[1] :]
        answers = self.family.decode_answers(new_tokens)
        counts, reasons = stop_reasons(new_tokens, self.eos_token_ids)
        rows = []
        for job, item, answer, count, reason in zip(jobs, read, answers, counts, reasons):
            rows.append(
                {
                    "id": job.id,
                    "clip_id": job.clip.clip_id,
                    "path": job.clip.path,
                    "index": job.clip.index,
                    "prompt": job.prompt,
                    "answer": answer,
                    "windows": item["windows"],
                    "seconds_dropped": item["seconds_dropped"],
                    "tokens": count,
                    "stop_reason": reason,
                    **job.fields,
                }
            )
        return rows


def _stale_rows(store: RunStore, jobs: list[GenerationJob]) -> list[str]:
    """Stored rows that a job would reuse although its clip is now another file or the file changed."""
    stored = store.stored_sources()
    stale = []
    for job in jobs:
        if job.id in stored and stored[job.id] != (job.clip.path, job.fields.get("_source")):
            path, source = stored[job.id]
            stale.append(
                f"{job.clip.clip_id!r} (was {path} {source}, now {job.clip.path} {job.fields.get('_source')})"
            )
    return stale


def run_generation_jobs(
    jobs: list[GenerationJob],
    model,
    processor,
    output: str | os.PathLike | RunStore,
    *,
    settings: dict,
    versions: dict | None = None,
    generate_kwargs: dict | None = None,
    batch_size: int = 8,
    lookahead: int | None = None,
    num_workers: int = 1,
    progress: bool | None = None,
    processes: ProcessGroup | None = None,
) -> RunSummary:
    """
    Generates a row for every job that `output` does not hold yet, resumably and, under torchrun/accelerate, spread
    over the processes; then merges all rows into `output` (JSONL, Parquet or CSV by extension).

    Args:
        jobs: the rows wanted (see `jobs_for_clips`); their order is the order of the merged output.
        model, processor: a model of any supported family (see `transformers_af2.families`; on its device, in its
            dtype) and its processor.
        output: the output file (or its `RunStore`); its `.parts` folder keeps the rows between runs.
        settings: what the rows depend on (model, revision, dtype, generation settings); recorded in the sidecar on
            the first run and compared on every later one: a difference is an error.
        versions: package versions, recorded in the sidecar for information.
        generate_kwargs: passed to `model.generate` (e.g. `max_new_tokens`, `do_sample`).
        batch_size: rows per `generate` call.
        lookahead: read clips held to group by length (default `max(64, 8 * batch_size)`).
        num_workers: DataLoader processes reading audio (0: in this process).
        progress: show a progress bar; None shows it when stderr is a terminal (main process only).
        processes: the data-parallel group; default from the environment (see `ProcessGroup`).

    Returns:
        `RunSummary` with the counts over all processes (`total_rows` and `errors_file` on rank 0, which merges).
    """
    # A group made here is closed here; one passed in belongs to the caller.
    with (
        ProcessGroup() if processes is None else contextlib.nullcontext(processes) as processes,
        contextlib.ExitStack() as on_exit,
    ):
        store = output if isinstance(output, RunStore) else RunStore(output)
        generator = BatchGenerator(model, processor, generate_kwargs or {})
        generator.check_prompts(list(dict.fromkeys(job.prompt for job in jobs)))
        seen: set[str] = set()
        for job in jobs:
            if job.id in seen:
                raise ValueError(f"job id {job.id} ({job.clip.clip_id!r}, {job.prompt!r}) appears twice in the jobs.")
            seen.add(job.id)

        # The first process checks, locks and records the output for the whole run; the others learn the outcome
        # (the all-reduce is also the barrier that keeps them from starting before the record is written).
        refusal = None
        if processes.is_main:
            try:
                store.open({**settings, "versions": strict_versions(versions or {})})
                on_exit.callback(store.close)
            except OutputRefused as error:
                refusal = error
        if processes.sum([int(refusal is not None)])[0]:
            raise refusal or OutputRefused(f"{store.output}: the first process refused the run (see its error).")
        stale = _stale_rows(store, jobs)
        if stale:
            raise OutputRefused(
                f"{store.output} holds rows of clips whose audio changed since (size:mtime_ns): {', '.join(stale[:5])}"
                + (f" and {len(stale) - 5} more" if len(stale) > 5 else "")
                + ". Write to another output, or pass --overwrite to start anew."
            )

        done_ids = store.done_ids()
        mine = [job for job in jobs if shard_of(job.clip.clip_id, processes.world_size) == processes.rank]
        pending = [job for job in mine if job.id not in done_ids]
        skipped = len(mine) - len(pending)

        clips: dict[str, list[GenerationJob]] = {}
        for job in pending:
            clips.setdefault(job.clip.clip_id, []).append(job)
        clip_list = [group[0].clip for group in clips.values()]
        lookahead = lookahead or max(64, 8 * batch_size)

        done = failed = 0
        rows_part = store.new_part("rows", processes.rank) if pending else None
        errors_part = None
        shown = progress if processes.is_main else False
        bar = Progress(len(clip_list), already=skipped, unit="clip", label="af2", enabled=shown)
        rows_left = {clip_id: len(group) for clip_id, group in clips.items()}  # a clip counts once all its rows are in
        buffer: list[tuple[GenerationJob, dict]] = []

        def flush():
            nonlocal done
            for batch in length_grouped_batches(buffer, batch_size, lambda pair: pair[1]["windows"]):
                rows = generator([job for job, _ in batch], [item for _, item in batch])
                rows_part.append(rows)
                done += len(rows)
                for job, _ in batch:
                    rows_left[job.clip.clip_id] -= 1
                    bar.update(int(rows_left[job.clip.clip_id] == 0))
            buffer.clear()

        try:
            for item in read_clips(clip_list, generator.family, num_workers):
                group = clips[clip_list[item["position"]].clip_id]
                if item["error"] is not None:
                    errors_part = errors_part or store.new_part("errors", processes.rank)
                    errors_part.append(
                        {
                            "id": job.id,
                            "clip_id": job.clip.clip_id,
                            "path": job.clip.path,
                            "index": job.clip.index,
                            "prompt": job.prompt,
                            "error": item["error"],
                        }
                        for job in group
                    )
                    failed += len(group)
                    bar.update(1)
                    continue
                buffer.extend((job, item) for job in group)
                if len(buffer) >= lookahead:
                    flush()
            if buffer:
                flush()
        finally:
            bar.close()
            for part in (rows_part, errors_part):
                if part is not None:
                    part.close()

        done, failed, skipped = processes.sum([done, failed, skipped])
        processes.barrier()  # every part is complete before the merge reads them
        summary = RunSummary(done=done, failed=failed, skipped=skipped, output=str(store.output))
        if processes.is_main:
            total_rows, errors = store.merge([job.id for job in jobs])
            summary.total_rows = total_rows
            summary.errors_file = str(store.errors) if errors else None
        processes.barrier()  # the merged output exists when any process returns
        return summary


__all__ = [
    "BatchGenerator",
    "ClipReader",
    "GenerationJob",
    "ProcessGroup",
    "RunSummary",
    "jobs_for_clips",
    "length_grouped_batches",
    "package_versions",
    "read_clips",
    "run_generation_jobs",
    "source_seconds",
    "stop_reasons",
]
