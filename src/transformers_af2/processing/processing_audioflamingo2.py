"""Processor of Audio Flamingo 2: the audio front end plus the Qwen2.5 tokenizer with AF2's tokens."""

from __future__ import annotations

from transformers import BatchFeature, ProcessorMixin
from transformers.utils import logging

logger = logging.get_logger(__name__)

AUDIO_TOKEN = "<audio>"
SEP_TOKEN = "<SEP>"
END_OF_CHUNK_TOKEN = "<|endofchunk|>"


class AudioFlamingo2Processor(ProcessorMixin):
    r"""
    Turns questions and audio into model inputs, the way AF2's inference script does.

    A plain question becomes AF2's prompt: `"<audio>" + question.lower().strip() + "<SEP>"`. A text that already
    contains `<audio>` is used as given (for prompts built by hand or by a chat template). Prompts are left-padded so
    that a batch can be passed to `generate` as is.

    Args:
        feature_extractor (`AudioFlamingo2FeatureExtractor`): the audio front end.
        tokenizer: the base Qwen2.5 tokenizer with `<audio>`, `<|endofchunk|>`, `<|PAD_TOKEN|>` and `<SEP>` added.
        max_prompt_length (`int`, defaults to 512): the original's prompt limit; longer prompts are cut with a
            warning (their `<SEP>` is then lost and the answer is unreliable).
    """

    # Sub-processors resolve through the Auto classes (AutoFeatureExtractor is registered on import).
    attributes = ["feature_extractor", "tokenizer"]

    def __init__(self, feature_extractor=None, tokenizer=None, chat_template=None, max_prompt_length: int = 512):
        self.max_prompt_length = max_prompt_length
        super().__init__(feature_extractor, tokenizer, chat_template=chat_template)

    @property
    def audio_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(AUDIO_TOKEN)

    def build_prompt(self, question: str) -> str:
        """AF2's inference prompt for a plain question; text already holding `<audio>` is returned unchanged."""
        if not isinstance(question, str):
            raise TypeError(f"text must be a string or a list of strings; got {type(question).__name__}.")
        if AUDIO_TOKEN in question:
            return question
        return f"{AUDIO_TOKEN}{question.lower().strip()}{SEP_TOKEN}"

    def __call__(
        self,
        text: str | list[str] | None = None,
        audio=None,
        sampling_rate: int | None = None,
        return_tensors: str | None = "pt",
        padding_side: str = "left",
        **kwargs,
    ) -> BatchFeature:
        """
        Args:
            text: a question or a list of questions, one per audio.
            audio: a file path or 1-D float array (with `sampling_rate`), or a list of them.
            sampling_rate: rate of array inputs.
            padding_side: "left" (for generation, the default) or "right" (for training).

        Returns:
            `BatchFeature` with `input_ids`, `attention_mask` (batch, seq) and, with audio, `input_features`
            (batch, windows, frames, mels) and `input_features_mask` (batch, windows).
        """
        if text is None and audio is None:
            raise ValueError("AudioFlamingo2Processor needs text, audio, or both.")
        data = {}
        texts = None
        if text is not None:
            texts = [text] if isinstance(text, str) else list(text)
            prompts = [self.build_prompt(t) for t in texts]
            encoded = self.tokenizer(prompts, padding=False, truncation=False, return_tensors=None)
            self._check_prompts(encoded, expect_audio=audio is not None)
            data.update(self.tokenizer.pad(encoded, padding_side=padding_side, return_tensors=return_tensors))
        if audio is not None:
            audios = audio if isinstance(audio, (list, tuple)) else [audio]
            if texts is not None and len(texts) != len(audios):
                raise ValueError(
                    f"got {len(texts)} texts but {len(audios)} audios: AF2 takes exactly one audio per text."
                )
            features = self.feature_extractor(audios, sampling_rate=sampling_rate, return_tensors=return_tensors)
            data.update(features)
        return BatchFeature(data=data, tensor_type=return_tensors)

    def _check_prompts(self, encoded, expect_audio: bool) -> None:
        """One `<audio>` per prompt when audio is given; prompts over the limit are cut (in place) with a warning."""
        audio_id = self.audio_token_id
        for index, ids in enumerate(encoded["input_ids"]):
            count = ids.count(audio_id)
            if expect_audio and count != 1:
                raise ValueError(
                    f"text at batch index {index} holds {count} {AUDIO_TOKEN} tokens; AF2 takes exactly one audio "
                    f"per prompt, marked by one {AUDIO_TOKEN}."
                )
            if len(ids) > self.max_prompt_length:
                logger.warning(
                    f"text at batch index {index} is {len(ids)} tokens; AF2 was trained on prompts of at most "
                    f"{self.max_prompt_length}. Keeping the first {self.max_prompt_length} (the original did the "
                    "same); shorten the question for a reliable answer."
                )
                for values in encoded.values():
                    del values[index][self.max_prompt_length :]

    def batch_decode(self, *args, **kwargs):
        """Decodes generated ids; pass `generated[:, prompt_length:]` and `skip_special_tokens=True` for answers."""
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    @property
    def model_input_names(self):
        return ["input_ids", "attention_mask", "input_features", "input_features_mask"]


__all__ = ["AudioFlamingo2Processor"]
