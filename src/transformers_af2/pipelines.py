"""
`pipeline("audio-text-to-text")` for Audio Flamingo 2 and AF2 in `pipeline("any-to-any")`.

`import transformers_af2` calls `register_pipelines()`, after which

```python
pipe = pipeline("audio-text-to-text", model="af2-3b-hf")            # a converted repository (or a model object)
pipe(audio="dog.wav", text="What is the sound in this audio?")      # [{"input_text": ..., "generated_text": ...}]
```

works like any other transformers pipeline (`device`, `dtype`, `batch_size`, generation parameters).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np
import torch
from transformers import AutoModelForMultimodalLM, GenerationConfig
from transformers.pipelines import PIPELINE_REGISTRY
from transformers.pipelines.base import Pipeline, PipelineDataset, PipelineIterator
from transformers.utils import logging
from transformers.utils.chat_template_utils import Chat, is_valid_message

from .generation_utils import generate_kwargs_honouring_max_length, through_first_eos, with_non_finite_check
from .soundcot import repair_unconcluded_answers

logger = logging.get_logger(__name__)

TASK = "audio-text-to-text"


def _is_chat(value) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and is_valid_message(value[0])


def _is_chat_batch(value) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and all(_is_chat(chat) for chat in value)


def _is_input_dict(value) -> bool:
    return isinstance(value, Mapping) and "text" in value and "audio" in value


def _is_single_audio(value) -> bool:
    """One audio (path, bytes, array, tensor, datasets dict, or a plain list of samples) rather than a batch."""
    if isinstance(value, (str, os.PathLike, bytes, bytearray, np.ndarray, torch.Tensor)):
        return True
    if isinstance(value, Mapping):  # a `datasets` Audio dict, not a message or an input dict
        return bool({"array", "path", "bytes"} & set(value)) and not ({"role", "text", "content"} & set(value))
    if hasattr(value, "read"):
        return True
    return isinstance(value, (list, tuple)) and bool(value) and isinstance(value[0], (int, float, np.number))


def _audio_name(audio) -> str:
    """How errors name an input: its file name, or the kind of audio it is."""
    if isinstance(audio, (str, os.PathLike)):
        return f"audio {os.fspath(audio)!r}"
    if isinstance(audio, Mapping) and isinstance(audio.get("path"), str):
        return f"audio {audio['path']!r}"
    return f"audio given as {type(audio).__name__}"


def _at_position(error: Exception, position: int | None) -> Exception:
    """The processor's error for a one-input call (it says `audio[0]` / `text[0]`) renamed to the input's position in
    the caller's list; the same exception type where it can be rebuilt from a message."""
    if position is None:
        return error
    message = str(error).replace("audio[0]", f"audio[{position}]").replace("text[0]", f"text[{position}]")
    try:
        return type(error)(message)
    except TypeError:  # exception types whose constructor needs more than a message
        return ValueError(message)


