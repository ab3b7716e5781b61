"""Training batches: `TrainingDataCollator` (any family, through its `training_inputs`) and, for Audio Flamingo 2,
AF2's training text, its label rule, right padding and padded audio windows.

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
    IGNORE_INDEX,  # noqa: F401 - re-exported
    af2_labels,
    build_training_text,
)
from ..processing.training_batch import af2_audio_features, af2_training_tokens, max_frames  # noqa: F401

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


class TrainingDataCollator:
    """
    Collates `{"audio", "prompt", "answer"}` examples into a training batch of any model family: the family
    (`families.ModelFamily.training_inputs`) says how an example becomes model inputs and labels (prompt, audio
    and padding -100; the answer and its end of turn trained on).

    Examples may also carry `audio_start` (seconds into the file where the audio begins, as in AF2's dataset JSON)
    and `sampling_rate` (for a bare array). Other keys (`length`, `num_windows`, ...) are ignored. `audio` may be a
    path, encoded bytes, a float array (with `sampling_rate`), a `datasets` Audio dict (`{"array",
    "sampling_rate"}`, `{"bytes", "path"}` or `{"path"}`) or a torchcodec `AudioDecoder`. Audio is read and turned
    into features here, so with `dataloader_num_workers > 0` this happens in the data loader workers. With a plain
    `Trainer`, pass `TrainingArguments(remove_unused_columns=False)` so that these columns reach the collator
    (`AudioFlamingo2Trainer` always keeps them).

    Args:
        family (`ModelFamily`): the family adapter, bound to the checkpoint's processor.
        max_length (`int`, defaults to 512): token limit of a sample; a longer sample's answer is not trained on.
        pad_to_multiple_of (`int`, *optional*): pad the token length of each batch to a multiple of this.
        sampling_rate (`int`, *optional*): rate of bare array inputs (arrays in dicts carry their own).
        audio_key, prompt_key, answer_key (`str`): the examples' keys.

    Returns (from `__call__`): a dict of tensors `input_ids`, `attention_mask`, `labels` `(batch, tokens)`, right
    padded, and the family's audio features (see its `training_inputs`).
    """

    def __init__(
        self,
        family,
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
                f"{type(self).__name__} returns torch tensors only (return_tensors='pt'), got {return_tensors!r}."
            )
        self.family = family
        self.processor = family.processor
        self.tokenizer = family.processor.tokenizer
        self.max_length = max_length
        self.pad_to_multiple_of = pad_to_multiple_of
        self.sampling_rate = sampling_rate
        self.audio_key, self.prompt_key, self.answer_key = audio_key, prompt_key, answer_key

    def audio(self, example: Mapping[str, Any], index: int = 0) -> tuple[Any, float]:
        """`(audio, audio_start)` of one example as the family's `training_inputs` takes them."""
        try:
            return example_audio(example, self.audio_key), float(example.get("audio_start") or 0.0)
        except (KeyError, ValueError, TypeError) as error:
            raise ValueError(f"example {index} of the batch: cannot read its audio ({error}).") from error

    def check(self, example: Mapping[str, Any]) -> tuple[int, int]:
        """`(tokens, trainable labels)` of one example (see `ModelFamily.check_training_example`); raises
        `families.UnreadableAudio` when its audio cannot be read."""
        from ..families import UnreadableAudio

        try:
            audio, start = self.audio(example)
        except ValueError as error:
            raise UnreadableAudio(str(error)) from error
        return self.family.check_training_example(
            example[self.prompt_key],
            example[self.answer_key],
            audio,
            audio_start=start,
            max_length=self.max_length,
            sampling_rate=self.sampling_rate,
        )

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError(f"{type(self).__name__} got an empty batch.")
        audios = [self.audio(example, index) for index, example in enumerate(examples)]
        return dict(
            self.family.training_inputs(
                [example[self.prompt_key] for example in examples],
                [example[self.answer_key] for example in examples],
                [audio for audio, _ in audios],
                audio_starts=[start for _, start in audios],
                max_length=self.max_length,
                sampling_rate=self.sampling_rate,
                pad_to_multiple_of=self.pad_to_multiple_of,
            )
        )


class AudioFlamingo2DataCollator(TrainingDataCollator):
    """
    `TrainingDataCollator` for [`AudioFlamingo2ForConditionalGeneration`], built from its processor: AF2's training
    text, label rule, right padding with `<|PAD_TOKEN|>`, and windows padded to the batch's largest
    (`input_features` `(batch, windows, frames, mels)`, `input_features_mask` `(batch, windows)`).

    Args:
        processor (`AudioFlamingo2Processor`): gives the tokenizer (with AF2's tokens) and the audio front end.
        max_length (`int`, defaults to 512): the original's `max_tokens`; longer samples are truncated and, as in the
            original, their cut answer is not trained on.
        Other arguments: see `TrainingDataCollator`.
    """

    def __init__(self, processor, max_length: int = 512, **options):
        from ..families import AudioFlamingo2Family

        super().__init__(AudioFlamingo2Family(processor), max_length=max_length, **options)
        self.feature_extractor = processor.feature_extractor
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
        texts = [self.text(example) for example in examples]
        return af2_training_tokens(self.processor, texts, self.max_length, self.pad_to_multiple_of)

    def audio_features(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """`input_features`, `input_features_mask` for the examples' audio (windows padded to the batch's largest)."""
        audios = [self.audio(example, index) for index, example in enumerate(examples)]
        return af2_audio_features(
            self.feature_extractor, [a for a, _ in audios], [s for _, s in audios], self.sampling_rate
        )


__all__ = [
    "AudioFlamingo2DataCollator",
    "TrainingDataCollator",
    "af2_audio_features",
    "af2_labels",
    "af2_training_tokens",
    "build_training_text",
    "example_audio",
]
