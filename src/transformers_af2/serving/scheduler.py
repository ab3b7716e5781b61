"""
The thread that owns the model: requests wait in a bounded queue and are answered in batches.

A batch is what is waiting when the previous one ends (requests that arrive during a batch join the next), up to
`max_batch_size` requests that can share one `generate` call:
- greedy requests (temperature 0) batch together, whatever their `max_tokens`, `stop` or `n`: each row stops on its
  own (`BatchProgress`), and greedy rows do not depend on each other, so each answer is the one it gets alone;
- sampled requests without a seed batch with others of the same temperature and top_p;
- a request with a seed that samples runs alone, right after `torch.manual_seed(seed)`: the same request and seed
  give the same answer whatever else the server is doing (rows of one sampled batch draw from one random stream,
  so batching them would make an answer depend on its neighbours).
When more compatible requests wait than a batch holds, the batch is the group of similar audio length (as `af2
caption` groups clips) that contains the oldest request, so no request waits behind newer ones for ever.

Batches are built by `caption.engine.BatchGenerator.inputs` through the model's family (`transformers_af2.families`:
AF2's processor prompt, or AF3 / Music Flamingo's chat template; left-padded, each clip's audio masked) and decoded by
the family (AF2: the text after `<SEP>`, stripped, as the pipeline does; AF3 / MF: the answer without its thinking),
so answers equal `af2 caption`'s and, for AF2, `pipeline("audio-text-to-text")`'s.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from ..caption.engine import BatchGenerator, length_grouped_batches
from ..families import EncodedAudio, family_for
from ..generation_utils import with_non_finite_check
from .chat_request import ChatRequest, RequestError

logger = logging.getLogger(__name__)


class QueueFull(RequestError):
    """More requests wait than `max_queue`: HTTP 503 with Retry-After."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message, status=503, code="server_busy")
        self.retry_after = retry_after


@dataclass(eq=False)  # each job is its own: compared and hashed by identity
class Job:
    """
    One request in the queue. `features`: its audio windows (windows, frames, mels); `deliver(event)` is called
    from the scheduler thread with `("delta", choice, text)`, `("done", result)` or `("error", status, message)`;
    it must be thread-safe.
    """

    request: ChatRequest
    question: str
    clip: EncodedAudio  # the audio as the model family's front end read it
    prompt_tokens: int
    deliver: Callable
    deadline: float
    cancelled: threading.Event = field(default_factory=threading.Event)
    streamed: bool = False  # some of its answer was sent: it cannot be generated again

    @property
    def windows(self) -> int:
        return self.clip.windows

    @property
    def batch_key(self):
        """Jobs with equal keys share a `generate` call; None runs alone."""
        request = self.request
        if request.greedy:
            return ("greedy",)
        if request.seed is not None or request.n > 1:
            return None
        return ("sample", request.temperature, request.top_p)

    def stopped(self) -> str | None:
        """Why this job's rows should stop now: "timeout", "cancelled" or None. A timed-out request is cancelled by
        its handler as well; it counts as a timeout."""
        if time.monotonic() > self.deadline:
            return "timeout"
        return "cancelled" if self.cancelled.is_set() else None


@dataclass
class _Row:
    """One generated sequence of a batch and the answer choices it gives (several for greedy n > 1)."""

    job: Job
    choices: list[int]
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    sent: str = ""  # streamed so far
    finish_reason: str | None = None