class AudioTextToTextPipeline(Pipeline):
    """
    Answers questions about audio with Audio Flamingo 2.

    Inputs, any of:
      - `pipe(audio=..., text=question)`: audio is a file path, bytes, a float array (with `sampling_rate=`), a
        `datasets` audio dict, or a list of them; `text` is a question or a list of questions (a single question
        goes with every audio, a single audio with every question);
      - chat messages, `pipe(messages)` or `pipe(text=messages)`, or a list of conversations:
        `[{"role": "user", "content": [{"type": "audio", "path": "dog.wav"}, {"type": "text", "text": "..."}]}]`
        (rendered by the processor's chat template into the same prompt as the plain question; a final assistant
        message is continued, i.e. prefilled);
      - dicts `{"audio": ..., "text": ...}`, lists, generators or datasets of them.

    Returns, per input, a list of `{"input_text": question or messages, "generated_text": answer}` (one entry per
    returned sequence); a batch of inputs gives a list of such lists. The answer is the clean text the model wrote
    after `<SEP>`: no special tokens, no prompt. `return_tensors=True` adds `generated_token_ids`, the new tokens up to
    and including eos.

    Parameters of a call (or of `pipeline(...)`): `max_new_tokens`, any other `generate` argument (`do_sample`,
    `top_k`, `streamer`, `generation_config`, ...) or `generate_kwargs={...}`; `sampling_rate` for array inputs;
    `batch_size`; `soundcot_repair=True` for AF2-SoundCoT: an answer that opened `<REASONING>` but never wrote
    `</CONCLUSION>` is repaired as the original did (see `transformers_af2.soundcot`): its text is then the cut,
    lower-cased reasoning, `</REASONING>\\n<CONCLUSION>` and the second pass's continuation (whose tokens are its
    `generated_token_ids`); every entry then says whether it was repaired in `"soundcot_repaired"`.

    Batches are left-padded; padded audio windows are masked and never encoded, so a batch gives each input the ids
    it gets alone (up to floating-point noise of batched matmuls).
    """

    _load_processor = True
    _load_image_processor = False
    _load_video_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False

    _pipeline_calls_generate = True
    _default_generation_config = GenerationConfig(max_new_tokens=256)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.processor is None or not hasattr(self.processor, "decode_answers"):
            raise ValueError(
                f"{TASK} needs the AudioFlamingo2Processor of the model; pass "
                "processor=AutoProcessor.from_pretrained(...) or a converted repository as model."
            )
        from transformers.models.auto.modeling_auto import MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES

        self.check_model_type(MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES)

    # -- parameters -----------------------------------------------------------------------------------------------
    def _sanitize_parameters(
        self,
        sampling_rate=None,
        max_new_tokens=None,
        generate_kwargs=None,
        return_tensors=None,
        soundcot_repair=None,
        **kwargs,
    ):
        preprocess_params, forward_params, postprocess_params = {}, {}, {}
        if sampling_rate is not None:
            preprocess_params["sampling_rate"] = sampling_rate
        generate = dict(generate_kwargs or {})
        # Anything else is a generate() argument (streamer, logits_processor, ...); generate() rejects unknown ones.
        generate.update(kwargs)
        if max_new_tokens is not None:
            if "max_new_tokens" in generate:
                raise ValueError("max_new_tokens is given twice, directly and in generate_kwargs; keep one.")
            generate["max_new_tokens"] = max_new_tokens
        if generate:
            forward_params["generate_kwargs"] = generate
        if soundcot_repair is not None:
            forward_params["soundcot_repair"] = bool(soundcot_repair)
            postprocess_params["soundcot_repair"] = bool(soundcot_repair)
        if return_tensors is not None:
            postprocess_params["return_tensors"] = bool(return_tensors)
        return preprocess_params, forward_params, postprocess_params

    # -- inputs ---------------------------------------------------------------------------------------------------
    def __call__(self, audio=None, text=None, **kwargs):
        """
        Args:
            audio: an audio input or a list of them; or, alone, chat messages, an input dict, or a list, generator or
                dataset of those.
            text: a question, a list of questions, or chat messages.
        Returns:
            A list of answer dicts for one input; a list of such lists for a list of inputs.
        """
        if (
            text is None
            and audio is not None
            and not _is_single_audio(audio)
            and not (isinstance(audio, (list, tuple)) and audio and all(_is_single_audio(a) for a in audio))
        ):
            # Chats, input dicts, generators, datasets: the base class batches them.
            return super().__call__(audio, **kwargs)
        if text is not None and (_is_chat(text) or _is_chat_batch(text)):
            if audio is not None:
                raise ValueError(
                    "chat input carries its audio in the messages ({'type': 'audio', 'path': ...}); do not pass audio="
                )
            return super().__call__(text, **kwargs)
        if audio is None or text is None:
            raise ValueError(
                f"{TASK} needs audio= and text= (a question), or chat messages with an audio item; got "
                f"{'no audio' if audio is None else 'no text'}."
            )
        audio_batched, text_batched = not _is_single_audio(audio), not isinstance(text, str)
        audios = list(audio) if audio_batched else [audio]
        texts = list(text) if text_batched else [text]
        if not audios or not texts:
            raise ValueError("audio and text must not be empty lists.")
        if len(texts) == 1 and len(audios) > 1:
            texts = texts * len(audios)
        elif len(audios) == 1 and len(texts) > 1:
            audios = audios * len(texts)
        if len(audios) != len(texts):
            raise ValueError(
                f"got {len(audios)} audios and {len(texts)} questions; pass one question per audio (or one for all)."
            )
        for question in texts:
            if not isinstance(question, str):
                raise TypeError(
                    f"text must be a string, a list of strings or chat messages; got {type(question).__name__}."
                )
        if not audio_batched and not text_batched:
            return super().__call__({"audio": audios[0], "text": texts[0]}, **kwargs)
        # Each input is encoded alone: `position` lets its errors name it as the caller's list does.
        items = [{"audio": a, "text": t, "position": i} for i, (a, t) in enumerate(zip(audios, texts))]
        return super().__call__(items, **kwargs)

    def preprocess(self, inputs, sampling_rate=None):
        if isinstance(inputs, Chat):
            messages = inputs.messages
            prefill = messages[-1]["role"] == "assistant"
            encoded = self.processor.apply_chat_template(
                messages,
                tokenize=True,
                return_dict=True,
                return_tensors="pt",
                continue_final_message=prefill,
                processor_kwargs={"sampling_rate": sampling_rate} if sampling_rate else None,
            )
            prompt_text = self.processor.apply_chat_template(messages, continue_final_message=prefill)
            input_text = messages
            audio = next(
                (
                    next((item[key] for key in ("path", "url", "audio") if key in item), None)
                    for message in messages
                    if isinstance(message.get("content"), list)
                    for item in message["content"]
                    if isinstance(item, Mapping) and item.get("type") == "audio"
                ),
                None,
            )
        elif _is_input_dict(inputs):
            question = inputs["text"]
            try:
                encoded = self.processor(
                    text=[question], audio=[inputs["audio"]], sampling_rate=inputs.get("sampling_rate", sampling_rate)
                )
            except (ValueError, TypeError, OSError) as error:
                raise _at_position(error, inputs.get("position")) from error
            prompt_text = self.processor.build_prompt(question)
            input_text = question
            audio = inputs["audio"]
        else:
            raise ValueError(
                f"{TASK}: cannot read an input of type {type(inputs).__name__}; pass audio= and text=, chat messages, "
                "or {'audio': ..., 'text': ...} dicts."
            )
        model_inputs = dict(encoded)
        model_inputs["meta"] = [{"prompt_text": prompt_text, "input_text": input_text, "name": _audio_name(audio)}]
        return model_inputs

    def _collate(self, items: list[dict]) -> dict:
        """Left-pads a batch of single-input encodings as the processor does for a list of inputs."""
        pad_id = self.processor.tokenizer.pad_token_id
        length = max(item["input_ids"].shape[1] for item in items)
        windows = max(item["input_features"].shape[1] for item in items)
        batch = {"input_ids": [], "attention_mask": [], "input_features": [], "input_features_mask": [], "meta": []}
        for item in items:
            ids, mask = item["input_ids"], item["attention_mask"]
            missing = length - ids.shape[1]
            batch["input_ids"].append(torch.cat([ids.new_full((1, missing), pad_id), ids], dim=1))
            batch["attention_mask"].append(torch.cat([mask.new_zeros((1, missing)), mask], dim=1))
            features, window_mask = item["input_features"], item["input_features_mask"]
            extra = windows - features.shape[1]
            # Padded windows are masked out and never reach the audio tower, so their values do not matter.
            batch["input_features"].append(
                torch.cat([features, features.new_zeros((1, extra, *features.shape[2:]))], dim=1)
            )
            batch["input_features_mask"].append(torch.cat([window_mask, window_mask.new_zeros((1, extra))], dim=1))
            batch["meta"].extend(item["meta"])
        return {key: value if key == "meta" else torch.cat(value) for key, value in batch.items()}

    def get_iterator(self, inputs, num_workers, batch_size, preprocess_params, forward_params, postprocess_params):
        # As Pipeline.get_iterator, with a collate function that pads like the processor (left, window masks).
        from torch.utils.data import DataLoader

        if isinstance(inputs, (list, tuple)) or hasattr(inputs, "__len__") and hasattr(inputs, "__getitem__"):
            dataset = PipelineDataset(inputs, self.preprocess, preprocess_params)
        else:
            num_workers = min(num_workers, 1)
            dataset = PipelineIterator(inputs, self.preprocess, preprocess_params)
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        dataloader = DataLoader(dataset, num_workers=num_workers, batch_size=batch_size, collate_fn=self._collate)
        model_iterator = PipelineIterator(dataloader, self.forward, forward_params, loader_batch_size=batch_size)
        return PipelineIterator(model_iterator, self.postprocess, postprocess_params)

    # -- generation -----------------------------------------------------------------------------------------------
    def _forward(self, model_inputs, generate_kwargs=None, soundcot_repair=False):
        meta = model_inputs.pop("meta")
        generate_kwargs = self._prepare_generate_kwargs(dict(generate_kwargs or {}))
        generate_kwargs = generate_kwargs_honouring_max_length(generate_kwargs)
        # NaN/inf logits stop generation with an error naming the input instead of answering token 0.
        generate_kwargs["logits_processor"] = with_non_finite_check(
            generate_kwargs.get("logits_processor"), [item["name"] for item in meta]
        )
        new_tokens = self._generate_new_tokens(model_inputs, generate_kwargs)
        batch = model_inputs["input_ids"].shape[0]
        per_input = len(new_tokens) // batch
        prefixes = [None] * len(new_tokens)
        if soundcot_repair:
            second_pass = {**generate_kwargs, "num_return_sequences": 1}
            second_pass["logits_processor"] = with_non_finite_check(
                generate_kwargs["logits_processor"],
                [meta[index // per_input]["name"] for index in range(len(new_tokens))],
            )
            new_tokens, prefixes = repair_unconcluded_answers(
                self.processor,
                model_inputs,
                [item["prompt_text"] for item in meta],
                new_tokens,
                lambda inputs: self._generate_new_tokens(inputs, second_pass),
            )
        items = []
        for row in range(batch):
            span = slice(row * per_input, (row + 1) * per_input)
            items.append({**meta[row], "token_ids": new_tokens[span], "prefixes": prefixes[span]})
        return {"items": items}

    def _generate_new_tokens(self, model_inputs, generate_kwargs) -> list[list[int]]:
        """`generate`, then each returned sequence's new tokens up to and including its first eos."""
        output = self.model.generate(**model_inputs, **generate_kwargs)
        sequences = output if isinstance(output, torch.Tensor) else output.sequences
        new = sequences[:, model_inputs["input_ids"].shape[1] :].tolist()
        config = generate_kwargs.get("generation_config") or self.model.generation_config
        eos = generate_kwargs.get("eos_token_id", config.eos_token_id)
        return through_first_eos(new, eos)

    # -- inputs that may fail -------------------------------------------------------------------------------------
    def answer_each(self, inputs, batch_size: int = 1, **kwargs):
        """
        Answers a list of inputs (`{"audio": ..., "text": ...}` dicts or chat messages), yielding
        `(index, records, None)` for each input answered and `(index, None, error)` for each that failed, in input
        order, as soon as its batch is done. Unlike a pipeline call, one input that cannot be read or generated
        (an undecodable file, NaN logits) does not lose the others: a batch that fails is run again one input at a
        time, so every error belongs to its own input. `kwargs` are the call parameters of the pipeline.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}.")
        preprocess_params, forward_params, postprocess_params = self._sanitize_parameters(**kwargs)
        preprocess_params = {**self._preprocess_params, **preprocess_params}
        forward_params = {**self._forward_params, **forward_params}
        postprocess_params = {**self._postprocess_params, **postprocess_params}
        inputs = [Chat(item) if _is_chat(item) else item for item in inputs]

        def run(prepared):
            """[(index, records, None)] for a batch of preprocessed inputs."""
            outputs = self.forward(self._collate([encoded for _, encoded in prepared]), **forward_params)
            return [
                (index, self.postprocess({"items": [item]}, **postprocess_params), None)
                for (index, _), item in zip(prepared, outputs["items"])
            ]

        for start in range(0, len(inputs), batch_size):
            prepared, failed = [], []
            for index in range(start, min(start + batch_size, len(inputs))):
                try:
                    prepared.append((index, self.preprocess(inputs[index], **preprocess_params)))
                except Exception as error:  # reported per input; KeyboardInterrupt still stops the run
                    failed.append((index, None, error))
            results = list(failed)
            if prepared:
                try:
                    results += run(prepared)
                except Exception as error:
                    if len(prepared) == 1:
                        results.append((prepared[0][0], None, error))
                    else:
                        for one in prepared:
                            try:
                                results += run([one])
                            except Exception as single_error:
                                results.append((one[0], None, single_error))
            yield from sorted(results, key=lambda result: result[0])

    # -- outputs --------------------------------------------------------------------------------------------------
    def postprocess(self, model_outputs, return_tensors=False, soundcot_repair=False):
        items = model_outputs["items"]
        item = items[0] if isinstance(items, list) else items
        records = []
        for tokens, prefix in zip(item["token_ids"], item["prefixes"]):
            answer = self.processor.decode_answers([tokens])[0]
            record = {"input_text": item["input_text"], "generated_text": answer}
            if prefix is not None:
                # As the original: the answer is what follows <SEP> in the repaired sequence.
                record["generated_text"] = (prefix + self.processor.decode_answers([tokens], strip=False)[0]).strip()
            if soundcot_repair:
                record["soundcot_repaired"] = prefix is not None
            if return_tensors:
                record["generated_token_ids"] = torch.tensor(tokens, dtype=torch.long)
            records.append(record)
        return records


def register_pipelines() -> None:
    """Registers the `audio-text-to-text` task. Idempotent. (AF2 in `any-to-any`: see the package's `__init__`.)"""
    registered = PIPELINE_REGISTRY.supported_tasks.get(TASK)
    if registered is None or registered.get("impl") is not AudioTextToTextPipeline:
        PIPELINE_REGISTRY.register_pipeline(
            TASK, pipeline_class=AudioTextToTextPipeline, pt_model=AutoModelForMultimodalLM, type="multimodal"
        )


__all__ = [
    "TASK",
    "AudioTextToTextPipeline",
    "register_pipelines",
]
