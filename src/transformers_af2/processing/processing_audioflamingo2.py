"""Processor of Audio Flamingo 2: the audio front end plus the Qwen2.5 tokenizer with AF2's tokens.

This module is the one home of AF2's text conventions: its token strings, the inference prompt, the training text,
the label rule and the answer rule (the text after `<SEP>`). Other modules import them from here.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from transformers import BatchFeature, ProcessorMixin
from transformers.utils import logging

logger = logging.get_logger(__name__)

# AF2's tokens, added to the base Qwen2.5 tokenizer: `ADDED_SPECIAL_TOKENS` as additional special tokens in this order
# (`PAD_TOKEN` is also the pad token), then `SEP_TOKEN` as the sep token. `EOS_TOKEN` is Qwen2.5's own.
AUDIO_TOKEN = "<audio>"
END_OF_CHUNK_TOKEN = "<|endofchunk|>"
PAD_TOKEN = "<|PAD_TOKEN|>"
SEP_TOKEN = "<SEP>"
EOS_TOKEN = "<|endoftext|>"
ADDED_SPECIAL_TOKENS = (AUDIO_TOKEN, END_OF_CHUNK_TOKEN, PAD_TOKEN)
# Label of a position the loss ignores (transformers' and torch's convention).
IGNORE_INDEX = -100


def build_prompt(question: str) -> str:
    """AF2's inference prompt: `<audio>` + the question lower-cased and stripped + `<SEP>`, no chat template."""
    return f"{AUDIO_TOKEN}{question.lower().strip()}{SEP_TOKEN}"


def build_training_text(prompt: Any, answer: Any, sep_token: str = SEP_TOKEN, eos_token: str = EOS_TOKEN) -> str:
    """AF2's training sample text: `<audio>` + prompt + `<SEP>` + answer + `<|endofchunk|>` + eos, lower-cased and
    stripped exactly as the original (`str(x).lower()` then `.strip()`)."""
    prompt_text = str(prompt).lower().strip()
    answer_text = str(answer).lower().strip()
    return f"{AUDIO_TOKEN}{prompt_text}{sep_token}{answer_text}{END_OF_CHUNK_TOKEN}{eos_token}"


