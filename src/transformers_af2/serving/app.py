"""
The FastAPI app of `af2 serve`: OpenAI's `POST /v1/chat/completions` (streaming and not), `GET /v1/models`,
`GET /health`, and, only when the operator asks for them and sets an API key, `POST /reset` and `POST /load_model`.

Every client mistake is a 4xx in OpenAI's error shape (`{"error": {"message", "type", "param", "code"}}`) naming the
field; a 500 is a bug, logged with its traceback on the server and answered without it.
"""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations (`Request`, imported when the app
# is built) at run time.

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from dataclasses import dataclass, field

from ..audio_sources import HOW_TO_SEND_AUDIO, AudioSourceError, AudioSourcePolicy, audio_bytes_from_content_item
from ..families import EncodedAudio, ModelFamily
from .chat_request import ChatRequest, Limits, RequestError, parse_chat_request
from .scheduler import BatchScheduler, Job, QueueFull

logger = logging.getLogger(__name__)

ROUTES = "POST /v1/chat/completions, GET /v1/models, GET /health"
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
               503: "server_busy", 504: "timeout"}  # fmt: skip
# How often a waiting non-streaming request looks whether its client is still there.
DISCONNECT_POLL_SECONDS = 0.5
# Worker threads that may wait on audio downloads at once (with --allow-audio-urls): slow URLs cannot take every
# worker thread from the requests that send their audio as data.
MAX_CONCURRENT_DOWNLOADS = 8


@dataclass
class ServerSettings:
    """What the operator chose (see `af2 serve --help`)."""

    api_key: str | None = None
    admin_routes: bool = False
    audio: AudioSourcePolicy = field(default_factory=AudioSourcePolicy)
    limits: Limits = field(default_factory=Limits)
    request_timeout: float = 300.0
    max_request_bytes: int | None = None  # default: room for the largest audio in base64

    def request_bytes_limit(self) -> int:
        return self.max_request_bytes or self.audio.max_bytes * 4 // 3 + 1024 * 1024


def error_response(status: int, message: str, param: str | None = None, code: str | None = None, headers=None):
    from fastapi.responses import JSONResponse

    body = {"message": message, "type": ERROR_TYPES.get(status, "server_error"), "param": param, "code": code}
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def model_inputs_for(
    chat: ChatRequest, family: ModelFamily, policy: AudioSourcePolicy
) -> tuple[str, EncodedAudio, int]:
    """
    `(question, audio read by the model family's front end, prompt tokens)` for a checked request: its audio read
    under `policy` (never a server path). The question becomes the family's prompt in the batch, as
    `af2 caption` and the pipeline build it. Blocking (audio decoding, an allowed URL fetch): run it in a worker
    thread. `RequestError` for any problem with the request's content.
    """
    name = family.display_name
    if len(chat.messages) != 1 or chat.messages[0]["role"] != "user":
        roles = [message["role"] for message in chat.messages]
        raise RequestError(
            f"the messages have roles {roles}; {name} answers one user message holding the audio and the question "
            "(no system prompt, earlier turns or assistant prefix).",
            "messages",
        )
    content = chat.messages[0]["content"]
    texts, audios = [], []
    for position, item in enumerate([{"type": "text", "text": content}] if isinstance(content, str) else content):
        if item["type"] == "text":
            texts.append(item.get("text"))
            continue
        try:
            audios.append(audio_bytes_from_content_item(item, policy, f"messages[0].content[{position}]"))
        except AudioSourceError as error:
            raise RequestError(str(error), "messages") from None
    if len(audios) != 1:
        raise RequestError(
            f"the messages hold {len(audios)} audio items; {name} answers about exactly one audio: {HOW_TO_SEND_AUDIO}.",
            "messages",
        )
    if len(texts) != 1 or not isinstance(texts[0], str):
        raise RequestError(f"the message holds {len(texts)} text items; send exactly one question.", "messages")
    question = texts[0]
    try:
        family.check_questions([question])
        overflow = family.prompt_overflow(question)
        if overflow is not None:  # the processor would cut it, with a warning in the server's log only
            raise RequestError(f"{overflow}: shorten the question.", "messages")
        clip = family.encode_audio(audios[0])
        prompt_tokens = int(family.batch_inputs([question], [clip])["attention_mask"].sum())
    except (ValueError, TypeError) as error:  # the processor's and the front end's messages name the problem
        if isinstance(error, RequestError):
            raise
        raise RequestError(" ".join(str(error).split()) or type(error).__name__, "messages") from None
    return question, clip, prompt_tokens