class BatchProgress(StoppingCriteria):
    """
    Follows every row of one `generate` call, token by token (a stopping criterion is the one hook that sees every
    row after every step): decodes each row's answer, streams what is final of it, and stops a row at eos, at one of
    its request's stop strings, at its own `max_tokens`, or when its client left or its time ran out.
    """

    def __init__(self, rows: list[_Row], prompt_length: int, decode_answers: Callable, eos_token_ids: list[int]):
        self.rows = rows
        self.prompt_length = prompt_length
        self.decode_answers = decode_answers  # the model family's: generated ids -> answer texts
        self.eos_token_ids = set(eos_token_ids)

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        last = input_ids[:, -1].tolist()  # one transfer per step
        for row, token in zip(self.rows, last):
            if row.finish_reason is None:
                row.tokens.append(token)
                self._advance(row)
        return torch.tensor([row.finish_reason is not None for row in self.rows], device=input_ids.device)

    def _advance(self, row: _Row) -> None:
        request = row.job.request
        row.text = self.decode_answers([row.tokens])[0]
        cut = min((i for i in (row.text.find(stop) for stop in request.stop) if i >= 0), default=-1)
        if cut >= 0:
            row.text, row.finish_reason = row.text[:cut], "stop"
        elif row.tokens[-1] in self.eos_token_ids:
            row.finish_reason = "stop"
        elif len(row.tokens) >= request.max_tokens:
            row.finish_reason = "length"
        else:
            row.finish_reason = row.job.stopped()
        if request.stream:
            self._stream(row)

    def _stream(self, row: _Row) -> None:
        """Sends the part of the answer that can no longer change: while generating, the end that may be the start of
        a stop string, an incomplete UTF-8 character, or whitespace the final strip would remove is held back."""
        text = row.text
        if row.finish_reason is None:
            hold = max((len(stop) - 1 for stop in row.job.request.stop), default=0)
            text = text[: len(text) - hold] if hold else text
            text = text.rstrip().rstrip("\ufffd")
        if text.startswith(row.sent) and len(text) > len(row.sent):
            for choice in row.choices:
                row.job.deliver(("delta", choice, text[len(row.sent) :]))
            row.sent = text
            row.job.streamed = True

    def finish(self) -> list[str]:
        """After `generate`: rows it ended (its max_new_tokens) finish by length; every job gets its result. Returns
        each job's outcome: "answered", "cancelled" or "timeout"."""
        for row in self.rows:
            if row.finish_reason is None:
                row.finish_reason = "length"
                if row.job.request.stream:
                    self._stream(row)
        jobs = list(dict.fromkeys(row.job for row in self.rows))
        outcomes = []
        for job in jobs:
            rows = [row for row in self.rows if row.job is job]
            reasons = {row.finish_reason for row in rows}
            if "cancelled" in reasons:
                outcomes.append("cancelled")
                continue
            if "timeout" in reasons:
                job.deliver(("error", 504, "the request took longer than this server's request timeout."))
                outcomes.append("timeout")
                continue
            outcomes.append("answered")
            choices = sorted((choice, row) for row in rows for choice in row.choices)
            job.deliver(
                (
                    "done",
                    {
                        "choices": [(choice, row.text, row.finish_reason) for choice, row in choices],
                        "prompt_tokens": job.prompt_tokens,
                        "completion_tokens": sum(len(row.tokens) for _, row in choices),
                    },
                )
            )
        return outcomes


def _generator_for(model, processor) -> BatchGenerator:
    """The batched generation of `af2 caption`, with the model family's stop tokens."""
    return BatchGenerator(model, processor, family_for(model, processor).stop_kwargs(model))


