"""
What every model family tells the shared commands (`af2 caption`, `af2 eval`, `af2 demo`, and the server): how a
(question, audio) pair becomes model inputs, how much of a clip the model hears, how an answer is read back from the
generated ids, and which prompt each benchmark's authors use. The engine never asks which family it runs.

A family is one subclass of `ModelFamily`, registered under its checkpoints' `config.json` `model_type`
(`families.register`). An instance holds the loaded processor; the model is always passed in.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import soundfile as sf
import torch


class UnreadableAudio(ValueError):
    """A training example's audio cannot be read (`ModelFamily.check_training_example`)."""


@dataclass
class EncodedAudio:
    """
    One clip as its family's front end reads it, computed once (in a DataLoader worker, or once per clip in the demo)
    and reused for every question about it.

    `features`: the tensors the family's `batch_inputs` joins into a batch (AF2: `input_features` (windows, frames,
    mels); AF3/MF: `input_features` (windows, mels, frames), `input_features_mask` (windows, frames) and the clip's
    audio token ids). `windows`: windows the model reads. `seconds`: the clip's duration (None when the file's
    header cannot tell). `seconds_dropped`: audio past the last window the model reads.
    """

    features: dict
    windows: int
    seconds: float | None
    seconds_dropped: float


@dataclass(frozen=True)
class EvalPrompt:
    """A benchmark prompt as a family's authors publish it: a `str.format` template over the task's item fields
    (see `evaluation.tasks.EvalTask.build_prompt`; `af2 eval` records it as the run's `prompt_template`) and where
    it comes from."""

    template: str
    source: str


