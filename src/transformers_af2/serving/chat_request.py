"""
An OpenAI chat completions request body -> `ChatRequest`, checked field by field. A field is either honoured with its
OpenAI meaning or refused with `RequestError` (HTTP 400) naming it; none is silently ignored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..audio_sources import HOW_TO_SEND_AUDIO

MAX_STOP_SEQUENCES = 4  # OpenAI's limit
MAX_CHOICES = 8
# Fields whose OpenAI default is all this server does: accepted with that value, refused with any other.
ONLY_DEFAULT = {
    "frequency_penalty": (0, 0.0),
    "presence_penalty": (0, 0.0),
    "logprobs": (False,),
    "store": (False,),
    "parallel_tool_calls": (True,),
}
# Fields for features AF2 does not have: refused whenever given (null or empty counts as not given).
UNSUPPORTED = {
    "top_logprobs": "logprobs are not offered",
    "logit_bias": "logit_bias is not supported",
    "tools": "AF2 has no tool calling",
    "tool_choice": "AF2 has no tool calling",
    "functions": "AF2 has no function calling",
    "function_call": "AF2 has no function calling",
    "audio": "AF2 answers in text only",
    "prediction": "predicted outputs are not supported",
    "reasoning_effort": "AF2 has no reasoning-effort setting",
    "web_search_options": "web search is not supported",
    "service_tier": "there is one service tier",
    "generation_config": "use the OpenAI fields temperature, top_p, max_tokens, stop, seed",
}
# Labels that change nothing in the answer.
LABELS = ("user", "metadata", "safety_identifier", "prompt_cache_key")
HANDLED = {"model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens", "temperature",
           "top_p", "n", "seed", "stop", "response_format", "modalities"}  # fmt: skip


class RequestError(ValueError):
    """A client mistake: answered with HTTP `status` and OpenAI's error body naming `param`."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.status = status
        self.code = code


@dataclass(frozen=True)
class Limits:
    """The server's bounds on a request."""

    max_tokens: int = 1024
    default_max_tokens: int = 256


@dataclass
class ChatRequest:
    """
    One checked chat completion request. `messages` keep OpenAI's content items (audio still unread: reading it may
    fetch a URL, which happens off the event loop). `temperature == 0` is greedy decoding.
    """

    model: str
    messages: list
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generate_kwargs(self) -> dict:
        """`generate` arguments with OpenAI's meaning: greedy at temperature 0, else sampling from the whole
        distribution at `temperature` with nucleus `top_p` (OpenAI has no top-k: transformers' default is off)."""
        if self.greedy:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": 0}


def _number(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestError(f"{name} must be a number, got {value!r}.", name)
    if value > high or value < low or (low_open and value == low):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise RequestError(f"{name} must be in {interval}, got {value!r}.", name)
    return float(value)


def _integer(body: dict, name: str, low: int, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"{name} must be an integer, got {value!r}.", name)
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f">= {low}"
        raise RequestError(f"{name} must be {bound}, got {value}.", name)
    return value


def _max_tokens(body: dict, limits: Limits) -> int:
    given = {name: _integer(body, name, 1) for name in ("max_completion_tokens", "max_tokens")}
    given = {name: value for name, value in given.items() if value is not None}
    if len(set(given.values())) > 1:
        raise RequestError("max_tokens and max_completion_tokens differ; give one of them.", "max_tokens")
    value = next(iter(given.values()), limits.default_max_tokens)
    if value > limits.max_tokens:
        name = next(iter(given), "max_tokens")
        raise RequestError(f"{name} is {value}; this server generates at most {limits.max_tokens} tokens.", name)
    return value


def _stop(body: dict) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise RequestError("stop must be a non-empty string or a list of non-empty strings.", "stop")
    if len(stops) > MAX_STOP_SEQUENCES:
        raise RequestError(f"stop holds {len(stops)} sequences; at most {MAX_STOP_SEQUENCES}.", "stop")
    return tuple(dict.fromkeys(stops))


def _check_unsupported(body: dict) -> None:
    for name, reason in UNSUPPORTED.items():
        if body.get(name) not in (None, [], {}, ""):
            raise RequestError(f"{name} is not supported by this server: {reason}.", name)
    for name, allowed in ONLY_DEFAULT.items():
        if name in body and body[name] is not None and body[name] not in allowed:
            raise RequestError(f"{name}={body[name]!r} is not supported by this server.", name)
    response_format = body.get("response_format")
    if response_format is not None and response_format != {"type": "text"}:
        raise RequestError("response_format: only {'type': 'text'} is supported.", "response_format")
    modalities = body.get("modalities")
    if modalities is not None and modalities != ["text"]:
        raise RequestError("modalities: AF2 answers in text only (['text']).", "modalities")
    unknown = sorted(set(body) - HANDLED - set(UNSUPPORTED) - set(ONLY_DEFAULT) - set(LABELS))
    if unknown:
        raise RequestError(
            f"unknown field {unknown[0]!r}; this server takes OpenAI's chat completion fields.", unknown[0]
        )


def _messages(value) -> list:
    """OpenAI messages, checked for shape; audio items stay as sent (read later, see audio_sources)."""
    if not isinstance(value, list) or not value:
        raise RequestError("messages must be a non-empty list of {'role', 'content'} messages.", "messages")
    checked = []
    for index, message in enumerate(value):
        where = f"messages[{index}]"
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise RequestError(f"{where}: a message is an object with 'role' and 'content'.", "messages")
        extra = sorted(k for k, v in message.items() if k not in ("role", "content") and v is not None)
        if extra:
            raise RequestError(
                f"{where}: field {extra[0]!r} is not supported (AF2 reads role and content).", "messages"
            )
        content = message["content"]
        if isinstance(content, list):
            for position, item in enumerate(content):
                kind = item.get("type") if isinstance(item, dict) else None
                if kind not in ("text", "input_audio", "audio_url"):
                    raise RequestError(
                        f"{where}.content[{position}]: content type {kind!r} is not supported; AF2 reads 'text' and "
                        f"audio; {HOW_TO_SEND_AUDIO}.",
                        "messages",
                    )
        elif not isinstance(content, str):
            raise RequestError(f"{where}: content must be a string or a list of content items.", "messages")
        checked.append({"role": message["role"], "content": content})
    return checked


def parse_chat_request(body, served_names: set[str], limits: Limits) -> ChatRequest:
    """The checked request; `RequestError` for the first field that is wrong, unknown or unsupported."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object.")
    _check_unsupported(body)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError("model is required: the name of the served model (see GET /v1/models).", "model")
    if model not in served_names:
        raise RequestError(
            f"model {model!r} is not served here; this server serves {sorted(served_names)[0]!r}.",
            "model",
            status=404,
            code="model_not_found",
        )
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise RequestError(f"stream must be true or false, got {stream!r}.", "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise RequestError("stream_options is only allowed with stream: true.", "stream_options")
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise RequestError("stream_options takes {'include_usage': bool} only.", "stream_options")
        include_usage = bool(options.get("include_usage"))
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise RequestError(f"seed must be an integer in [0, 2**63), got {seed!r}.", "seed")
    return ChatRequest(
        model=model,
        messages=_messages(body.get("messages")),
        max_tokens=_max_tokens(body, limits),
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        n=_integer(body, "n", 1, MAX_CHOICES) or 1,
        seed=seed,
        stop=_stop(body),
        stream=stream,
        include_usage=include_usage,
    )


__all__ = ["ChatRequest", "Limits", "RequestError", "parse_chat_request"]
