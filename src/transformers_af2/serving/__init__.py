"""
`af2 serve`: Audio Flamingo 2 behind OpenAI's chat completions API, safe to put on a network.

```bash
af2 serve --model af2-3b-hf                                   # http://127.0.0.1:8000/v1/chat/completions
AF2_API_KEY=secret af2 serve --model af2-3b-hf --host 0.0.0.0 # clients send Authorization: Bearer secret
```

- `app`: the FastAPI app (routes, API key, OpenAI error bodies); `chat_request`: the request fields and their
  checks; `scheduler`: the thread that owns the model and answers queued requests in batches.
- What a client's audio may be (data, never a server path; URLs only when the operator opts in) is decided by
  `transformers_af2.audio_sources`, shared with every command that answers someone else.

Needs the `[serve]` extra (fastapi, uvicorn, pydantic, openai); the imports happen when the command runs, so
`af2 --help` does not load them. The app does not use transformers' own server (`transformers serve`), whose
internals differ between transformers versions.
"""

from __future__ import annotations

import argparse
import os
import sys

DEFAULT_PORT = 8000
SERVE_EXTRA_HINT = "pip install 'transformers-af2[serve]'"
API_KEY_ENV = "AF2_API_KEY"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def _check_serve_dependencies() -> None:
    import importlib.util

    missing = [name for name in ("fastapi", "uvicorn", "pydantic") if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(f"af2 serve needs {', '.join(missing)}; install them with: {SERVE_EXTRA_HINT}")


def resolve_model_path(model: str, original_config: str | None = None) -> str:
    """A converted repository as is; an original-layout checkpoint converted (once, cached) into one."""
    from ..convert import cached_conversion, is_original_layout

    model = os.path.expanduser(model)
    if not is_original_layout(model):
        if original_config is not None:
            raise ValueError(f"--config is for checkpoints in the original layout; {model} is not one.")
        return model
    options = {} if original_config is None else {"config": original_config}
    return str(cached_conversion(model, **options))


def load_served_model(path: str, device: str = "auto", dtype: str = "auto", quantization: str | None = None,
                      attn_implementation: str | None = None, fast: bool = False):  # fmt: skip
    """`(model, processor)` of a checkpoint of any family (`transformers_af2.families`), placed on `device`, loaded as
    every command loads it (`cli.load_model_and_processor`: `--dtype`, `--fast`, `--quantization`), in eval mode."""
    from ..cli import _resolve_device, load_model_and_processor, model_loading_options

    place = _resolve_device(device)
    options = {"attn_implementation": attn_implementation} if attn_implementation else {}
    return load_model_and_processor(
        path, device=place, **model_loading_options(place, dtype, fast, quantization), **options
    )


# ---------------------------------------------------------------------------------------------------------------------
# af2 serve
# ---------------------------------------------------------------------------------------------------------------------


def _positive(kind):
    def check(value: str):
        number = kind(value)
        if not number > 0:
            raise argparse.ArgumentTypeError(f"must be greater than 0, got {value}")
        return number

    return check


def _names(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def add_serve_parser(subparsers, formatter_class=argparse.HelpFormatter, default_model: str | None = None) -> None:
    from ..cli import add_device_arguments, add_model_arguments

    parser = subparsers.add_parser(
        "serve",
        help="serve AF2 over OpenAI's /v1/chat/completions API (audio as input_audio)",
        formatter_class=formatter_class,
        description=(
            "Serve Audio Flamingo 2 over OpenAI's chat completions API: POST /v1/chat/completions takes messages "
            'whose user turn holds one {"type": "input_audio", "input_audio": {"data": <base64>, "format": "wav"}} '
            'item and the question as text; "stream": true answers with server-sent events. Concurrent requests '
            "are answered in batches. Audio is only ever the client's data: paths and URLs are refused unless "
            "--allow-audio-urls. With --api-key (or $AF2_API_KEY) every route but /health needs "
            f"Authorization: Bearer <key>. Needs the [serve] extra ({SERVE_EXTRA_HINT}).\n\n"
            "examples:\n"
            "  af2 serve --model af2-3b-hf\n"
            "  AF2_API_KEY=secret af2 serve --model af2-3b-hf --host 0.0.0.0 --max-batch-size 16\n"
            "  af2 serve --model af2-3b-hf --allow-audio-urls cdn.example.com,media.example.org"
        ),
    )
    add_model_arguments(parser, default_model, speed_options=True)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port to listen on")
    add_device_arguments(parser)
    parser.add_argument("--attn-implementation", help='attention backend, e.g. "sdpa" or "flash_attention_2"')
    security = parser.add_argument_group("security")
    security.add_argument(
        "--api-key",
        help=f"require Authorization: Bearer <key> on every route but /health (default: ${API_KEY_ENV}, which other "
        "users of the machine cannot read from the process list as they can this option)",
    )
    security.add_argument(
        "--admin-routes",
        action="store_true",
        help="offer POST /reset (unload the model) and POST /load_model (load it again); needs an API key",
    )
    security.add_argument(
        "--allow-audio-urls",
        nargs="?",
        const="",
        metavar="HOSTS",
        type=str,
        help="fetch http(s) audio URLs for clients (public addresses only); optionally only from these hosts "
        "(comma-separated). Off: audio must be sent as data",
    )
    security.add_argument(
        "--audio-url-trusted-networks",
        type=_names,
        default=[],
        metavar="CIDRS",
        help="with --allow-audio-urls: non-public addresses that may still be fetched from (comma-separated, e.g. "
        "an internal mirror 10.1.2.3/32)",
    )
    security.add_argument(
        "--audio-url-timeout",
        type=_positive(float),
        default=10.0,
        metavar="SECONDS",
        help="with --allow-audio-urls: limit for a connection and for each read; a whole download gets 3x",
    )
    security.add_argument("--max-audio-mb", type=_positive(float), default=50.0, help="largest audio accepted, in MB")
    load = parser.add_argument_group("load")
    load.add_argument("--max-batch-size", type=_positive(int), default=8, help="requests per generate call")
    load.add_argument(
        "--max-queue", type=_positive(int), default=64, help="requests that may wait; beyond it: 503 with Retry-After"
    )
    load.add_argument(
        "--request-timeout", type=_positive(float), default=300.0, help="seconds a request may wait and run"
    )
    load.add_argument("--max-tokens-limit", type=_positive(int), default=1024, help="largest max_tokens accepted")
    parser.add_argument("--log-level", default="info", help="uvicorn's log level")
    parser.set_defaults(handler=run_serve)


def settings_from_args(args):
    from ..audio_sources import AudioSourcePolicy
    from .app import ServerSettings
    from .chat_request import Limits

    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if args.admin_routes and api_key is None:
        raise ValueError(f"--admin-routes needs an API key: give --api-key or set {API_KEY_ENV}.")
    policy = AudioSourcePolicy.from_options(
        allow_urls=args.allow_audio_urls is not None,
        allowed_hosts=_names(args.allow_audio_urls or ""),
        trusted_networks=args.audio_url_trusted_networks,
        max_bytes=int(args.max_audio_mb * 1024 * 1024),
        connect_timeout=args.audio_url_timeout,
        read_timeout=args.audio_url_timeout,
        total_timeout=3 * args.audio_url_timeout,
    )
    if args.audio_url_trusted_networks and not policy.allow_urls:
        raise ValueError("--audio-url-trusted-networks applies to --allow-audio-urls, which is not given.")
    limits = Limits(max_tokens=args.max_tokens_limit, default_max_tokens=min(256, args.max_tokens_limit))
    return ServerSettings(
        api_key=api_key,
        admin_routes=args.admin_routes,
        audio=policy,
        limits=limits,
        request_timeout=args.request_timeout,
    )


def run_serve(args) -> int:
    try:
        _check_serve_dependencies()
    except ImportError as error:
        raise RuntimeError(str(error)) from error  # the command line's one-line error
    import uvicorn

    from .app import build_app

    settings = settings_from_args(args)
    if settings.api_key is None and args.host not in LOCAL_HOSTS:
        print(
            f"af2 serve: WARNING: listening on {args.host} without an API key: anyone who reaches this address can "
            f"use the model. Give --api-key or set {API_KEY_ENV}.",
            file=sys.stderr,
            flush=True,
        )
    path = resolve_model_path(args.model, args.config)

    def load():
        return load_served_model(
            path, args.device, args.dtype, args.quantization, args.attn_implementation, fast=args.fast
        )

    model, processor = load()
    served_names = list(dict.fromkeys([args.model, path]))
    app, scheduler = build_app(
        model,
        processor,
        served_names,
        settings,
        scheduler_options={"max_batch_size": args.max_batch_size, "max_queue": args.max_queue},
        load_model=load,
    )
    del model
    print(f"af2 serve: {args.model} on http://{args.host}:{args.port}/v1/chat/completions", flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        scheduler.close()
    return 0


__all__ = ["add_serve_parser", "load_served_model", "resolve_model_path", "run_serve", "settings_from_args"]
