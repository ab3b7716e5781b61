"""
AF2 as an lmms-eval model: `lmms-eval --model af2 --model_args pretrained=af2-3b-hf --tasks mmau_test_mini`.

lmms-eval finds it through the `lmms_eval.models` entry point group (declared in pyproject.toml:
`af2 = "transformers_af2.lmms_eval_af2:model_manifest"`), so its audio tasks run unchanged. Each request's text
becomes AF2's prompt (`<audio>` + lower-cased, stripped text + `<SEP>`, no chat template: AF2 has none) about the
request's one audio; decoding is greedy unless the task asks for sampling, up to the task's `max_new_tokens`
(default 256, the original evaluation's), stopping at eos and at the task's `until` strings.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

try:
    from lmms_eval.api.instance import Instance
    from lmms_eval.api.model import lmms
    from lmms_eval.models.registry_v2 import ModelManifest
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        f"the lmms-eval plugin needs lmms-eval ({error}); install it with: pip install 'transformers-af2[lmms-eval]'"
    ) from None

from .evaluation.generation import BatchedAnswerGenerator
from .evaluation.tasks import GENERATION_SETTINGS

MODEL_ID = "af2"


def model_manifest() -> ModelManifest:
    """The entry point lmms-eval loads: AF2's model id and where its class lives."""
    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.AudioFlamingo2LmmsEval")


def _waveform(audio, where: str) -> tuple[np.ndarray, int]:
    """(samples, rate) of what a task's doc_to_visual gives: an audio dict / decoder with `array` and `sampling_rate`."""
    try:
        array, rate = audio["array"], audio["sampling_rate"]
    except (TypeError, KeyError, IndexError):
        raise ValueError(
            f"{where}: expected audio as a mapping with 'array' and 'sampling_rate' (a datasets Audio value), got "
            f"{type(audio).__name__}."
        ) from None
    array = array.numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
    return array.astype(np.float32, copy=False), int(rate)


