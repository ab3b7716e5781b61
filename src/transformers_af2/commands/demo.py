"""`af2 demo`: the Gradio page of `transformers_af2.demo`, for one model."""

from __future__ import annotations

import os

from ..utils import install_hint
from .options import DEFAULT_MODEL, HelpFormatter, add_device_arguments, add_listen_arguments, add_model_arguments

HELP = "a web page to ask AF2, AF3 or Music Flamingo about uploaded or recorded audio (Gradio)"
DEFAULT_PORT = 7860


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help=HELP,
        formatter_class=HelpFormatter,
        description=(
            "Start a Gradio page to ask Audio Flamingo 2, Audio Flamingo 3 or Music Flamingo (any checkpoint af2 "
            "caption takes) about a clip: upload or record audio, see the windows the model reads, ask questions and "
            "read the answer as it is generated. Needs the [demo] extra "
            f"({install_hint('demo')}).\n\n"
            "examples:\n"
            "  af2 demo\n"
            "  af2 demo --model af2-0.5b-hf --port 7861\n"
            "  af2 demo --model nvidia/audio-flamingo-2-SoundCoT --share"
        ),
    )
    add_model_arguments(parser, DEFAULT_MODEL, speed_options=True)
    add_listen_arguments(parser, DEFAULT_PORT)
    parser.add_argument("--share", action="store_true", help="also publish the page through a gradio.live link")
    add_device_arguments(parser)
    parser.add_argument(
        "--max-cached-clips", type=int, default=8, metavar="N", help="encoded clips kept for further questions"
    )
    parser.set_defaults(handler=run)


def run(args) -> int:
    from ..demo import AudioQuestionAnswerer, build_demo, import_gradio
    from ..loading import load_model_and_processor, model_loading_options, resolve_device

    try:
        import_gradio()  # fail before loading a model when the extra is missing
    except ImportError as error:
        raise RuntimeError(str(error)) from error  # the command line's one-line error
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    device = resolve_device(args.device)
    model, processor = load_model_and_processor(
        args.model,
        device=device,
        original_config=args.config,
        **model_loading_options(device, args.dtype, args.fast, args.quantization, args.model, args.config),
    )
    answerer = AudioQuestionAnswerer(model, processor, max_cached_clips=args.max_cached_clips)
    soundcot = answerer.family.supports_soundcot_repair and "soundcot" in str(args.model).lower()
    name = os.path.basename(os.path.normpath(args.model)) if os.path.isdir(args.model) else args.model
    demo = build_demo(answerer, title=f"{answerer.family.display_name} — {name}", soundcot_default=soundcot)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, ssr_mode=False, show_error=True)
    return 0