def af2_labels(
    input_ids: Sequence[int],
    *,
    audio_token_id: int,
    sep_token_id: int,
    end_of_chunk_token_id: int,
    eos_token_id: int,
    pad_token_id: int | None = None,
    length: int | None = None,
) -> list[int]:
    """
    AF2's label rule for one (unpadded or right-padded) row, as the original training loop computes it.

    1. labels = ids; pad tokens (and positions past `length`, the row's real length) -> -100; the first position
       -> -100; `<audio>` -> -100.
    2. Scan left to right with a flag `mask` that starts True: a position keeps its value only when `mask` is False
       or its value is eos; afterwards `<SEP>` sets `mask = False`, `<|endofchunk|>` sets it back to True. So the
       answer after `<SEP>`, its `<|endofchunk|>`, and every eos count.
    3. A row cut by truncation (its last real label is neither -100, eos, pad nor `<|endofchunk|>`) has its
       trailing kept labels removed back to the previous -100 / eos / `<|endofchunk|>`: a truncated answer teaches
       nothing.
    """
    ids = [int(token) for token in input_ids]
    length = len(ids) if length is None else int(length)
    labels = [IGNORE_INDEX if (pad_token_id is not None and token == pad_token_id) else token for token in ids]
    for position in range(length, len(labels)):
        labels[position] = IGNORE_INDEX
    if labels:
        labels[0] = IGNORE_INDEX
    labels = [IGNORE_INDEX if token == audio_token_id else token for token in labels]

    should_mask = True
    for position, token in enumerate(labels):
        if should_mask and token != eos_token_id:
            labels[position] = IGNORE_INDEX
        if token == sep_token_id:
            should_mask = False
        elif token == end_of_chunk_token_id:
            should_mask = True

    # The original checks the last column of the padded batch; a truncated row always reaches it (it is
    # max_length long), an untruncated one ends in eos or padding, so checking the row's own last token is the same.
    if length > 0 and labels[length - 1] not in (IGNORE_INDEX, eos_token_id, pad_token_id, end_of_chunk_token_id):
        for position in range(length - 1, -1, -1):
            if labels[position] in (IGNORE_INDEX, eos_token_id, end_of_chunk_token_id):
                break
            labels[position] = IGNORE_INDEX
    return labels


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

    A plain question becomes AF2's prompt: `"<audio>" + question.lower().strip() + "<SEP>"`. A question may not
    contain the tokenizer's special tokens (`<audio>`, `<|endoftext|>`, `<|im_start|>`, ...): they would become
    control tokens inside the prompt (a real end of text in the middle of the question), so they are an error that
    names the token. A text that *starts* with `<audio>` is a prompt built by hand (or by `apply_chat_template`) and
    is used as given; it must hold exactly one `<audio>` and one `<SEP>`. Prompts are left-padded so that a batch can
    be passed to `generate` as is.

    Chat messages work too: `apply_chat_template(messages, tokenize=True, return_dict=True)` renders the same prompt
    (see `DEFAULT_CHAT_TEMPLATE`) and reads the audio of the messages' `{"type": "audio", ...}` items (`path`, `url`,
    `audio` (path, array, bytes) or `base64`) with this processor's front end. A conversation is one user message
    with one audio, optionally followed by the assistant's answer; anything else is an error naming the message.

    Training labels: `output_labels=True` (in `__call__` or `apply_chat_template`) adds `labels` by AF2's label rule
    (`af2_labels`: the answer after `<SEP>`, its `<|endofchunk|>` and eos count, nothing else), the rule
    `AudioFlamingo2DataCollator` uses too.

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
        if isinstance(max_prompt_length, bool) or not isinstance(max_prompt_length, int) or max_prompt_length < 2:
            raise ValueError(
                f"AudioFlamingo2Processor: max_prompt_length must be an integer >= 2 (room for <audio> and <SEP>), "
                f"got {max_prompt_length!r}."
            )
        if chat_template is not None and not isinstance(chat_template, str):
            raise ValueError(
                f"AudioFlamingo2Processor: chat_template must be a Jinja template string, got "
                f"{type(chat_template).__name__}."
            )
        self.max_prompt_length = max_prompt_length
        if chat_template is None:
            chat_template = DEFAULT_CHAT_TEMPLATE
        super().__init__(feature_extractor, tokenizer, chat_template=chat_template)

    # -- AF2's tokens ------------------------------------------------------------------------------------------------
    def _token_id(self, token: str) -> int:
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == self.tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {token} token: use the processor of a converted AF2 checkpoint.")
        return token_id

    @property
    def audio_token_id(self) -> int:
        return self._token_id(AUDIO_TOKEN)

    @property
    def sep_token_id(self) -> int:
        return self._token_id(SEP_TOKEN)

    @property
    def end_of_chunk_token_id(self) -> int:
        return self._token_id(END_OF_CHUNK_TOKEN)

    def control_tokens_in(self, text: str) -> list[str]:
        """The tokenizer's added tokens (AF2's and Qwen2.5's control tokens) that occur in `text`."""
        return sorted(token for token in self.tokenizer.get_added_vocab() if token in text)

    # -- prompts -------------------------------------------------------------------------------------------------------
    def build_prompt(self, question: str, name: str = "text") -> str:
        """AF2's inference prompt for a plain question (see `build_prompt`); a text starting with `<audio>` is a
        ready prompt and is returned unchanged after checking it holds one `<audio>` and one `<SEP>`.

        Raises `ValueError` naming the token when the question holds a control token, and `TypeError` for a
        non-string. `name` labels the text in errors (`text[i]` for the i-th of a batch).
        """
        if not isinstance(question, str):
            raise TypeError(f"text must be a string or a list of strings; got {type(question).__name__}.")
        if question.startswith(AUDIO_TOKEN):
            for token in (AUDIO_TOKEN, SEP_TOKEN):
                if question.count(token) != 1:
                    raise ValueError(
                        f"{name} starts with {AUDIO_TOKEN}, so it is used as a ready prompt, but it holds "
                        f"{question.count(token)} {token}; a prompt is {AUDIO_TOKEN} + question + {SEP_TOKEN} "
                        f"(+ answer). Pass the question alone to have the prompt built."
                    )
            return question
        prompt = build_prompt(question)
        found = self.control_tokens_in(prompt[len(AUDIO_TOKEN) : -len(SEP_TOKEN)])
        if found:
            raise ValueError(
                f"{name} contains the special token(s) {found}, which would act as control tokens inside AF2's prompt "
                f"(e.g. a real end of text); remove them from the question."
            )
        return prompt

    def build_training_text(self, prompt: Any, answer: Any) -> str:
        """AF2's training text for a prompt and its answer, with this tokenizer's sep and eos (see
        `build_training_text`)."""
        return build_training_text(prompt, answer, self.tokenizer.sep_token, self.tokenizer.eos_token)

    def training_labels(self, input_ids: Sequence[int], length: int | None = None) -> list[int]:
        """Labels of one unpadded or right-padded row of token ids by AF2's label rule (`af2_labels`) with this
        tokenizer's token ids: -100 except the answer after `<SEP>`, its `<|endofchunk|>` and every eos."""
        tokenizer = self.tokenizer
        if tokenizer.sep_token is None or tokenizer.eos_token is None or tokenizer.pad_token is None:
            raise ValueError(
                "the tokenizer needs AF2's sep (<SEP>), eos and pad (<|PAD_TOKEN|>) tokens: use the processor of a "
                "converted AF2 checkpoint."
            )
        return af2_labels(
            input_ids,
            audio_token_id=self.audio_token_id,
            sep_token_id=tokenizer.sep_token_id,
            end_of_chunk_token_id=self.end_of_chunk_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            length=length,
        )

    def __call__(
        self,
        text: str | list[str] | None = None,
        audio=None,
        sampling_rate: int | None = None,
        return_tensors: str | None = "pt",
        padding_side: str = "left",
        output_labels: bool = False,
        **kwargs,
    ) -> BatchFeature:
        """
        Args:
            text: a question or a list of questions, one per audio; or ready prompts / training texts starting with
                `<audio>`.
            audio: a file path or 1-D float array (with `sampling_rate`), or a list of them.
            sampling_rate: rate of array inputs.
            padding_side: "left" (for generation, the default) or "right" (for training).
            output_labels: also return `labels` by AF2's label rule, for training texts
                (`<audio>` + question + `<SEP>` + answer + `<|endofchunk|>` + eos, see `build_training_text`, or an
                `apply_chat_template` rendering with the assistant's answer). A row without any trainable label (no
                answer after `<SEP>`, or one cut by `max_prompt_length`) is an error naming it.

        Returns:
            `BatchFeature` with `input_ids`, `attention_mask` (batch, seq), with `output_labels` also `labels`
            (batch, seq), and with audio `input_features` (batch, windows, frames, mels) and `input_features_mask`
            (batch, windows).
        """
        if text is None and audio is None:
            raise ValueError("AudioFlamingo2Processor needs text, audio, or both.")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}.")
        if output_labels and text is None:
            raise ValueError("output_labels=True needs text: the training texts whose answers are the labels.")
        data = {}
        texts = None
        if text is not None:
            texts = [text] if isinstance(text, str) else list(text)
            if not texts:
                raise ValueError("text: got an empty list; pass at least one question.")
            prompts = [self.build_prompt(t, name=f"text[{index}]") for index, t in enumerate(texts)]
            encoded = self.tokenizer(prompts, padding=False, truncation=False, return_tensors=None)
            self._check_prompts(encoded, expect_audio=audio is not None)
            data.update(self.tokenizer.pad(encoded, padding_side=padding_side, return_tensors=return_tensors))
            if output_labels:
                labels = [self._row_labels(ids, index) for index, ids in enumerate(encoded["input_ids"])]
                width = max(len(row) for row in labels)
                padding = [[IGNORE_INDEX] * (width - len(row)) for row in labels]
                data["labels"] = [
                    pad + row if padding_side == "left" else row + pad for row, pad in zip(labels, padding)
                ]
        if audio is not None:
            audios = audio if isinstance(audio, (list, tuple)) else [audio]
            if texts is not None and len(texts) != len(audios):
                raise ValueError(
                    f"got {len(texts)} texts but {len(audios)} audios: AF2 takes exactly one audio per text."
                )
            features = self.feature_extractor(audios, sampling_rate=sampling_rate, return_tensors=return_tensors)
            data.update(features)
        return BatchFeature(data=data, tensor_type=return_tensors)

    def _row_labels(self, ids: list[int], index: int) -> list[int]:
        labels = self.training_labels(ids)
        if all(label == IGNORE_INDEX for label in labels):
            raise ValueError(
                f"text[{index}] has no trainable label with output_labels=True: it needs an answer after {SEP_TOKEN} "
                f"ending in {END_OF_CHUNK_TOKEN} + eos (see build_training_text), within max_prompt_length="
                f"{self.max_prompt_length} tokens."
            )
        return labels

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
            conversation: a list of `{"role", "content"}` messages, or a list of such conversations (a batch). A
                conversation is one `user` message holding exactly one audio item,
                `{"type": "audio", "path" | "url" | "audio" | "base64": ...}`, and text items, optionally followed by
                one `assistant` message (the answer: text only). `"audio"` may be a path, a float array, bytes or a
                `datasets` audio dict; an array takes its rate from the item's `"sampling_rate"` or from
                `sampling_rate=`, default 16 kHz. Texts may not contain special tokens. Anything else (a system
                message, other roles, more turns, no or two audios, content that is neither a string nor a list of
                text/audio items) is a `ValueError` naming the conversation and message.
            tokenize: return token ids (and audio features) instead of the prompt string.
            return_dict: with `tokenize=True`, return the whole `BatchFeature` instead of `input_ids` only.
            return_tensors: "pt" (default when tokenizing) or "np".
            processor_kwargs: keyword arguments for `__call__` (`sampling_rate`, `padding_side`, `output_labels`).
            kwargs: template options (`add_generation_prompt` and `continue_final_message` behave as in
                transformers); `sampling_rate`, `padding_side` and `output_labels` given here go to `__call__` as
                well. `output_labels=True` (needs `tokenize=True`) renders the assistant's answer lower-cased, as
                AF2's training text, and adds `labels` by AF2's label rule.
        """
        processor_kwargs = dict(processor_kwargs or {})
        for key in ("sampling_rate", "padding_side", "output_labels"):
            if key in kwargs:
                processor_kwargs[key] = kwargs.pop(key)
        for key in ("audio_kwargs", "text_kwargs"):
            processor_kwargs.update(processor_kwargs.pop(key, None) or {})
        if kwargs.pop("sanitize_control_tokens", False):
            raise ValueError(
                "sanitize_control_tokens is not supported by AudioFlamingo2Processor: it refuses special tokens in "
                "messages instead (remove them from the text)."
            )
        output_labels = bool(processor_kwargs.pop("output_labels", False))
        if output_labels and not tokenize:
            raise ValueError("output_labels=True needs tokenize=True (and return_dict=True to get the labels).")

        batched = (
            isinstance(conversation, (list, tuple))
            and bool(conversation)
            and (isinstance(conversation[0], (list, tuple)) or hasattr(conversation[0], "messages"))
        )
        conversations = [getattr(c, "messages", c) for c in (conversation if batched else [conversation])]
        audios = [self._check_conversation(messages, index) for index, messages in enumerate(conversations)]
        if output_labels:
            # AF2's training text lower-cases the answer (see build_training_text); the template keeps its case so
            # that `continue_final_message` finds a prefilled answer again.
            conversations = [_lower_cased_answers(messages) for messages in conversations]
        rendered = super().apply_chat_template(
            conversations if batched else conversations[0], chat_template=chat_template, tokenize=False, **kwargs
        )
        if not tokenize:
            return rendered
        if kwargs.get("return_assistant_tokens_mask"):
            raise ValueError("return_assistant_tokens_mask is not supported by AudioFlamingo2Processor.")

        prompts = rendered if batched else [rendered]
        out = self(
            text=list(prompts),
            audio=audios,
            sampling_rate=processor_kwargs.pop("sampling_rate", None) or self.feature_extractor.sampling_rate,
            return_tensors="pt" if return_tensors in ("auto", None) else return_tensors,
            padding_side=processor_kwargs.pop("padding_side", "left"),
            output_labels=output_labels,
        )
        return out if return_dict else out["input_ids"]

    def _check_conversation(self, messages, index: int):
        """Checks one conversation against AF2's format and returns its one audio input, ready for the feature
        extractor (paths stay paths)."""
        where = f"conversation {index}"
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ValueError(
                f"{where}: expected a non-empty list of {{'role', 'content'}} messages, got {messages!r}."
            )
        found = []
        for position, message in enumerate(messages):
            here = f"{where}, message {position}"
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise ValueError(f"{here}: a message is a dict with 'role' and 'content', got {message!r}.")
            role, content = message["role"], message["content"]
            if role == "system":
                raise ValueError(
                    f"{here}: Audio Flamingo 2 has no system prompt; put the instruction in the user message."
                )
            expected = "user" if position == 0 else "assistant"
            if position > 1 or role != expected:
                raise ValueError(
                    f"{here}: role {role!r} where AF2 expects {expected!r}; a conversation is one user message (with "
                    "the audio and the question), optionally followed by one assistant message (the answer). AF2 "
                    "has no multi-turn format."
                )
            items = [{"type": "text", "text": content}] if isinstance(content, str) else content
            if not isinstance(items, (list, tuple)):
                raise ValueError(
                    f"{here}: content must be a string or a list of {{'type': 'text' | 'audio', ...}} items, got "
                    f"{type(content).__name__}."
                )
            for item in items:
                kind = item.get("type") if isinstance(item, dict) else None
                if kind == "text":
                    if not isinstance(item.get("text"), str):
                        raise ValueError(f"{here}: a text item needs a string 'text', got {item!r}.")
                    tokens = self.control_tokens_in(item["text"] if role == "assistant" else item["text"].lower())
                    if tokens:
                        raise ValueError(
                            f"{here}: the text contains the special token(s) {tokens}, which would act as control "
                            "tokens inside AF2's prompt; remove them."
                        )
                elif kind == "audio":
                    if role != "user":
                        raise ValueError(f"{here}: the audio belongs in the user message, not the {role}'s.")
                    found.append(self._audio_of_item(item, here))
                else:
                    raise ValueError(
                        f"{here}: AF2 reads 'text' and 'audio' content items only, got {item!r}"[:300] + "."
                    )
        if len(found) != 1:
            raise ValueError(
                f"{where} holds {len(found)} audio items; AF2 answers about exactly one audio: put one "
                '{"type": "audio", "path": ...} item in the user message.'
            )
        return found[0]

    @staticmethod
    def _audio_of_item(item: dict, where: str):
        sources = [(key, item[key]) for key in _AUDIO_ITEM_KEYS if item.get(key) is not None]
        if len(sources) != 1:
            raise ValueError(
                f"{where}: an audio item needs exactly one of {list(_AUDIO_ITEM_KEYS)}; got "
                f"{sorted(k for k in item if k != 'type')}."
            )
        key, source = sources[0]
        source = _resolve_audio_source(source, is_base64=key == "base64")
        if item.get("sampling_rate") is not None and not isinstance(source, (str, os.PathLike, bytes, dict)):
            source = {"array": source, "sampling_rate": item["sampling_rate"]}
        return source

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
        sep_id = self.sep_token_id
        dropped = {self.tokenizer.eos_token_id, self.tokenizer.pad_token_id, self.end_of_chunk_token_id}
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


def _lower_cased_answers(messages):
    """The conversation with the assistant's text lower-cased (AF2's training text), other messages unchanged."""
    result = []
    for message in messages:
        if message["role"] == "assistant":
            content = message["content"]
            if isinstance(content, str):
                content = content.lower()
            else:
                content = [
                    {**item, "text": item["text"].lower()} if item["type"] == "text" else item for item in content
                ]
            message = {**message, "content": content}
        result.append(message)
    return result


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


__all__ = [
    "ADDED_SPECIAL_TOKENS",
    "AUDIO_TOKEN",
    "DEFAULT_CHAT_TEMPLATE",
    "END_OF_CHUNK_TOKEN",
    "EOS_TOKEN",
    "IGNORE_INDEX",
    "PAD_TOKEN",
    "SEP_TOKEN",
    "AudioFlamingo2Processor",
    "af2_labels",
    "build_prompt",
    "build_training_text",
]