class AudioFlamingo2LmmsEval(lmms):
    """
    lmms-eval `simple` model for Audio Flamingo 2.

    Args (`--model_args`):
        pretrained: a converted repository, or an original-layout hub id or directory (converted on first use).
        device: "auto" (GPU when present), "cpu", "cuda", "cuda:1", ...
        dtype: "auto" (bfloat16 on GPU, float32 on CPU), "float32", "bfloat16", "float16".
        fast: true for `af2 --fast`'s settings (with dtype auto: the dtype measured to keep the answers on this kind
            of device, and on CPU the linear kernels measured on the machine; `transformers_af2.presets`).
        quantization: `af2 --quantization`'s schemes (int8, int4, bnb-8bit, bnb-4bit): weight-only quantization of
            the language model at load; the audio side stays in dtype.
        batch_size: requests per `generate` call.
        max_new_tokens: default when the task sets none (256, as the original evaluation).
        max_batch_size: lmms-eval's `--max_batch_size`, accepted and unused (batches are `batch_size`).
    """

    def __init__(
        self,
        pretrained: str = "nvidia/audio-flamingo-2",
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int | str = 1,
        max_new_tokens: int | str = GENERATION_SETTINGS["max_new_tokens"],
        max_batch_size: int | str | None = None,
        fast: bool | str = False,
        quantization: str | None = None,
        **kwargs,
    ) -> None:
        super().__init__()
        if kwargs:
            raise ValueError(
                f"--model_args: unknown argument(s) {sorted(kwargs)} for af2; it takes pretrained, device, dtype, "
                "fast, quantization, batch_size, max_new_tokens."
            )
        from .loading import load_model_and_processor, model_loading_options, resolve_device

        if isinstance(fast, str):  # lmms-eval passes True/False as booleans, other spellings as text
            if fast.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(f"--model_args: fast={fast!r}; write fast=true or fast=false.")
            fast = fast.lower() in ("true", "1", "yes")
        self._device = resolve_device(device)
        self.model, self.processor = load_model_and_processor(
            pretrained,
            device=self._device,
            **model_loading_options(self._device, dtype, bool(fast), quantization, model_id=pretrained),
        )
        try:
            self.batch_size_per_call = int(batch_size)
            self.default_max_new_tokens = int(max_new_tokens)
        except ValueError:
            raise ValueError(
                f"--model_args: batch_size and max_new_tokens must be whole numbers, got {batch_size!r} and "
                f"{max_new_tokens!r} (af2 has no 'auto' batch size)."
            ) from None
        if self.batch_size_per_call < 1 or self.default_max_new_tokens < 1:
            raise ValueError("--model_args: batch_size and max_new_tokens must be positive.")

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        """
        lmms-eval passes its own `--batch_size` (default 1), `--max_batch_size` and `--device` beside `--model_args`;
        a key given in `--model_args` wins over them (lmms-eval's default would pass it twice and fail).
        """
        from lmms_eval import utils

        args = utils.simple_parse_args_string(arg_string)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in args}
        return cls(**args, **extra)

    @property
    def device(self):
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_call

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError(
            "af2 answers generation tasks (output_type: generate_until); log-likelihood tasks are not supported."
        )

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("af2 answers one question per audio; multi-round tasks are not supported.")

    def _generate_kwargs(self, task_kwargs: dict) -> tuple[dict, list[str]]:
        """The task's generation_kwargs as `generate` arguments (greedy unless it samples), and its `until` strings."""
        task_kwargs = dict(task_kwargs or {})
        until = task_kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        temperature = float(task_kwargs.get("temperature") or 0.0)
        do_sample = bool(task_kwargs.get("do_sample", False)) and temperature > 0
        settings = {
            "do_sample": do_sample,
            "num_beams": int(task_kwargs.get("num_beams") or 1),
            "max_new_tokens": int(task_kwargs.get("max_new_tokens") or self.default_max_new_tokens),
        }
        if do_sample:
            settings["temperature"] = temperature
            if task_kwargs.get("top_p") is not None:
                settings["top_p"] = float(task_kwargs["top_p"])
        return settings, until

    def _answer(self, questions: Sequence[str], waveforms: Sequence[np.ndarray], rate: int, settings: dict):
        # The same batched generate as `af2 eval`'s loop engine.
        generator = BatchedAnswerGenerator(self.model, self.processor, settings)
        return generator(waveforms, questions, sampling_rate=rate)

    def generate_until(self, requests: list[Instance]) -> list[str]:
        answers: list[str | None] = [None] * len(requests)
        # Requests with the same generation settings and sampling rate share a batch.
        groups: dict[tuple, list[tuple[int, str, np.ndarray]]] = {}
        for index, request in enumerate(requests):
            context, task_kwargs, doc_to_visual, doc_id, task, split = request.args
            where = f"task {task} doc {doc_id}"
            audios = doc_to_visual(self.task_dict[task][split][doc_id])
            if len(audios) != 1:
                raise ValueError(f"{where}: af2 takes exactly one audio per question, got {len(audios)}.")
            waveform, rate = _waveform(audios[0], where)
            settings, until = self._generate_kwargs(task_kwargs)
            key = (tuple(sorted(settings.items())), tuple(until), rate)
            groups.setdefault(key, []).append((index, context, waveform))
        for (settings, until, rate), members in groups.items():
            for start in range(0, len(members), self.batch_size_per_call):
                batch = members[start : start + self.batch_size_per_call]
                texts = self._answer([c for _, c, _ in batch], [w for _, _, w in batch], rate, dict(settings))
                for (index, _, _), text in zip(batch, texts):
                    for stop in until:
                        if stop:
                            text = text.split(stop)[0]
                    answers[index] = text
                    self.cache_hook.add_partial("generate_until", (requests[index].args[0], dict(settings)), text)
        return answers
