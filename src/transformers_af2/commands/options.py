"""
What the commands share on their command lines: the help layout, the argument types (each bad value is an argparse
error naming the option, the value and what is expected) and the option groups every command that loads a model
takes (`--model`/`--config`, `--fast`/`--quantization`, `--device`/`--dtype`, `--host`/`--port`). Below the command
modules; imports neither torch nor transformers.
"""

from __future__ import annotations

import argparse
import math
import os

from ..quantization import QUANTIZATION_NAMES
from ..utils import DEFAULT_TOP_K, DEFAULT_TOP_P, DTYPE_NAMES

DEFAULT_MODEL = "nvidia/audio-flamingo-2"


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the examples in descriptions as written; shows an option's default when it has a meaningful one."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, True, argparse.SUPPRESS) or not action.option_strings:
            return text
        return text + " (default: %(default)s)"


# numpy's generator (seeded by utils.set_seed) takes 32-bit seeds.
MAX_SEED = 2**32 - 1


def _integer(value: str, expected: str, lowest: int, highest: int | None = None) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {expected}, got {value!r}") from None
    if number < lowest or (highest is not None and number > highest):
        raise argparse.ArgumentTypeError(f"must be {expected}, got {value}")
    return number


def positive_int(value: str) -> int:
    return _integer(value, "a positive integer", 1)


def seed(value: str) -> int:
    return _integer(value, f"an integer in [0, {MAX_SEED}]", 0, MAX_SEED)


def finite_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {value}")
    return number


def probability(value: str) -> float:
    number = finite_float(value)
    if not 0 < number <= 1:  # top-p 0 would keep one token (greedy), above 1 nothing: both silently not sampling
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return number


def positive_number(value: str) -> float:
    """A finite number > 0 (sizes, seconds): `inf` is refused, not taken as "no limit"."""
    number = finite_float(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {value}")
    return number


def positive_float(value: str) -> float:
    """A sampling temperature: `positive_number`, pointing at --greedy for a deterministic answer."""
    number = finite_float(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(
            f"must be greater than 0 (use --greedy for deterministic answers), got {value}"
        )
    return number


def add_model_arguments(parser, default_model: str | None = DEFAULT_MODEL, speed_options: bool = False) -> None:
    """`--model` and `--config`, as every command that loads AF2 takes them (`load_model_and_processor` reads
    them); with `speed_options`, also `--fast` and `--quantization`, for a command that passes them on to
    `presets.fast_settings` and `load_model_and_processor` (an option taken and not applied would be ignored
    silently)."""
    parser.add_argument(
        "--model",
        default=default_model,
        type=non_empty("--model"),
        help="converted repository, or original-layout hub id or directory",
    )
    parser.add_argument(
        "--config",
        metavar="YAML",
        type=non_empty("--config"),
        help="for an original-layout directory without configs/inference.yaml: the original inference YAML",
    )
    if speed_options:
        add_speed_arguments(parser)


def add_speed_arguments(parser) -> None:
    """`--fast` and `--quantization`; the command passes them to `model_loading_options`."""
    parser.add_argument(
        "--fast",
        action="store_true",
        help="the fastest settings that keep float32's answers: what `af2 fast-settings` measured for this model on "
        "this machine (with --dtype auto; it may take int8/int4 weights), else bfloat16 on GPUs and on CPUs with "
        "avx512_bf16/AMX; on CPU, linear kernels measured once and cached. See transformers_af2.presets",
    )
    parser.add_argument(
        "--quantization",
        choices=QUANTIZATION_NAMES,
        help="weight-only quantization of the language model at load (the audio encoder stays in --dtype): int8 / "
        "int4 (torchao), bnb-8bit / bnb-4bit (bitsandbytes); needs transformers-af2[quantization]. See "
        "transformers_af2.quantization",
    )


def add_sampling_arguments(parser, sample_note: str = "", seed_help: str = "for repeatable sampling") -> None:
    """`--sample`/`--greedy` (`do_sample`), `--top-k`, `--top-p`, `--temperature` and `--seed`, as the commands that
    generate answers take them; unset values are None (the command fills in `utils.DEFAULT_TOP_K`/`DEFAULT_TOP_P`).
    `sample_note` ends `--sample`'s help, `seed_help` `--seed`'s."""
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--sample",
        dest="do_sample",
        action="store_true",
        default=False,
        help=f"sample, as the original demo did (top-k {DEFAULT_TOP_K}, top-p {DEFAULT_TOP_P} unless set)"
        + sample_note,
    )
    mode.add_argument(
        "--greedy",
        dest="do_sample",
        action="store_false",
        default=False,
        help="greedy decoding, the original benchmark setting (the default)",
    )
    parser.add_argument(
        "--top-k",
        type=positive_int,
        default=None,
        metavar="K",
        help=f"with --sample: keep the K most likely tokens (default {DEFAULT_TOP_K})",
    )
    parser.add_argument(
        "--top-p",
        type=probability,
        default=None,
        metavar="P",
        help=f"with --sample: nucleus sampling mass, in (0, 1] (default {DEFAULT_TOP_P})",
    )
    parser.add_argument(
        "--temperature", type=positive_float, default=None, metavar="T", help="with --sample: temperature, > 0"
    )
    parser.add_argument("--seed", type=seed, default=None, help=f"random seed in [0, {MAX_SEED}], {seed_help}")


def add_device_arguments(parser, dtype: bool = True) -> None:
    """`--device` and (with `dtype`) `--dtype`, as the commands that place the model themselves take them
    (`loading.resolve_device`, `utils.parse_dtype` read them)."""
    parser.add_argument(
        "--device", default="auto", help='"cpu", "cuda", "cuda:1", ...; "auto" takes the GPU when there is one'
    )
    if not dtype:
        return
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", *DTYPE_NAMES),
        help='model precision; "auto" is bfloat16 on GPU and float32 on CPU',
    )


def add_listen_arguments(parser, default_port: int) -> None:
    """`--host` and `--port`, as the commands that serve on a network take them; local only unless told."""
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=default_port, help="port to listen on")


def non_empty(option: str):
    def check(value: str) -> str:
        if not value.strip():
            raise argparse.ArgumentTypeError(f"{option} must not be empty")
        return value

    check.__name__ = option.lstrip("-")  # argparse names the type in some messages
    return check


def question(value: str) -> str:
    if not value.strip():
        raise argparse.ArgumentTypeError("the question must not be empty")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # bytes that are not UTF-8 reach Python as lone surrogates
        raise argparse.ArgumentTypeError(
            f"the question is not valid UTF-8 text: '{display(value)}'; check the terminal's encoding"
        ) from None
    return value


def unreadable_audio_file(path: str) -> str | None:
    """Why `path` cannot be an audio file (checked before the model loads), or None."""
    if os.path.isdir(path):
        return f"{display(path)}: is a directory, not an audio file."
    if not os.path.isfile(path):
        return f"{display(path)}: no such audio file."
    return None


def display(text: str) -> str:
    """`text` printable on any UTF-8 stream, as the front end names files: undecodable bytes as `\\udcXX`."""
    from ..processing.feature_extraction_audioflamingo2 import _printable

    return _printable(text)
