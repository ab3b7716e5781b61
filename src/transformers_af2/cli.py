"""The `af2` command line."""

from __future__ import annotations

import argparse
import sys


def _add_convert(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert an original-layout AF2 checkpoint into a transformers repository",
        description=(
            "Convert NVIDIA's original Audio Flamingo 2 checkpoint (safe_ckpt/ + clap_ckpt/) into a repository that "
            "AutoModel/AutoProcessor load after `import transformers_af2`."
        ),
    )
    parser.add_argument("source", help="local directory or hub id in the original layout, e.g. nvidia/audio-flamingo-2")
    parser.add_argument("output", help="directory to write the converted repository to")
    parser.add_argument("--config", help="the original configs/inference.yaml (clap_config + model_config)")
    parser.add_argument("--tokenizer", help="base Qwen2.5 tokenizer, path or hub id (default: from --config)")
    parser.add_argument("--lm-config", help="base Qwen2.5 config, path or hub id (default: from --config)")
    parser.add_argument("--lm-weights", help="base LM weights, read only for LM parameters safe_ckpt lacks")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="dtype of the written weights (default: float32)")
    parser.set_defaults(handler=_run_convert)


def _run_convert(args) -> int:
    from .convert import convert_checkpoint

    convert_checkpoint(
        args.source,
        args.output,
        config=args.config,
        tokenizer=args.tokenizer,
        lm_config=args.lm_config,
        lm_weights=args.lm_weights,
        dtype=args.dtype,
    )
    print(f"wrote {args.output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="af2", description="Audio Flamingo 2 with Hugging Face transformers.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_convert(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, TypeError, FileNotFoundError, OSError) as error:
        print(f"af2 {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
