"""`af2 convert`: an original-layout AF2 checkpoint into a transformers repository."""

from __future__ import annotations

from ..utils import DTYPE_NAMES
from .options import HelpFormatter

HELP = "convert an original-layout AF2 checkpoint into a transformers repository"


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert",
        help=HELP,
        formatter_class=HelpFormatter,
        description=(
            "Convert NVIDIA's original Audio Flamingo 2 checkpoint (safe_ckpt/ + clap_ckpt/) into a repository that "
            "AutoModel/AutoProcessor load after `import transformers_af2`.\n\n"
            "examples:\n"
            "  af2 convert nvidia/audio-flamingo-2 af2-3b-hf\n"
            "  af2 convert ./my-af2-ckpt out-dir --config configs/inference.yaml \\\n"
            "      --tokenizer Qwen/Qwen2.5-3B --lm-config Qwen/Qwen2.5-3B"
        ),
    )
    parser.add_argument(
        "source", help="local directory or hub id in the original layout, e.g. nvidia/audio-flamingo-2"
    )
    parser.add_argument(
        "output",
        help="directory to write the converted repository to; an earlier conversion there is replaced atomically, "
        "anything else is refused unless --overwrite",
    )
    parser.add_argument("--revision", help="branch, tag or commit of a hub SOURCE (default: main)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace OUTPUT even when it is not an earlier AF2 conversion (its content is deleted)",
    )
    parser.add_argument(
        "--config",
        help="the original configs/inference.yaml (clap_config + model_config); not needed for the released hub ids",
    )
    parser.add_argument("--tokenizer", help="base Qwen2.5 tokenizer, path or hub id (default: from --config)")
    parser.add_argument("--lm-config", help="base Qwen2.5 config, path or hub id (default: from --config)")
    parser.add_argument("--lm-weights", help="base LM weights, read only for LM parameters safe_ckpt lacks")
    parser.add_argument("--dtype", default="float32", choices=DTYPE_NAMES, help="dtype of the written weights")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(handler=run)


def run(args) -> int:
    from transformers.utils import logging as hf_logging

    from ..convert import convert_checkpoint, resolve_source

    if args.quiet:
        disable_progress_bars()
    # disable=None: tqdm shows the bar only when stderr is a terminal (not in logs or CI).
    bar_format = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]"
    with hf_logging.tqdm(
        total=2, desc="af2 convert", bar_format=bar_format, disable=True if args.quiet else None
    ) as bar:
        bar.set_postfix_str(f"fetching {args.source}")
        # hub ids: download (huggingface_hub shows a bar per file); directories: as is
        directory = resolve_source(args.source, args.revision)
        bar.update()
        bar.set_postfix_str(f"converting into {args.output}")
        # It refuses an output that would destroy something before any conversion work (check_output).
        convert_checkpoint(
            args.source,
            args.output,
            config=args.config,
            tokenizer=args.tokenizer,
            lm_config=args.lm_config,
            lm_weights=args.lm_weights,
            dtype=args.dtype,
            revision=args.revision,
            overwrite=args.overwrite,
            directory=directory,
        )
        bar.update()
    print(f"wrote {args.output}")
    return 0


def disable_progress_bars() -> None:
    """--quiet: no bar from transformers or huggingface_hub."""
    from huggingface_hub.utils import disable_progress_bars as disable_hub_bars
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    disable_hub_bars()
