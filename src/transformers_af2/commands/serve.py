"""`af2 serve`: a model behind OpenAI's chat completions API (`transformers_af2.serving`): the options, and the
server settings they make."""

from __future__ import annotations

import os
import sys

from ..loading import model_loading_options, resolve_device
from ..serving import API_KEY_ENV, LOCAL_HOSTS, check_serve_dependencies, load_served_model, resolve_model_path
from ..utils import install_hint
from .options import (
    DEFAULT_MODEL,
    HelpFormatter,
    add_device_arguments,
    add_listen_arguments,
    add_model_arguments,
    positive_int,
    positive_number,
)

HELP = "serve AF2 over OpenAI's /v1/chat/completions API (audio as input_audio)"
DEFAULT_PORT = 8000


def _names(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve",
        help=HELP,
        formatter_class=HelpFormatter,
        description=(
            "Serve Audio Flamingo 2 over OpenAI's chat completions API: POST /v1/chat/completions takes messages "
            'whose user turn holds one {"type": "input_audio", "input_audio": {"data": <base64>, "format": "wav"}} '
            'item and the question as text; "stream": true answers with server-sent events. Concurrent requests '
            "are answered in batches. Audio is only ever the client's data: paths and URLs are refused unless "
            "--allow-audio-urls. With --api-key (or $AF2_API_KEY) every route but /health needs "
            f"Authorization: Bearer <key>. Needs the [serve] extra ({install_hint('serve')}).\n\n"
            "examples:\n"
            "  af2 serve --model af2-3b-hf\n"
            "  AF2_API_KEY=secret af2 serve --model af2-3b-hf --host 0.0.0.0 --max-batch-size 16\n"
            "  af2 serve --model af2-3b-hf --allow-audio-urls cdn.example.com,media.example.org"
        ),
    )
    add_model_arguments(parser, DEFAULT_MODEL, speed_options=True)
    add_listen_arguments(parser, DEFAULT_PORT)
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
        type=positive_number,
        default=10.0,
        metavar="SECONDS",
        help="with --allow-audio-urls: limit for a connection and for each read; a whole download gets 3x",
    )
    security.add_argument("--max-audio-mb", type=positive_number, default=50.0, help="largest audio accepted, in MB")
    load = parser.add_argument_group("load")
    load.add_argument("--max-batch-size", type=positive_int, default=8, help="requests per generate call")
    load.add_argument(
        "--max-queue", type=positive_int, default=64, help="requests that may wait; beyond it: 503 with Retry-After"
    )
    load.add_argument(
        "--request-timeout", type=positive_number, default=300.0, help="seconds a request may wait and run"
    )
    load.add_argument("--max-tokens-limit", type=positive_int, default=1024, help="largest max_tokens accepted")
    parser.add_argument("--log-level", default="info", help="uvicorn's log level")
    parser.set_defaults(handler=run)


def settings_from_args(args):
    from ..audio_sources import AudioSourcePolicy
    from ..serving.app import ServerSettings
    from ..serving.chat_request import Limits

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


def run(args) -> int:
    try:
        check_serve_dependencies()
    except ImportError as error:
        raise RuntimeError(str(error)) from error  # the command line's one-line error
    import uvicorn

    from ..serving.app import build_app

    settings = settings_from_args(args)
    if settings.api_key is None and args.host not in LOCAL_HOSTS:
        print(
            f"af2 serve: WARNING: listening on {args.host} without an API key: anyone who reaches this address can "
            f"use the model. Give --api-key or set {API_KEY_ENV}.",
            file=sys.stderr,
            flush=True,
        )
    path = resolve_model_path(args.model, args.config)
    device = resolve_device(args.device)
    # Once, at start: --fast reads the record af2 fast-settings made for --model (the files the user named, not the
    # conversion cache), and a reload through /load_model keeps these settings.
    loading_options = model_loading_options(device, args.dtype, args.fast, args.quantization, args.model, args.config)

    def load():
        return load_served_model(path, device, loading_options, args.attn_implementation)

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
