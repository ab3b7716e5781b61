"""
The `af2` command line: `build_parser`, `main`, and `run` (one-line errors, exit status 2; Ctrl-C, 130).

Each command is a module of this package with its one-line `HELP`, `add_parser(subparsers)` and `run(args)`; what
they share on the command line is `options`, and how they load a model is `transformers_af2.loading`. Only the
command being run has its parser built, and no module here imports torch or transformers at import time: `af2
--help`, `af2 COMMAND --help` and usage errors answer at once. The engines the commands run (`caption`,
`evaluation`, `serving`, `demo`, `trainer`, `convert`) never import this package.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys

from ..utils import one_line

# In the order `af2 --help` lists them; each is the module `transformers_af2.commands.<name>` ("-" read as "_").
COMMANDS = ("generate", "convert", "caption", "train", "eval", "demo", "serve", "fast-settings")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """
    The `af2` parser. `command`: the one command whose full parser is built (the others get their one-line help
    only); None builds every command's.
    """
    parser = argparse.ArgumentParser(
        prog="af2",
        description=(
            "Audio Flamingo 2 with Hugging Face transformers: answer questions about audio, convert NVIDIA's "
            "checkpoints. Run `af2 COMMAND --help` for a command's options."
        ),
        epilog="Errors print one line, `af2 COMMAND: error: ...`, and exit with status 2 (set AF2_DEBUG=1 for a "
        "traceback); `af2 generate` exits with 1 when some files got no answer (the others are printed), and Ctrl-C "
        "exits with 130.",
    )
    from .._version import __version__

    parser.add_argument("--version", action="version", version=f"af2 {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f".{name.replace('-', '_')}", __name__)
        if command is None or command == name:
            module.add_parser(subparsers)
        else:
            subparsers.add_parser(name, help=module.HELP, add_help=False)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, parsed with only the named command's parser built (see `build_parser`)."""
    argv = sys.argv[1:] if argv is None else argv
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    return build_parser(command if command in COMMANDS else "").parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except KeyboardInterrupt:
        print("af2: interrupted", file=sys.stderr)
        return 130
    return run(args)


@contextlib.contextmanager
def _loading_choices_reported(command: str):
    """Prints, on stderr, the settings `transformers_af2.loading` chose for the user (what `--fast` took, and why) as
    `af2 COMMAND: ...` lines: a run whose settings come from a measurement must say so, or a refused resume or a
    changed answer has no visible cause."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"af2 {command}: %(message)s"))
    handler.setLevel(logging.INFO)
    logger = logging.getLogger("transformers_af2.loading")
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # once: a caller's own logging setup would print the line a second time
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def run(args: argparse.Namespace) -> int:
    """Runs a parsed command: errors in one line (exit status 2), Ctrl-C as exit status 130."""
    try:
        with _loading_choices_reported(args.command):
            return args.handler(args)
    except KeyboardInterrupt:
        print(f"af2 {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, FileNotFoundError, OSError, RuntimeError, KeyError) as error:
        if os.environ.get("AF2_DEBUG"):
            raise
        print(f"af2 {args.command}: error: {one_line(error)}", file=sys.stderr)
        return 2


__all__ = ["COMMANDS", "build_parser", "main", "parse_args", "run"]