class ModelFamily:
    """
    One model family behind the shared commands. Subclasses set the class attributes and implement the methods that
    raise `NotImplementedError`; everything the engine needs goes through here.
    """

    model_types: ClassVar[tuple[str, ...]] = ()
    display_name: ClassVar[str] = ""
    short_name: ClassVar[str] = ""
    # Loggers whose per-clip warnings the caption rows already carry (`seconds_dropped`): quiet in reader workers.
    per_clip_loggers: ClassVar[tuple[str, ...]] = ()
    # Benchmark prompts as the family's authors publish them, by task name; other tasks use the task's own prompt.
    eval_prompts: ClassVar[dict[str, EvalPrompt]] = {}
    # True when the answers follow AF2-SoundCoT's <REASONING>/<CONCLUSION> form and its repair pass applies.
    supports_soundcot_repair: ClassVar[bool] = False
    # True for AF2 alone: this package's pipeline (`af2 generate`, `pipeline("audio-text-to-text")`) is AF2's.
    has_af2_pipeline: ClassVar[bool] = False
    # Why `af2 train` cannot fine-tune this family (None: it can), said to the user as the refusal.
    training_unsupported: ClassVar[str | None] = None
    # What `af2 train` can train in this family besides LoRA adapters: stage names of `trainer.stages.STAGES`, LoRA
    # targets of `trainer.lora.LORA_TARGETS`, and whether new token rows of the embedding matrix train (AF2's).
    training_stages: ClassVar[tuple[str, ...]] = ()
    lora_targets: ClassVar[tuple[str, ...]] = ()
    trains_new_embedding_rows: ClassVar[bool] = False

    def __init__(self, processor):
        self.processor = processor

    # -- loading ---------------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, model_id: str, dtype=None, original_config: str | None = None, **from_pretrained_options):
        """`(model, processor)` of a checkpoint of this family (model in eval mode, on the CPU unless
        `from_pretrained_options` place it: `device_map`, `quantization_config`, `attn_implementation`, ...)."""
        raise NotImplementedError

    # -- what the model hears --------------------------------------------------------------------------------------
    @property
    def window_seconds(self) -> float:
        """Seconds of audio per window the audio encoder reads."""
        raise NotImplementedError

    @property
    def max_windows(self) -> int:
        """The most windows of one clip the model reads; later audio is dropped."""
        raise NotImplementedError

    @property
    def max_seconds(self) -> float:
        """Seconds of a clip the model hears at most."""
        return self.window_seconds * self.max_windows

    @property
    def sampling_rate(self) -> int:
        return int(self.processor.feature_extractor.sampling_rate)

    def coverage(self, seconds: float | None) -> tuple[int, float]:
        """(windows read, seconds dropped) for a clip of `seconds` (the non-overlapping-window families)."""
        if seconds is None:
            raise ValueError("the clip's duration is unknown")
        windows = min(self.max_windows, max(1, math.ceil(round(seconds * self.sampling_rate) / self.window_samples)))
        return windows, round(max(0.0, seconds - self.max_seconds), 3)

    @property
    def window_samples(self) -> int:
        return int(round(self.window_seconds * self.sampling_rate))

    # -- inputs ----------------------------------------------------------------------------------------------------
    def encode_audio(self, audio, sampling_rate: int | None = None) -> EncodedAudio:
        """One clip (a path, encoded bytes, a `datasets` audio dict, or a waveform with `sampling_rate`) read by the
        family's front end: the per-clip part of the model inputs."""
        raise NotImplementedError

    def check_questions(self, questions: Sequence[str]) -> None:
        """Raises `ValueError` naming a question the family cannot ask (checked once, before a run)."""

    def prompt_overflow(self, question: str) -> str | None:
        """Why `question` is longer than the family's processor takes without cutting it (a server refuses it rather
        than answer a cut question), or None."""
        return None

    def batch_inputs(self, questions: Sequence[str], clips: Sequence[EncodedAudio]):
        """The model inputs (a `BatchFeature` on the CPU, text left-padded) of `questions[i]` about `clips[i]`."""
        raise NotImplementedError

    def inputs(self, questions: Sequence[str], audios: Sequence, sampling_rate: int | None = None):
        """`batch_inputs` from raw audio (see `encode_audio`) or clips already encoded (`EncodedAudio`, e.g. by a
        server when it admitted the request)."""
        clips = [a if isinstance(a, EncodedAudio) else self.encode_audio(a, sampling_rate) for a in audios]
        return self.batch_inputs(questions, clips)

    def to_model(self, batch, model):
        """The batch on the model's device (and, where the family needs it, in its dtype)."""
        return batch.to(model.device)

    # -- one clip, many questions (the demo) --------------------------------------------------------------------------
    def clip_state(self, model, clip: EncodedAudio):
        """What the model itself can compute once per clip and reuse for every question about it (None: nothing
        beyond the clip's features)."""
        return None

    def question_inputs(self, model, question: str, clip: EncodedAudio, state) -> dict:
        """The `generate` arguments for one question about `clip` (with `state` from `clip_state`)."""
        return dict(self.to_model(self.batch_inputs([question], [clip]), model))

    def spectrogram(self, clip: EncodedAudio) -> np.ndarray:
        """The clip's log-mel windows as the model reads them, (windows, frames, mels), for pictures."""
        raise NotImplementedError

    # -- answers ---------------------------------------------------------------------------------------------------
    def stop_kwargs(self, model) -> dict:
        """The `eos_token_id` / `pad_token_id` arguments of `generate` for this family."""
        config = model.generation_config
        return {"eos_token_id": config.eos_token_id, "pad_token_id": config.pad_token_id}

    @classmethod
    def default_max_new_tokens(cls, model) -> int:
        """Most new tokens when the user gives none: the checkpoint's generation config (never the top-level config's
        `max_position_embeddings`, which for Music Flamingo is a rotary period in seconds)."""
        value = model.generation_config.max_new_tokens
        if value is None:
            raise ValueError(
                f"{model.name_or_path or cls.display_name}: its generation config sets no max_new_tokens; give "
                "one (--max-new-tokens N)."
            )
        return int(value)

    def decode_answers(self, new_tokens) -> list[str]:
        """The answer text of each row of generated ids (prompt removed)."""
        raise NotImplementedError

    def eval_prompt(self, task: str) -> EvalPrompt | None:
        """The family's own prompt for benchmark `task`, or None to use the task's."""
        return self.eval_prompts.get(task)

    # -- training (`af2 train`, `trainer.TrainingDataCollator`) --------------------------------------------------------
    def training_inputs(
        self,
        prompts: Sequence[str],
        answers: Sequence[str],
        audios: Sequence,
        audio_starts: Sequence[float] | None = None,
        max_length: int = 512,
        sampling_rate: int | None = None,
        pad_to_multiple_of: int | None = None,
    ) -> dict:
        """
        The training batch of `prompts[i]` about `audios[i]` answered by `answers[i]` (audio as `encode_audio` takes
        it, read from `audio_starts[i]` seconds on): `input_ids`, `attention_mask`, `labels` (batch, tokens), right
        padded, labels -100 on the prompt, the audio and the padding and the token ids on the answer and its end of
        turn, plus the family's audio features. A sample over `max_length` tokens has its answer cut and not
        trained on (a warning says so).
        """
        raise NotImplementedError

    def check_training_example(
        self,
        prompt: str,
        answer: str,
        audio,
        audio_start: float = 0.0,
        max_length: int = 512,
        sampling_rate: int | None = None,
    ) -> tuple[int, int]:
        """`(tokens, trainable labels)` of one training example: its full token count and how many labels
        `training_inputs` leaves it under `max_length`. Raises `UnreadableAudio` when the audio cannot be read."""
        raise NotImplementedError

    def training_windows(self, audio, audio_start: float = 0.0) -> int:
        """Windows the model reads of a training clip, from the file header (1 when it cannot tell: reading the
        audio reports the error); the readers' `length` column sorts on it."""
        seconds = source_seconds(audio)
        if seconds is None:
            return 1
        return self.coverage(max(0.0, seconds - float(audio_start or 0.0)))[0]

    @torch.inference_mode()
    def answer(self, model, questions: Sequence[str], audios: Sequence, generate_kwargs: dict, sampling_rate=None):
        """
        One batched `generate` call: the answer to `questions[i]` about `audios[i]` (see `encode_audio` for the audio
        forms), greedy unless `generate_kwargs` sample. Rows never influence each other (left padding, masks), so
        each answer equals the one-at-a-time answer (checked per family by the tests).
        """
        if len(questions) != len(audios):
            raise ValueError(f"got {len(audios)} audios for {len(questions)} questions.")
        batch = self.to_model(self.inputs(questions, audios, sampling_rate), model)
        generated = model.generate(**batch, **{**self.stop_kwargs(model), **generate_kwargs})
        return self.decode_answers(generated[:, batch["input_ids"].shape[1] :])


