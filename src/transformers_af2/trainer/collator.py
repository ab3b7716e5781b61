"""Batches for training Audio Flamingo 2: AF2's training text, its label rule, right padding, padded audio windows.

The text of one example is the original training code's

    "<audio>" + prompt.lower().strip() + "<SEP>" + answer.lower().strip() + "<|endofchunk|>" + eos

tokenised with truncation to `max_length` (512 in the original), right-padded with `<|PAD_TOKEN|>`. Its labels are
the token ids with -100 everywhere except the answer (the tokens after `<SEP>` up to and including
`<|endofchunk|>`) and every eos; the text and the rule are the processor's (`AudioFlamingo2Processor.build_training_text`
and `.training_labels`, see `af2_labels` in `processing_audioflamingo2` for the exact rule).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from transformers.utils import logging

# AF2's text conventions live with the processor; imported here for the collator and for backward compatibility.
from ..processing.processing_audioflamingo2 import (
    AUDIO_TOKEN,
    END_OF_CHUNK_TOKEN,
    IGNORE_INDEX,
    af2_labels,
    build_training_text,
)

logger = logging.get_logger(__name__)


def example_audio(example: Mapping[str, Any], audio_key: str, sampling_rate_key: str = "sampling_rate"):
    """The example's audio as an input of the feature extractor (which reads and checks it): a torchcodec
    `AudioDecoder` is decoded, a bare array paired with the example's `sampling_rate`, the rest passed on."""
    audio = example[audio_key]
    if hasattr(audio, "get_all_samples"):
        # datasets >= 4 decodes Audio columns into torchcodec AudioDecoder objects.
        samples = audio.get_all_samples()
        return {"array": samples.data.cpu().numpy(), "sampling_rate": int(samples.sample_rate)}
    if isinstance(audio, Mapping):
        return dict(audio)
    if isinstance(audio, (str, os.PathLike, bytes, bytearray)):
        return audio
    if example.get(sampling_rate_key) is not None:
        return {"array": audio, "sampling_rate": int(example[sampling_rate_key])}
    return audio


def max_frames(feature_extractor, rate: int) -> int:
    """Frames of a `rate` Hz source the windows can use: `max_num_window * (window - overlap) + overlap` seconds, as
    the original reads."""
    seconds = (
        feature_extractor.max_num_window * (feature_extractor.window_length - feature_extractor.window_overlap)
        + feature_extractor.window_overlap
    )
    return int(seconds * rate)


