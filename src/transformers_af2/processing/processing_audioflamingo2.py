"""Processor of Audio Flamingo 2: the audio front end plus the Qwen2.5 tokenizer with AF2's tokens."""

from __future__ import annotations

import os

from transformers import BatchFeature, ProcessorMixin
from transformers.utils import logging

logger = logging.get_logger(__name__)

AUDIO_TOKEN = "<audio>"
SEP_TOKEN = "<SEP>"
END_OF_CHUNK_TOKEN = "<|endofchunk|>"

# AF2 has no chat format of its own: one user turn renders exactly as the inference prompt,
# `<audio>` + question.lower().strip() + `<SEP>` (the audio token first, wherever the audio item sits), and an
# assistant turn as its text + `<|endofchunk|>` + eos, the training format. Assistant text is not lower-cased so that
# `continue_final_message` (prefilling the answer, as the SoundCoT repair step does) finds it again.
DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{{- raise_exception('Audio Flamingo 2 has no system prompt: put the instruction in the user message.') -}}"
    "{%- endif -%}"
    "{%- set ns = namespace(text='') -%}"
    "{%- if message['content'] is string -%}"
    "{%- set ns.text = message['content'] -%}"
    "{%- else -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'audio' and message['role'] == 'user' -%}<audio>{%- endif -%}"
    "{%- endfor -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'text' -%}"
    "{%- set ns.text = ns.text ~ (' ' if ns.text else '') ~ item['text'] -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- ns.text | lower | trim -}}<SEP>"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- ns.text | trim -}}<|endofchunk|>{{- eos_token -}}"
    "{%- else -%}"
    "{{- raise_exception('Audio Flamingo 2 chats have user and assistant turns only; got role ' ~ message['role']) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

# Keys of an audio content item that hold the audio, in the order transformers reads them.
_AUDIO_ITEM_KEYS = ("audio", "url", "path", "base64")