# ---------------------------------------------------------------------------------------------------------------------
# audio: durations, and decoding for the families whose processors take waveforms
# ---------------------------------------------------------------------------------------------------------------------


def source_seconds(audio) -> float | None:
    """Duration of an audio input in seconds (from the header for encoded audio), None when unknown."""
    if isinstance(audio, dict):
        if audio.get("array") is not None and audio.get("sampling_rate"):
            return len(audio["array"]) / audio["sampling_rate"]
        audio = audio.get("bytes") or audio.get("path")
    if isinstance(audio, (bytes, bytearray)):
        audio = io.BytesIO(audio)
    if not isinstance(audio, (str, os.PathLike, io.IOBase)):
        return None
    try:
        info = sf.info(audio)
    except Exception:  # the front end has read it; a header it cannot give means "unknown", not an error
        return None
    return info.frames / info.samplerate if info.samplerate else None


def decode_mono(audio, sampling_rate: int | None, target_rate: int, max_seconds: float) -> tuple[np.ndarray, float]:
    """
    `(waveform, seconds)`: the first `max_seconds` of `audio` as float32 mono at `target_rate` (channels averaged,
    as ffmpeg's `-ac 1` does for Whisper-style front ends), and the full duration of the input in seconds.

    `audio`: a path, encoded bytes or a binary file object (anything libsndfile reads), a `datasets` audio dict,
    or a 1-D / (samples, channels) float array with `sampling_rate`.
    """
    import soxr

    if isinstance(audio, dict):
        if audio.get("array") is not None:
            return decode_mono(audio["array"], audio.get("sampling_rate", sampling_rate), target_rate, max_seconds)
        source = audio.get("bytes") if audio.get("bytes") is not None else audio.get("path")
        if source is None:
            raise ValueError("an audio dict needs 'array' + 'sampling_rate', 'bytes' or 'path'.")
        return decode_mono(source, None, target_rate, max_seconds)
    if isinstance(audio, (str, os.PathLike, bytes, bytearray)) or hasattr(audio, "read"):
        name = str(audio) if isinstance(audio, (str, os.PathLike)) else "audio"
        source = io.BytesIO(audio) if isinstance(audio, (bytes, bytearray)) else audio
        try:
            with sf.SoundFile(source) as handle:
                rate, total = handle.samplerate, handle.frames
                data = handle.read(min(total, int(math.ceil(max_seconds * rate))), dtype="float32", always_2d=True)
        except (sf.LibsndfileError, RuntimeError, TypeError) as error:
            raise ValueError(f"{name}: cannot decode this audio ({error}).") from error
        data = data.mean(axis=1)
    else:
        if sampling_rate is None:
            raise ValueError("sampling_rate is required with array input (pass sampling_rate=... in Hz).")
        if isinstance(audio, torch.Tensor):
            audio = audio.detach().float().cpu().numpy()
        data = np.asarray(audio, dtype=np.float32)
        if data.ndim == 2:
            data = data.mean(axis=1 if data.shape[1] < data.shape[0] else 0)
        if data.ndim != 1:
            raise ValueError(f"expected a mono waveform or (samples, channels), got shape {data.shape}.")
        rate, total = int(sampling_rate), len(data)
        data = data[: int(math.ceil(max_seconds * rate))]
    if total == 0:
        raise ValueError("the audio is empty (0 samples).")
    if not np.isfinite(data).all():
        raise ValueError("the audio contains NaN or infinite samples; clean or replace them first.")
    if rate != target_rate:
        data = soxr.resample(data, rate, target_rate, quality="HQ").astype(np.float32)
    data = data[: int(round(max_seconds * target_rate))]
    return data, total / rate