async def _read_json(request, limit: int):
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(f"the request body is over {limit} bytes, this server's limit.", status=413)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise RequestError(f"the request body is over {limit} bytes, this server's limit.", status=413)
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RequestError(f"the request body is not JSON ({error}).") from None
    except RecursionError:
        raise RequestError("the request body is nested too deeply.") from None


def build_app(
    model,
    processor,
    served_names: list[str],
    settings: ServerSettings,
    scheduler_options: dict | None = None,
    load_model=None,
):
    """
    The app serving `model` under `served_names` (the first is the name `/v1/models` shows). `load_model()` returns
    `(model, processor)` again, for the admin route `/load_model` after `/reset` (admin routes need
    `settings.admin_routes`, an API key and `load_model`). Returns `(app, scheduler)`; the scheduler thread owns the
    model; call `scheduler.close()` when done.
    """
    import anyio
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    scheduler = BatchScheduler(model, processor, **(scheduler_options or {}))
    names = set(served_names)
    downloads = anyio.CapacityLimiter(MAX_CONCURRENT_DOWNLOADS)
    app = FastAPI(title="af2 serve", docs_url=None, redoc_url=None, openapi_url=None)

    def authorised(request: Request) -> bool:
        if settings.api_key is None:
            return True
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), settings.api_key.encode())

    def unauthorised():
        return error_response(
            401, "missing or wrong API key: send Authorization: Bearer <key>.", headers={"WWW-Authenticate": "Bearer"}
        )

    @app.exception_handler(RequestError)
    async def request_error(request, error: RequestError):
        headers = {"Retry-After": str(error.retry_after)} if isinstance(error, QueueFull) else None
        return error_response(error.status, str(error), error.param, error.code, headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, error):
        if error.status_code == 404:
            message = f"no route {request.method} {request.url.path}; this server offers {ROUTES}."
        elif error.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}; this server offers {ROUTES}."
        else:
            message = str(error.detail)
        return error_response(error.status_code, message)

    @app.exception_handler(Exception)
    async def internal_error(request, error):
        logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=error)
        return error_response(500, "internal server error (logged on the server).")

    @app.get("/health")
    async def health():
        return {"status": "ok" if scheduler.loaded else "unloaded", **scheduler.status()}

    @app.get("/v1/models")
    async def models(request: Request):
        if not authorised(request):
            return unauthorised()
        card = {"id": served_names[0], "object": "model", "created": 0, "owned_by": "transformers-af2"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        if not authorised(request):
            return unauthorised()
        chat = parse_chat_request(await _read_json(request, settings.request_bytes_limit()), names, settings.limits)
        if not scheduler.loaded:
            raise RequestError("the model is unloaded (POST /load_model loads it again).", status=503, code="unloaded")
        scheduler.check_capacity()  # before reading the audio: a full server refuses at once
        deadline = time.monotonic() + settings.request_timeout
        limiter = downloads if settings.audio.allow_urls and _names_a_url(chat) else None
        question, clip, prompt_tokens = await anyio.to_thread.run_sync(
            model_inputs_for, chat, scheduler.family, settings.audio, limiter=limiter
        )
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def deliver(event):  # from the scheduler thread
            with contextlib.suppress(RuntimeError):  # a closed loop: the server is stopping
                loop.call_soon_threadsafe(events.put_nowait, event)

        job = Job(chat, question, clip, prompt_tokens, deliver, deadline)
        scheduler.submit(job)
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if chat.stream:
            return StreamingResponse(_stream(job, events, completion_id, created), media_type="text/event-stream")
        try:
            while True:
                timeout = min(DISCONNECT_POLL_SECONDS, max(0.0, job.deadline - time.monotonic()))
                try:
                    event = await asyncio.wait_for(events.get(), timeout)
                except asyncio.TimeoutError:
                    if time.monotonic() > job.deadline:
                        job.cancelled.set()
                        return error_response(504, "the request took longer than this server's request timeout.")
                    if await request.is_disconnected():
                        job.cancelled.set()
                        return JSONResponse({}, status_code=499)
                    continue
                if event[0] == "done":
                    return _completion(chat, event[1], completion_id, created)
                if event[0] == "error":
                    return error_response(event[1], event[2])
        finally:
            job.cancelled.set()  # a finished job ignores it; one still queued or running stops

    async def _stream(job: Job, events: asyncio.Queue, completion_id: str, created: int):
        chat = job.request

        def chunk(choices, usage=None) -> str:
            body = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": chat.model,
                    "choices": choices}  # fmt: skip
            if usage is not None:
                body["usage"] = usage
            return f"data: {json.dumps(body)}\n\n"

        try:
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                         for i in range(chat.n)])  # fmt: skip
            while True:
                remaining = job.deadline - time.monotonic()
                try:
                    event = await asyncio.wait_for(events.get(), max(0.0, remaining))
                except asyncio.TimeoutError:
                    event = ("error", 504, "the request took longer than this server's request timeout.")
                if event[0] == "delta":
                    yield chunk([{"index": event[1], "delta": {"content": event[2]}, "finish_reason": None}])
                elif event[0] == "done":
                    result = event[1]
                    yield chunk([{"index": i, "delta": {}, "finish_reason": reason}
                                 for i, _, reason in result["choices"]])  # fmt: skip
                    if chat.include_usage:
                        yield chunk([], _usage(result))
                    break
                else:
                    error = {"message": event[2], "type": ERROR_TYPES.get(event[1], "server_error"), "param": None,
                             "code": None}  # fmt: skip
                    yield f"data: {json.dumps({'error': error})}\n\n"
                    break
            yield "data: [DONE]\n\n"
        finally:
            job.cancelled.set()  # the client left (or the stream ended): its rows stop

    if settings.admin_routes:
        if settings.api_key is None or load_model is None:
            raise ValueError("admin routes need an API key (--api-key or AF2_API_KEY) and a way to load the model.")

        @app.post("/reset")
        async def reset_route(request: Request):
            if not authorised(request):
                return unauthorised()
            await run_in_threadpool(scheduler.swap_model, None, None)
            return {"status": "unloaded"}

        @app.post("/load_model")
        async def load_model_route(request: Request):
            if not authorised(request):
                return unauthorised()
            body = await _read_json(request, 64 * 1024)
            wanted = body.get("model") if isinstance(body, dict) else None
            if wanted not in names:
                raise RequestError(
                    f"this server loads only the model it was started with ({served_names[0]!r}), not {wanted!r}.",
                    "model",
                )
            if not scheduler.loaded:
                await run_in_threadpool(lambda: scheduler.swap_model(*load_model()))
            return {"status": "loaded", "model": served_names[0]}

    return app, scheduler


def _names_a_url(chat: ChatRequest) -> bool:
    return any(
        isinstance(item, dict) and item.get("type") == "audio_url"
        for message in chat.messages
        if isinstance(message["content"], list)
        for item in message["content"]
    )


def _usage(result: dict) -> dict:
    return {
        "prompt_tokens": result["prompt_tokens"],
        "completion_tokens": result["completion_tokens"],
        "total_tokens": result["prompt_tokens"] + result["completion_tokens"],
    }


def _completion(chat: ChatRequest, result: dict, completion_id: str, created: int) -> dict:
    choices = [
        {
            "index": index,
            "message": {"role": "assistant", "content": text},
            "finish_reason": reason,
            "logprobs": None,
        }
        for index, text, reason in result["choices"]
    ]
    return {"id": completion_id, "object": "chat.completion", "created": created, "model": chat.model,
            "choices": choices, "usage": _usage(result)}  # fmt: skip


__all__ = ["ServerSettings", "build_app", "error_response", "model_inputs_for"]