class AudioFlamingo2Processor(ProcessorMixin):
    r"""
    Turns questions and audio into model inputs, the way AF2's inference script does.

    A plain question becomes AF2's prompt: `"<audio>" + question.lower().strip() + "<SEP>"`. A text that already
    contains `<audio>` is used as given (for prompts built by hand or by a chat template). Prompts are left-padded so
    that a batch can be passed to `generate` as is.

    Chat messages work too: `apply_chat_template(messages, tokenize=True, return_dict=True)` renders the same prompt
    (see `DEFAULT_CHAT_TEMPLATE`) and reads the audio of the messages' `{"type": "audio", ...}` items (`path`, `url`,
    `audio` (path, array, bytes) or `base64`) with this processor's front end.

    Args:
        feature_extractor (`AudioFlamingo2FeatureExtractor`): the audio front end.
        tokenizer: the base Qwen2.5 tokenizer with `<audio>`, `<|endofchunk|>`, `<|PAD_TOKEN|>` and `<SEP>` added.
        chat_template (`str`, *optional*): defaults to `DEFAULT_CHAT_TEMPLATE`, AF2's prompt format.
        max_prompt_length (`int`, defaults to 512): the original's prompt limit; longer prompts are cut with a
            warning (their `<SEP>` is then lost and the answer is unreliable).
    """

    # Sub-processors resolve through the Auto classes (AutoFeatureExtractor is registered on import).
    attributes = ["feature_extractor", "tokenizer"]

    def __init__(self, feature_extractor=None, tokenizer=None, chat_template=None, max_prompt_length: int = 512):
        self.max_prompt_length = max_prompt_length
        if chat_template is None:
            chat_template = DEFAULT_CHAT_TEMPLATE
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

    # -- chat ----------------------------------------------------------------------------------------------------
    def apply_chat_template(
        self,
        conversation,
        chat_template: str | None = None,
        tokenize: bool = False,
        return_dict: bool = False,
        return_tensors: str | None = "auto",
        processor_kwargs: dict | None = None,
        **kwargs,
    ):
        """
        Renders chat messages with AF2's prompt format; with `tokenize=True`, also reads the audio of the messages.

        One user turn with one audio and one text item renders exactly as the plain question does, so
        `apply_chat_template(messages, tokenize=True, return_dict=True)` gives the same `input_ids` as
        `processor(text=question, audio=path)`, plus `input_features` and `input_features_mask` from the audio item.

        Args:
            conversation: a list of `{"role", "content"}` messages, or a list of such conversations (a batch); each
                conversation holds exactly one audio item,
                `{"type": "audio", "path" | "url" | "audio" | "base64": ...}`
                (`"audio"` may be a path, a float array, bytes or a `datasets` audio dict; an array takes its rate from
                the item's `"sampling_rate"` or from `sampling_rate=`, default 16 kHz).
            tokenize: return token ids (and audio features) instead of the prompt string.
            return_dict: with `tokenize=True`, return the whole `BatchFeature` instead of `input_ids` only.
            return_tensors: "pt" (default when tokenizing) or "np".
            processor_kwargs: keyword arguments for `__call__` (`sampling_rate`, `padding_side`).
            kwargs: template options (`add_generation_prompt` and `continue_final_message` behave as in
                transformers); `sampling_rate` and `padding_side` given here go to `__call__` as well.
        """
        processor_kwargs = dict(processor_kwargs or {})
        for key in ("sampling_rate", "padding_side"):
            if key in kwargs:
                processor_kwargs[key] = kwargs.pop(key)
        for key in ("audio_kwargs", "text_kwargs"):
            processor_kwargs.update(processor_kwargs.pop(key, None) or {})
        rendered = super().apply_chat_template(conversation, chat_template=chat_template, tokenize=False, **kwargs)
        if not tokenize:
            return rendered
        if kwargs.get("return_assistant_tokens_mask"):
            raise ValueError("return_assistant_tokens_mask is not supported by AudioFlamingo2Processor.")

        batched = (
            isinstance(conversation, (list, tuple))
            and bool(conversation)
            and (isinstance(conversation[0], (list, tuple)) or hasattr(conversation[0], "messages"))
        )
        conversations = conversation if batched else [conversation]
        prompts = rendered if batched else [rendered]
        audios = [self._audio_of_conversation(messages, index) for index, messages in enumerate(conversations)]
        out = self(
            text=list(prompts),
            audio=audios,
            sampling_rate=processor_kwargs.pop("sampling_rate", None) or self.feature_extractor.sampling_rate,
            return_tensors="pt" if return_tensors in ("auto", None) else return_tensors,
            padding_side=processor_kwargs.pop("padding_side", "left"),
        )
        return out if return_dict else out["input_ids"]

    @staticmethod
    def _audio_of_conversation(messages, index: int):
        """The one audio input of a conversation, ready for the feature extractor (paths stay paths)."""
        messages = getattr(messages, "messages", messages)
        found = []
        for message in messages:
            content = message.get("content") if isinstance(message, dict) else None
            if not isinstance(content, (list, tuple)):
                continue
            for item in content:
                if not isinstance(item, dict) or item.get("type") != "audio":
                    continue
                sources = [(key, item[key]) for key in _AUDIO_ITEM_KEYS if item.get(key) is not None]
                if len(sources) != 1:
                    raise ValueError(
                        f"conversation {index}: an audio item needs exactly one of {list(_AUDIO_ITEM_KEYS)}; got "
                        f"{sorted(k for k in item if k != 'type')}."
                    )
                key, source = sources[0]
                source = _resolve_audio_source(source, is_base64=key == "base64")
                if item.get("sampling_rate") is not None and not isinstance(source, (str, os.PathLike, bytes, dict)):
                    source = {"array": source, "sampling_rate": item["sampling_rate"]}
                found.append(source)
        if len(found) != 1:
            raise ValueError(
                f"conversation {index} holds {len(found)} audio items; AF2 answers about exactly one audio: add one "
                '{"type": "audio", "path": ...} item to the user message.'
            )
        return found[0]

    # -- answers --------------------------------------------------------------------------------------------------
    def decode_answers(self, generated, skip_special_tokens: bool = True, strip: bool = True, **kwargs) -> list[str]:
        """
        AF2's answer of each row, as the original extracts it: the text after the row's last `<SEP>` (all of it when
        the row has none, e.g. for the new tokens only), without eos, pad and `<|endofchunk|>`; stripped unless
        `strip=False`.

        Args:
            generated: `(batch, seq)` or `(seq,)` token ids, e.g. the output of `generate`.
            skip_special_tokens: also drop the other special tokens (`<audio>`, `<SEP>`) from the text.
        """
        if hasattr(generated, "tolist"):
            generated = generated.tolist()
        rows = [generated] if generated and not isinstance(generated[0], (list, tuple)) else list(generated)
        sep_id = self.tokenizer.convert_tokens_to_ids(SEP_TOKEN)
        dropped = {
            self.tokenizer.eos_token_id,
            self.tokenizer.pad_token_id,
            self.tokenizer.convert_tokens_to_ids(END_OF_CHUNK_TOKEN),
        }
        answers = []
        for row in rows:
            row = list(row)
            start = len(row) - row[::-1].index(sep_id) if sep_id in row else 0
            kept = [token for token in row[start:] if token not in dropped]
            text = self.tokenizer.decode(kept, skip_special_tokens=skip_special_tokens, **kwargs)
            answers.append(text.strip() if strip else text)
        return answers

    def post_process_multimodal_output(
        self, generated_outputs, skip_special_tokens=True, generation_mode=None, **kwargs
    ):
        """
        Answers from `generate` outputs (what `pipeline("any-to-any")` shows): see `decode_answers`. Prompt ids give
        "" (nothing follows their `<SEP>`), so the pipeline has no prompt echo to remove.
        """
        if generation_mode not in (None, "text"):
            raise ValueError(f"Audio Flamingo 2 generates text only; got generation_mode={generation_mode!r}.")
        answers = self.decode_answers(generated_outputs, skip_special_tokens=skip_special_tokens, **kwargs)
        is_single = hasattr(generated_outputs, "ndim") and generated_outputs.ndim == 1
        return answers[0] if is_single else answers

    def batch_decode(self, *args, **kwargs):
        """Decodes generated ids; pass `generated[:, prompt_length:]` and `skip_special_tokens=True` for answers."""
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    @property
    def model_input_names(self):
        return ["input_ids", "attention_mask", "input_features", "input_features_mask"]


def _resolve_audio_source(source, is_base64: bool = False):
    """URLs and base64 strings (`data:` URIs or a `base64` item) -> bytes; anything else unchanged (paths stay paths,
    so the front end reads the file itself: first channel, its own resampling)."""
    if not isinstance(source, str):
        return source
    if is_base64 or source.startswith("data:"):
        import base64
        import binascii

        try:
            return base64.b64decode(source.split(",", 1)[1] if source.startswith("data:") else source, validate=True)
        except (binascii.Error, ValueError) as error:
            raise ValueError(f"audio item: not valid base64 ({error}).") from error
    if source.startswith(("http://", "https://")):
        from transformers.audio_utils import _fetch_audio_bytes

        return _fetch_audio_bytes(source)
    return source


__all__ = ["DEFAULT_CHAT_TEMPLATE", "AudioFlamingo2Processor"]
