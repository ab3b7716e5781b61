"""
`af2 serve`: Audio Flamingo 2 behind an OpenAI-style `/v1/chat/completions` route (streaming and not), served by
transformers' own server (`transformers serve`'s FastAPI app), with the audio as `input_audio` content:

```bash
af2 serve --model af2-3b-hf                       # http://127.0.0.1:8000/v1/chat/completions
```

Needs the `[serve]` extra (`pip install transformers-af2[serve]`: fastapi, uvicorn, openai, pydantic).

Why not `transformers serve af2-3b-hf` itself: that command never imports this package, so AF2's config is unknown
to it; and even with AF2 registered, three things in the server stop it (transformers 5.23/5.24):
- `cli/serving/model_manager.py` (`_load_model`, 5.23 line 298 / 5.24 line 314) picks the model class with
  `config.model_type in MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES`, a static dict that models registered through
  `AutoModelForMultimodalLM.register` are not in, so it falls back to `getattr(transformers,
  config.architectures[0])` (5.23 line 303) and fails with AttributeError; `get_model_modality` (5.23 line 473)
  fails the same way ("Unknown modality"), and without MULTIMODAL the server drops `input_audio` content.
  `import transformers_af2` adds AF2 to that dict.
- `cli/serving/chat_completion.py` line 138 calls `processor.apply_chat_template` with no error handling, so an
  unreadable audio payload becomes a bare "500 Internal Server Error". Here such request errors are answered with
  HTTP 400 and the processor's message.
- The served model must be named by its path on every request (`model=` must equal the pinned id); here the name
  given to `--model` is accepted as well, which matters for original-layout checkpoints, served from their converted
  copy.

Everything else (routes, request parsing, `input_audio` -> the processor's chat template, streaming, the inference
thread that runs one `generate` at a time, `--quantization bnb-8bit`) is transformers' own code.
"""

from __future__ import annotations

import argparse
import os

DEFAULT_PORT = 8000
SERVE_EXTRA_HINT = "pip install 'transformers-af2[serve]'"
# Errors raised while turning a request into model inputs (unreadable audio, a message without audio, bad
# parameters): the client's mistake, answered with 400 and the message.
REQUEST_ERRORS = (ValueError, TypeError, KeyError, OSError)


def _check_serve_dependencies() -> None:
    from transformers.utils.import_utils import is_serve_available

    if not is_serve_available():
        raise ImportError(
            f"af2 serve needs fastapi, uvicorn, pydantic and openai; install them with: {SERVE_EXTRA_HINT}"
        )


def resolve_model_path(model: str, original_config: str | None = None) -> str:
    """A converted repository as is; an original-layout checkpoint converted (once, cached) into one."""
    from .convert import cached_conversion, is_original_layout

    model = os.path.expanduser(model)
    if not is_original_layout(model):
        if original_config is not None:
            raise ValueError(f"--config is for checkpoints in the original layout; {model} is not one.")
        return model
    options = {} if original_config is None else {"config": original_config}
    return str(cached_conversion(model, **options))


