"""Audio Flamingo 2 (this package's `audioflamingo2` model): its processor writes the prompt (`<audio>` + question +
`<SEP>`, no chat template) and reads 10 s windows (12 at most by default); the answer is the text after `<SEP>`."""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import numpy as np
import torch
from transformers.feature_extraction_utils import BatchFeature

from .base import EncodedAudio, ModelFamily, UnreadableAudio, source_seconds


class AudioFlamingo2Family(ModelFamily):
    model_types = ("audioflamingo2",)
    display_name = "Audio Flamingo 2"
    short_name = "AF2"
    per_clip_loggers = ("transformers_af2.processing.feature_extraction_audioflamingo2",)
    supports_soundcot_repair = True
    has_af2_pipeline = True
    # AF2's own prompts are the tasks' (evaluation.tasks documents where each comes from).
    eval_prompts = {}
    training_stages = ("pretrain", "finetune", "long-audio", "full", "none")
    lora_targets = ("language_model", "cross_attention", "audio_transformer")
    trains_new_embedding_rows = True

    @classmethod
    def load(cls, model_id: str, dtype=None, original_config: str | None = None, **from_pretrained_options):
        """A converted repository (local or hub) or an original-layout checkpoint (hub id or directory; converted on
        first use and cached, see `transformers_af2.hub_ids`). `original_config`: the original inference YAML, for
        original-layout directories that lack one."""
        from transformers import AutoProcessor

        from ..convert import cached_conversion, is_original_layout
        from ..modeling import AudioFlamingo2ForConditionalGeneration

        if original_config is not None:
            if not is_original_layout(model_id):
                raise ValueError(
                    f"original_config (--config) is for checkpoints in the original layout; {model_id} is not one."
                )
            model_id = str(cached_conversion(model_id, config=original_config))
        # An original-layout id is converted (once, cached) by these calls themselves: see transformers_af2.hub_ids.
        model = AudioFlamingo2ForConditionalGeneration.from_pretrained(
            model_id, dtype=dtype, **from_pretrained_options
        )
        return model.eval(), AutoProcessor.from_pretrained(model_id)

    @property
    def feature_extractor(self):
        return self.processor.feature_extractor

    @property
    def window_seconds(self) -> float:
        return float(self.feature_extractor.window_length)

    @property
    def max_windows(self) -> int:
        return int(self.feature_extractor.max_num_window)

    @property
    def max_seconds(self) -> float:
        # Windows may overlap: what they cover is the extractor's own count.
        return self.feature_extractor.max_samples / self.feature_extractor.sampling_rate

    def coverage(self, seconds: float | None) -> tuple[int, float]:
        if seconds is None:
            raise ValueError("the clip's duration is unknown")
        windows = self.feature_extractor.num_windows(int(round(seconds * self.feature_extractor.sampling_rate)))
        return windows, round(max(0.0, seconds - self.max_seconds), 3)

    def encode_audio(self, audio, sampling_rate: int | None = None) -> EncodedAudio:
        features = self.feature_extractor(audio, sampling_rate=sampling_rate, return_tensors="pt")
        windows = int(features["input_features_mask"][0].sum())
        if isinstance(audio, (str, os.PathLike, bytes, bytearray, dict)) or hasattr(audio, "read"):
            seconds = source_seconds(audio)
        else:
            seconds = len(audio) / sampling_rate if sampling_rate else None
        dropped = max(0.0, seconds - self.max_seconds) if seconds is not None else 0.0
        return EncodedAudio(
            features={"input_features": features["input_features"][0, :windows]},
            windows=windows,
            seconds=seconds,
            seconds_dropped=round(dropped, 3),
        )

    @functools.cached_property
    def _padding_window(self) -> torch.Tensor:
        # Batch padding windows hold silence, exactly as the feature extractor pads a batch (masked either way).
        extractor = self.feature_extractor
        return extractor.log_mel(torch.zeros(1, extractor.window_samples))[0]

    def check_questions(self, questions: Sequence[str], chunk: int = 1024) -> None:
        """Every prompt must render with exactly one audio token; checked before a run rather than failing every
        batch that holds it."""
        processor = self.processor
        for start in range(0, len(questions), chunk):
            texts = list(questions[start : start + chunk])
            try:
                ids = processor(text=texts, return_tensors=None)["input_ids"]
            except ValueError:  # the processor's own check: name the prompt rather than its index in this chunk
                for prompt in texts:
                    try:
                        processor(text=[prompt], return_tensors=None)
                    except ValueError as error:
                        raise ValueError(f"prompt {prompt!r}: {error}") from None
                raise
            for prompt, row in zip(texts, ids):
                count = row.count(processor.audio_token_id)
                if count != 1:
                    raise ValueError(
                        f"prompt {prompt!r} holds {count} <audio> tokens; AF2 takes exactly one per prompt."
                    )

    def prompt_overflow(self, question: str) -> str | None:
        # The processor keeps the first max_prompt_length tokens of a longer prompt, as the original did.
        processor = self.processor
        length = len(processor.tokenizer(processor.build_prompt(question))["input_ids"])
        if length > processor.max_prompt_length:
            return f"the prompt is {length} tokens; AF2 takes at most {processor.max_prompt_length}"
        return None

    def batch_inputs(self, questions: Sequence[str], clips: Sequence[EncodedAudio]) -> BatchFeature:
        """The processor's text batch (left-padded) with the clips' windows padded as the feature extractor does:
        `input_features` (batch, windows, frames, mels), `input_features_mask` (batch, windows)."""
        batch = self.processor(text=list(questions), return_tensors="pt")
        windows = [clip.features["input_features"] for clip in clips]
        widest = max(w.shape[0] for w in windows)
        padded = self._padding_window.expand(len(windows), widest, -1, -1).clone()
        mask = torch.zeros(len(windows), widest, dtype=torch.long)
        for row, clip_windows in enumerate(windows):
            padded[row, : clip_windows.shape[0]] = clip_windows
            mask[row, : clip_windows.shape[0]] = 1
        batch["input_features"] = padded
        batch["input_features_mask"] = mask
        return batch

    def clip_state(self, model, clip: EncodedAudio) -> dict:
        """
        The audio keys/values of every cross-attention layer, as the model stores them in its cache on the forward
        that brings the audio: one forward over the prompt's first token (`<audio>`) with the clip, of which only
        the audio part of the cache is kept.
        """
        from ..compat import CACHE_KWARG
        from ..modeling import AudioFlamingo2Cache

        device = model.device
        windows = clip.features["input_features"]
        cache = AudioFlamingo2Cache(config=model.config.get_text_config(decoder=True))
        with torch.inference_mode():
            model(
                input_ids=torch.tensor([[self.processor.audio_token_id]], device=device),
                input_features=windows[None].to(device, model.dtype),
                input_features_mask=torch.ones(1, windows.shape[0], dtype=torch.long, device=device),
                use_cache=True,
                logits_to_keep=1,
                **{CACHE_KWARG: cache},
            )
        return dict(cache.audio_states)

    def question_inputs(self, model, question: str, clip: EncodedAudio, state: dict) -> dict:
        """The prompt's ids and a fresh generation cache that already holds the clip's audio keys/values."""
        return self.cached_inputs(model, self.processor(text=[question], return_tensors="pt"), state)

    def cached_inputs(self, model, prompt, state: dict) -> dict:
        """`prompt`'s `input_ids` / `attention_mask` with a fresh generation cache holding the clip's audio states
        (also for the SoundCoT repair pass, whose prompt is ready-made)."""
        from ..compat import CACHE_KWARG
        from ..modeling import AudioFlamingo2Cache

        cache = AudioFlamingo2Cache(config=model.config.get_text_config(decoder=True))
        for layer_idx, states in state.items():
            cache.set_audio_states(layer_idx, *states)
        return {
            "input_ids": prompt["input_ids"].to(model.device),
            "attention_mask": prompt["attention_mask"].to(model.device),
            CACHE_KWARG: cache,
        }

    def spectrogram(self, clip: EncodedAudio) -> np.ndarray:
        return clip.features["input_features"].float().numpy()

    # -- training: the original's text and label rule (trainer.collator) ---------------------------------------------
    def training_inputs(
        self, prompts, answers, audios, audio_starts=None, max_length=512, sampling_rate=None, pad_to_multiple_of=None
    ) -> dict:
        """AF2's training text (`processor.build_training_text`) truncated to `max_length` with the processor's label
        rule, and AF2's windows: `input_features` (batch, windows, frames, mels), `input_features_mask` (batch,
        windows), padded to the batch's largest."""
        from ..processing.training_batch import af2_audio_features, af2_training_tokens

        texts = [self.processor.build_training_text(p, a) for p, a in zip(prompts, answers, strict=True)]
        batch = af2_training_tokens(self.processor, texts, max_length, pad_to_multiple_of)
        starts = audio_starts if audio_starts is not None else [0.0] * len(audios)
        batch.update(af2_audio_features(self.feature_extractor, audios, starts, sampling_rate))
        return batch

    def check_training_example(self, prompt, answer, audio, audio_start=0.0, max_length=512, sampling_rate=None):
        from ..processing.training_batch import af2_training_tokens

        try:
            self.feature_extractor.load_audio(audio, sampling_rate=sampling_rate, start=float(audio_start))
        except Exception as error:  # whatever fails to decode here would fail the run at that step
            raise UnreadableAudio(" ".join(str(error).split()).rstrip(".") or type(error).__name__) from error
        text = self.processor.build_training_text(prompt, answer)
        tokens = len(self.processor.tokenizer(text)["input_ids"])
        labels = af2_training_tokens(self.processor, [text], max_length)["labels"]
        return tokens, int((labels != -100).sum())

    def training_windows(self, audio, audio_start: float = 0.0) -> int:
        from ..processing.training_batch import count_windows

        return count_windows(audio, self.feature_extractor, audio_start)

    def stop_kwargs(self, model) -> dict:
        # The original's evaluation stops at the tokenizer's eos.
        tokenizer = self.processor.tokenizer
        return {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}

    def decode_answers(self, new_tokens) -> list[str]:
        return self.processor.decode_answers(new_tokens)
