"""
The one seam between evaluation and generation: `AnswerGenerator` answers a batch of (audio, question) pairs.

`BatchedAnswerGenerator` is a plain batched loop over `model.generate` (left padding, greedy by default). The runner
only calls `generator(audios, questions)`, so a faster engine (data-parallel, look-ahead audio reading) plugs in as
another class with the same call.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class AnswerGenerator(Protocol):
    settings: dict

    def __call__(self, audios: Sequence[str], questions: Sequence[str]) -> list[str]:
        """One answer per (audio path, question), in order: the family's answer text (AF2: after `<SEP>`; AF3/MF:
        after any `<think>` reasoning), special tokens removed."""


class BatchedAnswerGenerator:
    """
    Answers with `model.generate` on whole batches, through the model's family (see `transformers_af2.families`):
    for AF2 the processor writes its prompt (`<audio>` + lower-cased, stripped question + `<SEP>`) and generation
    stops at the tokenizer's eos, as the original's evaluation does; for AF3 / Music Flamingo the processor's chat
    template writes it and generation stops at the end of the turn. Batches are left-padded. `settings` are the
    `generate` arguments (see `tasks.GENERATION_SETTINGS`).
    """

    def __init__(self, model, processor, settings: dict):
        from ..families import family_for

        self.model = model
        self.family = family_for(model, processor)
        self.settings = dict(settings)

    def __call__(self, audios: Sequence, questions: Sequence[str], sampling_rate: int | None = None) -> list[str]:
        """`audios`: paths, or waveforms at `sampling_rate` (as the family's front end takes them)."""
        if len(audios) != len(questions):
            raise ValueError(f"got {len(audios)} audios for {len(questions)} questions.")
        return self.family.answer(self.model, list(questions), list(audios), self.settings, sampling_rate)
