"""
AF2's training batches below the trainer and the family adapters: the token rows and labels of AF2's training texts,
the front end's windows of a batch, and how many windows a clip gives (read from its header, no decoding). The
trainer's collator and data readers and `families.AudioFlamingo2Family` use these; nothing here imports either.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from transformers.utils import logging

from .processing_audioflamingo2 import IGNORE_INDEX

logger = logging.get_logger(__name__)


def max_frames(feature_extractor, rate: int) -> int:
    """Frames of a `rate` Hz source the windows can use: `max_num_window * (window - overlap) + overlap` seconds, as
    the original reads."""
    seconds = (
        feature_extractor.max_num_window * (feature_extractor.window_length - feature_extractor.window_overlap)
        + feature_extractor.window_overlap
    )
    return int(seconds * rate)


def af2_training_tokens(processor, texts: Sequence[str], max_length: int, pad_to_multiple_of: int | None = None):
    """`input_ids`, `attention_mask`, `labels` `(batch, tokens)` of AF2 training texts: truncated to `max_length`,
    right-padded with the pad token, labels by the processor's rule (`training_labels`)."""
    tokenizer = processor.tokenizer
    encoded = tokenizer(list(texts), max_length=max_length, truncation=True, padding=False)["input_ids"]
    width = max(len(ids) for ids in encoded)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(encoded), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
    labels = torch.full((len(encoded), width), IGNORE_INDEX, dtype=torch.long)
    for row, ids in enumerate(encoded):
        if len(ids) == max_length and ids[-1] != tokenizer.eos_token_id:
            logger.warning_once(
                f"a training sample is longer than max_length={max_length} tokens and was cut; as in the "
                "original, its answer is not trained on. Shorten the prompt or raise max_length."
            )
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
        labels[row, : len(ids)] = torch.tensor(processor.training_labels(ids), dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def af2_audio_features(feature_extractor, audios: Sequence, starts: Sequence[float], sampling_rate: int | None = None):
    """`input_features`, `input_features_mask` of AF2's front end (windows padded to the batch's largest); `starts`
    are the original's `audio_start` seconds (the extractor reads from there, first channel, MP3 mixed down)."""
    features = feature_extractor(list(audios), sampling_rate=sampling_rate, start=list(starts), return_tensors="pt")
    return {"input_features": features["input_features"], "input_features_mask": features["input_features_mask"]}


def default_feature_extractor(feature_extractor=None):
    if feature_extractor is not None:
        return feature_extractor
    from ..processing import AudioFlamingo2FeatureExtractor

    return AudioFlamingo2FeatureExtractor()


def audio_duration(audio: Any, audio_start: float = 0.0) -> tuple[int, int]:
    """`(frames, sampling_rate)` of the audio after `audio_start`, read from the file header (no decoding)."""
    import soundfile as sf

    if hasattr(audio, "metadata") and hasattr(audio, "get_all_samples"):  # torchcodec AudioDecoder
        rate = int(audio.metadata.sample_rate)
        frames = round(float(audio.metadata.duration_seconds_from_header or 0.0) * rate)
    elif isinstance(audio, Mapping) and audio.get("array") is not None:
        rate = int(audio["sampling_rate"])
        array = np.asarray(audio["array"])
        frames = array.shape[-1] if array.ndim == 2 and array.shape[0] <= 8 else array.shape[0]
    else:
        source = audio
        if isinstance(audio, Mapping):
            source = io.BytesIO(audio["bytes"]) if audio.get("bytes") is not None else audio.get("path")
        elif isinstance(audio, (bytes, bytearray)):
            source = io.BytesIO(audio)
        info = sf.info(source)
        rate, frames = int(info.samplerate), int(info.frames)
    return max(0, frames - int(float(audio_start or 0.0) * rate)), rate


def count_windows(audio: Any, feature_extractor=None, audio_start: float = 0.0) -> int:
    """The number of windows the feature extractor will make of this audio (1 when the header cannot be read: the
    collator reports the error when the audio is used)."""
    extractor = default_feature_extractor(feature_extractor)
    try:
        frames, rate = audio_duration(audio, audio_start)
    except Exception as error:  # noqa: BLE001 - any unreadable header counts as one window; decoding raises later
        logger.info(f"cannot read the length of {describe_audio(audio)} ({error}); counting it as 1 window.")
        return 1
    frames = min(frames, max_frames(extractor, rate))
    samples = math.ceil(frames * extractor.sampling_rate / rate) if rate != extractor.sampling_rate else frames
    return extractor.num_windows(samples)


def describe_audio(audio: Any) -> str:
    if isinstance(audio, Mapping):
        return str(audio.get("path") or "an in-memory audio")
    return str(audio) if isinstance(audio, (str, os.PathLike)) else type(audio).__name__


__all__ = [
    "af2_audio_features",
    "af2_training_tokens",
    "audio_duration",
    "count_windows",
    "default_feature_extractor",
    "describe_audio",
    "max_frames",
]
