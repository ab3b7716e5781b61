"""
The one seam between evaluation and generation: `AnswerGenerator` answers a batch of (audio, question) pairs.

`BatchedAnswerGenerator` is a plain batched loop over `model.generate` (left padding, greedy by default). The runner
only calls `generator(audios, questions)`, so a faster engine (data-parallel, look-ahead audio reading) plugs in as
another class with the same call.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch


class AnswerGenerator(Protocol):
    settings: dict

    def __call__(self, audios: Sequence[str], questions: Sequence[str]) -> list[str]:
        """One answer per (audio path, question), in order: the text after `<SEP>`, special tokens removed."""


class BatchedAnswerGenerator:
    """
    Answers with `model.generate` on whole batches. The processor writes AF2's prompt (`<audio>` + lower-cased,
    stripped question + `<SEP>`) and left-pads the batch; generation stops at the tokenizer's eos, as the original's
    evaluation does. `settings` are the `generate` arguments (see `tasks.GENERATION_SETTINGS`).
    """

    def __init__(self, model, processor, settings: dict):
        self.model = model
        self.processor = processor
        self.settings = dict(settings)
        tokenizer = processor.tokenizer
        self._special = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}

    @torch.inference_mode()
    def __call__(self, audios: Sequence, questions: Sequence[str], sampling_rate: int | None = None) -> list[str]:
        """`audios`: paths, or waveforms at `sampling_rate` (as the processor takes them)."""
        if len(audios) != len(questions):
            raise ValueError(f"got {len(audios)} audios for {len(questions)} questions.")
        inputs = self.processor(text=list(questions), audio=list(audios), sampling_rate=sampling_rate).to(
            self.model.device
        )
        if "input_features" in inputs:
            inputs["input_features"] = inputs["input_features"].to(self.model.dtype)
        generated = self.model.generate(**inputs, **self._special, **self.settings)
        new_tokens = generated[:, inputs["input_ids"].shape[1] :]
        return self.processor.decode_answers(new_tokens)
