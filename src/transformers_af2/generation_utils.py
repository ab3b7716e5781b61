"""
Generation safeguards for AF2, built from transformers' own parts.

- `NonFiniteLogitsCheck`: a `LogitsProcessor` that stops `generate` with `NonFiniteLogitsError`, naming the batch row
  and input, when the model's logits hold NaN or +inf (or no finite value at all). Without it, greedy decoding takes
  the arg-max of a NaN row, token 0 ("!"), and sampling fails inside `torch.multinomial` with a message that names
  neither the input nor the cause.
- `honour_max_length`: a user's `max_length` is obeyed although converted checkpoints' generation config sets
  `max_new_tokens` (which `generate` otherwise lets win over `max_length`).
- `through_first_eos`: generated rows cut after their first eos (what follows is `generate`'s padding).
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Sequence

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, TextStreamer


class NonFiniteLogitsError(RuntimeError):
    """The model produced NaN or infinite logits; the message names the batch row and its input."""


class NonFiniteLogitsCheck(LogitsProcessor):
    """
    Raises `NonFiniteLogitsError` when a row of the scores holds NaN or +inf, or has no finite score at all.

    `-inf` alone is legitimate (other processors use it to forbid tokens), so a row is only refused when nothing
    finite is left to choose from. Put the check first in the processor list so that it sees the model's own logits.

    Args:
        input_names: optional, one name per input of the `generate` call (a file name, "audio[2]"); the rows of
            the scores are the inputs in order, each repeated `rows // len(input_names)` times (beams, return
            sequences), so the error can say which input failed.
    """

    def __init__(self, input_names: Sequence[str] | None = None):
        self.input_names = list(input_names) if input_names is not None else None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        # A row's maximum is NaN if it holds a NaN (max propagates NaN), +inf if it holds +inf, -inf if nothing in it
        # is finite, and finite otherwise: one reduction instead of three boolean masks over the vocabulary (for AF2's
        # 151669 logits, 11-14 ms -> 0.3-0.4 ms per step on a loaded 2-core VM; benchmarks/decode_profile.py).
        bad_rows = ~torch.isfinite(scores.amax(dim=-1))
        if bad_rows.any():  # one device sync per step; generate already syncs on its stopping check
            raise NonFiniteLogitsError(self._message(input_ids, scores, bad_rows))
        return scores

    def _message(self, input_ids, scores, bad_rows) -> str:
        rows = bad_rows.nonzero().flatten().tolist()
        row = rows[0]
        nan = int(torch.isnan(scores[row]).sum())
        posinf = int(torch.isposinf(scores[row]).sum())
        what = f"{nan} NaN and {posinf} +inf of {scores.shape[-1]} logits" if nan or posinf else "no finite logit"
        where = f"batch row {row}"
        if self.input_names:
            per_input = max(1, scores.shape[0] // len(self.input_names))
            index = min(row // per_input, len(self.input_names) - 1)
            where += f" ({self.input_names[index]})"
        others = f"; rows {rows} in all" if len(rows) > 1 else ""
        return (
            f"generation stopped: {where} has {what} at sequence position {input_ids.shape[1]}{others}. The model's "
            "weights or this input's audio features hold NaN/inf, or its dtype overflowed (float16): check the "
            "checkpoint and the audio, or load the model in bfloat16 or float32."
        )


def with_non_finite_check(
    processors: LogitsProcessorList | Sequence[LogitsProcessor] | None, input_names: Sequence[str] | None = None
) -> LogitsProcessorList:
    """
    `processors` with a `NonFiniteLogitsCheck` first: a check already in the list is moved to the front (and keeps
    its input names unless `input_names` is given), otherwise a new one is added.
    """
    processors = LogitsProcessorList(processors or [])
    existing = [p for p in processors if isinstance(p, NonFiniteLogitsCheck)]
    rest = [p for p in processors if not isinstance(p, NonFiniteLogitsCheck)]
    check = existing[0] if existing and input_names is None else NonFiniteLogitsCheck(input_names)
    return LogitsProcessorList([check, *rest])


def _user_sets(name: str, user_config: GenerationConfig | None, kwargs: dict) -> bool:
    if kwargs.get(name) is not None:
        return True
    return user_config is not None and getattr(user_config, name, None) is not None


def honour_max_length(
    prepared: GenerationConfig, user_config: GenerationConfig | None, kwargs: dict
) -> GenerationConfig:
    """
    For `generate`: the prepared generation config without the checkpoint's default `max_new_tokens` when the user
    asked for `max_length` (as an argument or in their `generation_config`) and not for `max_new_tokens`.

    `generate` lets `max_new_tokens` win over `max_length`, and the converted checkpoints' generation config sets
    `max_new_tokens`, so a user's `max_length` would never apply. A user who sets both keeps transformers' rule.
    """
    if _user_sets("max_length", user_config, kwargs) and not _user_sets("max_new_tokens", user_config, kwargs):
        prepared.max_new_tokens = None
    return prepared


def generate_kwargs_honouring_max_length(generate_kwargs: dict) -> dict:
    """
    `generate` kwargs in which a user's `max_length` (without `max_new_tokens`) also overrides the model's default
    `max_new_tokens`: `max_new_tokens=None` is passed explicitly (inside a copy of the user's `generation_config`
    when there is one), which `generate` applies on top of the model's generation config.
    """
    user_config = generate_kwargs.get("generation_config")
    if not _user_sets("max_length", user_config, generate_kwargs):
        return generate_kwargs
    if _user_sets("max_new_tokens", user_config, generate_kwargs):
        return generate_kwargs
    if user_config is None:
        return {**generate_kwargs, "max_new_tokens": None}
    user_config = copy.deepcopy(user_config)
    user_config.max_new_tokens = None
    # generate fills unset values from the model's config; a user config with max_new_tokens=None would get 256
    # back, so the explicit None goes in as a kwarg as well.
    return {**generate_kwargs, "generation_config": user_config, "max_new_tokens": None}


def through_first_eos(rows: list[list[int]], eos_token_id) -> list[list[int]]:
    """Each row of generated token ids up to and including its first eos token; a row without one, whole.
    `eos_token_id`: one id or several, as a generation config gives it (None: no eos)."""
    eos_ids = ({eos_token_id} if eos_token_id is None or isinstance(eos_token_id, int) else set(eos_token_id)) - {None}
    return [row[: next((i + 1 for i, token in enumerate(row) if token in eos_ids), len(row))] for row in rows]


class AnswerStreamer(TextStreamer):
    """
    Writes the answer while it is generated: only what follows the prompt's `<SEP>` (so the prefix of a SoundCoT
    repair pass shows too), special tokens skipped, leading whitespace dropped as in the final answer.
    """

    def __init__(self, processor, file=None):
        super().__init__(processor.tokenizer, skip_prompt=False, skip_special_tokens=True)
        self.sep_token_id = processor.sep_token_id
        self.file = file if file is not None else sys.stdout
        self.started = False

    def put(self, value):
        if self.next_tokens_are_prompt:
            self.next_tokens_are_prompt = False
            ids = value[0].tolist() if value.ndim > 1 else value.tolist()
            after = ids[len(ids) - ids[::-1].index(self.sep_token_id) :] if self.sep_token_id in ids else []
            if after:
                super().put(value.new_tensor(after))
            return
        super().put(value)

    def on_finalized_text(self, text: str, stream_end: bool = False):
        if not self.started:
            text = text.lstrip()
            self.started = bool(text)
        self.file.write(text)
        if stream_end:
            self.file.write("\n")
            self.started = False
        self.file.flush()


__all__ = [
    "AnswerStreamer",
    "NonFiniteLogitsCheck",
    "NonFiniteLogitsError",
    "generate_kwargs_honouring_max_length",
    "honour_max_length",
    "through_first_eos",
    "with_non_finite_check",
]