def build_app(
    model: str,
    served_name: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    quantization: str | None = None,
    attn_implementation: str | None = None,
):
    """
    transformers' serving app (as `transformers serve` builds it) pinned to the AF2 repository `model` and loaded
    now; requests may name it `model` or `served_name`. Returns `(app, model_manager, generation_state)`; call
    `generation_state.shutdown()` and `model_manager.shutdown()` when done.
    """
    _check_serve_dependencies()
    from fastapi import HTTPException
    from fastapi.responses import JSONResponse
    from transformers.cli.serving.chat_completion import ChatCompletionHandler
    from transformers.cli.serving.completion import CompletionHandler
    from transformers.cli.serving.model_manager import ModelManager
    from transformers.cli.serving.response import ResponseHandler
    from transformers.cli.serving.server import build_server
    from transformers.cli.serving.systemone import SystemOneHandler
    from transformers.cli.serving.transcription import TranscriptionHandler
    from transformers.cli.serving.utils import GenerationState

    def openai_error(message: str, status_code: int):
        """OpenAI's error body, which OpenAI clients show as the error's message."""
        body = {"message": message, "type": "invalid_request_error", "param": None, "code": None}
        return JSONResponse({"error": body}, status_code=status_code)

    aliases = {name for name in (model, served_name) if name}

    class AudioFlamingo2ChatCompletionHandler(ChatCompletionHandler):
        """transformers' chat completions, with request errors answered as HTTP 400 and the `--model` name accepted."""

        async def handle_request(self, body: dict, request_id: str):
            if body.get("model") in aliases:
                body["model"] = model
            try:
                return await super().handle_request(body, request_id)
            except HTTPException as error:
                return openai_error(str(error.detail), error.status_code)
            except REQUEST_ERRORS as error:
                return openai_error(" ".join(str(error).split()) or type(error).__name__, 400)

    model_manager = ModelManager(
        device=device,
        dtype=dtype,
        attn_implementation=attn_implementation,
        quantization=quantization,
        force_model=model,
    )
    generation_state = GenerationState(continuous_batching=False, compile=False, cb_config=None)
    handlers = dict(model_manager=model_manager, generation_state=generation_state)
    app = build_server(
        model_manager,
        AudioFlamingo2ChatCompletionHandler(**handlers),
        completion_handler=CompletionHandler(**handlers),
        response_handler=ResponseHandler(**handlers),
        transcription_handler=TranscriptionHandler(model_manager, generation_state),
        systemone_handler=SystemOneHandler(**handlers),
        generation_state=generation_state,
    )
    return app, model_manager, generation_state


# ---------------------------------------------------------------------------------------------------------------------
# af2 serve
# ---------------------------------------------------------------------------------------------------------------------


def add_serve_parser(subparsers, formatter_class=argparse.HelpFormatter, default_model: str | None = None) -> None:
    from .cli import add_model_arguments
    from .utils import DTYPE_NAMES

    parser = subparsers.add_parser(
        "serve",
        help="serve AF2 over an OpenAI-style /v1/chat/completions API (audio as input_audio)",
        formatter_class=formatter_class,
        description=(
            "Serve Audio Flamingo 2 with transformers' own server: POST /v1/chat/completions takes OpenAI chat "
            'messages whose user turn holds one {"type": "input_audio", "input_audio": {"data": <base64>, '
            '"format": "wav"}} item (or "audio_url") and one text item; "stream": true answers with server-sent '
            f"events. Needs the [serve] extra ({SERVE_EXTRA_HINT}).\n\n"
            "examples:\n"
            "  af2 serve --model af2-3b-hf\n"
            "  af2 serve --model nvidia/audio-flamingo-2-0.5B --port 8001\n"
            "  af2 serve --model af2-3b-hf --quantization bnb-8bit"
        ),
    )
    add_model_arguments(parser, default_model)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port to listen on")
    parser.add_argument(
        "--device", default="auto", help='"auto" (GPU when there is one), "cpu", "cuda:0", ... (a device_map)'
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", *DTYPE_NAMES),
        help='"auto": the dtype of the weights',
    )
    parser.add_argument(
        "--quantization", choices=("bnb-8bit", "bnb-4bit"), help="load the weights quantized with bitsandbytes"
    )
    parser.add_argument("--attn-implementation", help='attention backend, e.g. "sdpa" or "flash_attention_2"')
    parser.add_argument("--log-level", default="info", help="uvicorn's log level")
    parser.set_defaults(handler=run_serve)


def run_serve(args) -> int:
    try:
        _check_serve_dependencies()
    except ImportError as error:
        raise RuntimeError(str(error)) from error  # the command line's one-line error
    import uvicorn

    path = resolve_model_path(args.model, args.config)
    app, model_manager, generation_state = build_app(
        path,
        served_name=args.model,
        device=args.device,
        dtype=args.dtype,
        quantization=args.quantization,
        attn_implementation=args.attn_implementation,
    )
    print(f"af2 serve: {args.model} on http://{args.host}:{args.port}/v1/chat/completions", flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        generation_state.shutdown()
        model_manager.shutdown()
    return 0


__all__ = ["add_serve_parser", "build_app", "resolve_model_path"]