class AudioFlamingo2DataCollator:
    """
    Collates `{"audio", "prompt", "answer"}` examples into a training batch for
    [`AudioFlamingo2ForConditionalGeneration`], with AF2's training text and label rule.

    Examples may also carry `audio_start` (seconds into the file where the audio begins, as in the original's
    dataset JSON) and `sampling_rate` (for a bare array). Other keys (`length`, `num_windows`, ...) are ignored.
    `audio` may be a path, encoded bytes, a float array (with `sampling_rate`), a `datasets` Audio dict
    (`{"array", "sampling_rate"}`, `{"bytes", "path"}` or `{"path"}`) or a torchcodec `AudioDecoder`. Audio is read
    and turned into log-mel windows here, so with `dataloader_num_workers > 0` this happens in the data loader
    workers. With a plain `Trainer`, pass `TrainingArguments(remove_unused_columns=False)` so that these columns reach
    the collator (`AudioFlamingo2Trainer` always keeps them).

    Args:
        processor (`AudioFlamingo2Processor`): gives the tokenizer (with AF2's tokens) and the audio front end.
        max_length (`int`, defaults to 512): token limit of a sample (the original's `max_tokens`); longer samples are
            truncated and, as in the original, their cut answer is not trained on.
        pad_to_multiple_of (`int`, *optional*): pad the token length of each batch to a multiple of this.
        sampling_rate (`int`, *optional*): rate of bare array inputs (arrays in dicts carry their own).
        audio_key, prompt_key, answer_key (`str`): the examples' keys.

    Returns (from `__call__`): a dict of tensors `input_ids`, `attention_mask`, `labels` `(batch, tokens)` and
    `input_features` `(batch, windows, frames, mels)`, `input_features_mask` `(batch, windows)`, windows padded to
    the batch's largest.
    """

    def __init__(
        self,
        processor,
        max_length: int = 512,
        pad_to_multiple_of: int | None = None,
        sampling_rate: int | None = None,
        audio_key: str = "audio",
        prompt_key: str = "prompt",
        answer_key: str = "answer",
        return_tensors: str = "pt",
    ):
        if return_tensors != "pt":
            raise ValueError(
                f"AudioFlamingo2DataCollator returns torch tensors only (return_tensors='pt'), got {return_tensors!r}."
            )
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.feature_extractor = processor.feature_extractor
        self.max_length = max_length
        self.pad_to_multiple_of = pad_to_multiple_of
        self.sampling_rate = sampling_rate
        self.audio_key, self.prompt_key, self.answer_key = audio_key, prompt_key, answer_key
        tokenizer = self.tokenizer
        self.audio_token_id = self._token_id(AUDIO_TOKEN)
        self.end_of_chunk_token_id = self._token_id(END_OF_CHUNK_TOKEN)
        if tokenizer.sep_token is None or tokenizer.eos_token is None or tokenizer.pad_token is None:
            raise ValueError(
                "the tokenizer needs AF2's sep (<SEP>), eos and pad (<|PAD_TOKEN|>) tokens: use the processor of a "
                "converted AF2 checkpoint."
            )
        self.sep_token_id = tokenizer.sep_token_id
        self.eos_token_id = tokenizer.eos_token_id
        self.pad_token_id = tokenizer.pad_token_id

    def _token_id(self, token: str) -> int:
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == self.tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {token} token: use the processor of a converted AF2 checkpoint.")
        return token_id

    def text(self, example: Mapping[str, Any]) -> str:
        """The training text of one example."""
        return self.processor.build_training_text(example[self.prompt_key], example[self.answer_key])

    def tokenize(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """`input_ids`, `attention_mask`, `labels` for the examples' texts (right padding)."""
        encoded = self.tokenizer(
            [self.text(example) for example in examples],
            max_length=self.max_length,
            truncation=True,
            padding=False,
        )["input_ids"]
        width = max(len(ids) for ids in encoded)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(encoded), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
        labels = torch.full((len(encoded), width), IGNORE_INDEX, dtype=torch.long)
        for row, ids in enumerate(encoded):
            if len(ids) == self.max_length and ids[-1] != self.eos_token_id:
                logger.warning_once(
                    f"a training sample is longer than max_length={self.max_length} tokens and was cut; as in the "
                    "original, its answer is not trained on. Shorten the prompt or raise max_length."
                )
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, : len(ids)] = 1
            labels[row, : len(ids)] = torch.tensor(self.processor.training_labels(ids), dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    def audio_features(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """`input_features`, `input_features_mask` for the examples' audio (windows padded to the batch's largest)."""
        audios, starts = [], []
        for index, example in enumerate(examples):
            try:
                audios.append(example_audio(example, self.audio_key))
                starts.append(float(example.get("audio_start") or 0.0))
            except (KeyError, ValueError, TypeError) as error:
                raise ValueError(f"example {index} of the batch: cannot read its audio ({error}).") from error
        # `start` is the original's `audio_start`: the extractor reads from there (first channel, MP3 mixed down).
        features = self.feature_extractor(audios, sampling_rate=self.sampling_rate, start=starts, return_tensors="pt")
        return {
            "input_features": features["input_features"],
            "input_features_mask": features["input_features_mask"],
        }

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("AudioFlamingo2DataCollator got an empty batch.")
        batch = self.tokenize(examples)
        batch.update(self.audio_features(examples))
        return batch


__all__ = ["AudioFlamingo2DataCollator", "af2_labels", "build_training_text", "example_audio"]