class BatchScheduler:
    """
    Owns the model on one thread. `submit(job)` queues a job (QueueFull beyond `max_queue` waiting jobs); the
    thread answers them in batches (see the module docstring). `close()` stops the thread.
    """

    def __init__(self, model, processor, max_batch_size: int = 8, max_queue: int = 64):
        self.model = model
        self.processor = processor
        self.generator = _generator_for(model, processor)
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self._waiting: collections.deque[Job] = collections.deque()
        self._condition = threading.Condition()
        self._closed = False
        self._running = 0
        # Requests by outcome ("answered", "cancelled", "timeout", "failed"), shown by /health.
        self.outcomes: collections.Counter = collections.Counter()
        self.batch_sizes: collections.Counter = collections.Counter()  # generate calls by rows
        self._model_lock = threading.Lock()  # held while a batch runs; swap_model waits for it
        self._batch_seconds = 10.0  # running mean, for Retry-After
        self._thread = threading.Thread(target=self._loop, name="af2-serve-model", daemon=True)
        self._thread.start()

    # -- queue ----------------------------------------------------------------------------------------------------
    def check_capacity(self) -> None:
        with self._condition:
            if len(self._waiting) >= self.max_queue:
                retry = max(1, round(self._batch_seconds * (1 + len(self._waiting) / self.max_batch_size)))
                raise QueueFull(
                    f"the server is busy ({len(self._waiting)} requests waiting, its limit); retry in {retry} s.",
                    retry,
                )

    def submit(self, job: Job) -> None:
        with self._condition:
            if self._closed:
                raise RuntimeError("the server is shutting down")
            self.check_capacity()
            self._waiting.append(job)
            self._condition.notify()

    def status(self) -> dict:
        with self._condition:
            sizes = {str(size): count for size, count in sorted(self.batch_sizes.items())}
            return {"waiting": len(self._waiting), "running": self._running, **self.outcomes, "batch_sizes": sizes}

    @property
    def family(self):
        """The served model's family (None while unloaded): how a request's question and audio become inputs."""
        return self.generator.family if self.generator is not None else None

    @property
    def loaded(self) -> bool:
        return self.model is not None

    def swap_model(self, model, processor) -> None:
        """Replaces the model between batches (None, None: unloads it and frees its memory). Blocking."""
        import gc

        with self._model_lock:
            self.model, self.processor = model, processor
            self.generator = _generator_for(model, processor) if model is not None else None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def close(self) -> None:
        with self._condition:
            self._closed = True
            self._condition.notify()
        self._thread.join(timeout=60)

    def _next_batch(self) -> list[Job]:
        """Called with the lock held and jobs waiting; removes and returns the next batch."""
        first = self._waiting[0]
        key = first.batch_key
        same = [first] if key is None else [job for job in self._waiting if job.batch_key == key]
        if len(same) > self.max_batch_size:
            groups = length_grouped_batches(same, self.max_batch_size, lambda job: job.windows)
            same = next(group for group in groups if any(job is first for job in group))
        chosen = {id(job) for job in same}
        self._waiting = collections.deque(job for job in self._waiting if id(job) not in chosen)
        return same

    def _loop(self) -> None:
        while True:
            with self._condition:
                while not self._waiting and not self._closed:
                    self._condition.wait()
                if self._closed:
                    for job in self._waiting:
                        job.deliver(("error", 503, "the server is shutting down."))
                    self._waiting.clear()
                    return
                batch = self._next_batch()
                self._running = len(batch)
            started = time.monotonic()
            with self._model_lock:
                if self.model is None:
                    for job in batch:
                        job.deliver(("error", 503, "the model is unloaded (POST /load_model loads it again)."))
                else:
                    self._run(batch)
            with self._condition:
                self._running = 0
                self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * (time.monotonic() - started)

    # -- generation -----------------------------------------------------------------------------------------------
    def _run(self, batch: list[Job]) -> None:
        live = []
        for job in batch:
            reason = job.stopped()
            if reason == "timeout":
                job.deliver(("error", 504, "the request waited longer than this server's request timeout."))
            if reason is None:
                live.append(job)
            else:
                self._count(reason)
        if not live:
            return
        try:
            self._generate(live)
        except Exception:
            if len(live) > 1:  # each alone, so that one failing request does not fail the others
                logger.exception("a batch of %d requests failed; running them one by one", len(live))
                for job in live:
                    if job.streamed:
                        job.deliver(("error", 500, "internal error while generating the answer (logged)."))
                        self._count("failed")
                    else:
                        self._run([job])
                return
            # Not the client's doing (its request was checked): a bug or the machine. Logged in full here only.
            logger.exception("generation failed for a request")
            live[0].deliver(("error", 500, "internal error while generating the answer (logged on the server)."))
            self._count("failed")

    def _count(self, *outcomes: str) -> None:
        with self._condition:
            self.outcomes.update(outcomes)

    @torch.inference_mode()
    def _generate(self, jobs: list[Job]) -> None:
        first = jobs[0].request
        sampled_choices = 1 if first.greedy else first.n
        inputs = self.generator.inputs([job.question for job in jobs], [job.clip for job in jobs])
        rows = []
        for job in jobs:
            if job.request.greedy:  # n equal answers: generated once
                rows.append(_Row(job, list(range(job.request.n))))
            else:
                rows.extend(_Row(job, [choice]) for choice in range(sampled_choices))
        progress = BatchProgress(
            rows, inputs["input_ids"].shape[1], self.generator.family.decode_answers, self.generator.eos_token_ids
        )
        with self._condition:
            self.batch_sizes[len(jobs)] += 1
        names = [f"request {index}" for index in range(len(jobs))]
        if first.seed is not None and not first.greedy:
            torch.manual_seed(first.seed)  # this job runs alone (see Job.batch_key)
        self.model.generate(
            **inputs,
            **{**self.generator.generate_kwargs, **first.generate_kwargs()},
            max_new_tokens=max(job.request.max_tokens for job in jobs),
            num_return_sequences=sampled_choices,
            stopping_criteria=StoppingCriteriaList([progress]),
            logits_processor=with_non_finite_check(None, names),
        )
        self._count(*progress.finish())


__all__ = ["BatchProgress", "BatchScheduler", "Job", "QueueFull"]
