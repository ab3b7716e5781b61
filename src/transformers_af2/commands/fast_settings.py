"""`af2 fast-settings`: measure on this machine which settings `--fast` takes for a model (`transformers_af2.presets`)."""

from __future__ import annotations

import argparse
import json
import sys

from ..fast_measurement import DEFAULT_PROMPT
from .options import (
    HelpFormatter,
    add_device_arguments,
    add_model_arguments,
    display,
    non_empty,
    positive_int,
    question,
    unreadable_audio_file,
)

HELP = "measure on this machine, for one model, the fastest settings that keep float32's answers (what --fast takes)"


def _setting(value: str):
    from ..presets import parse_setting

    try:
        return parse_setting(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "fast-settings",
        help=HELP,
        formatter_class=HelpFormatter,
        description=(
            "Load the model in each setting this device supports (float32; bfloat16 where it is native; bfloat16 "
            "with int8 or int4 weights for AF2, with the [quantization] extra), answer the same clips greedily in "
            "each, and record, for this model's files on this machine, the fastest setting whose answers keep >= 97% "
            "of float32's tokens. `--fast` on every command then takes it (an explicit --dtype or --quantization "
            "still wins). Your own clips (--audio) measure what you will run; without them, three built-in 10 s "
            "clips (a tone, a chirp, clicks).\n\n"
            "examples:\n"
            "  af2 fast-settings --model af2-3b-hf --device cpu\n"
            "  af2 fast-settings --model af2-3b-hf --audio a.wav --audio b.wav --prompt 'Describe the audio.'\n"
            "  af2 fast-settings --model af2-3b-hf --show"
        ),
    )
    add_model_arguments(parser)
    add_device_arguments(parser, dtype=False)  # each setting names its dtype
    parser.add_argument("--audio", action="append", type=non_empty("--audio"), metavar="FILE", help="a clip (repeat)")
    parser.add_argument("--prompt", type=question, default=DEFAULT_PROMPT, help="the question asked about every clip")
    parser.add_argument(
        "--new-tokens", type=positive_int, default=32, metavar="N", help="most tokens per answer (default 32)"
    )
    parser.add_argument(
        "--candidates",
        nargs="+",
        type=_setting,
        metavar="SETTING",
        help="the settings to measure, DTYPE or DTYPE+SCHEME (e.g. bfloat16 bfloat16+int8 bfloat16+bnb-4bit); "
        "default: what this device supports",
    )
    parser.add_argument(
        "--show", action="store_true", help="print what --fast takes for this model here; measure nothing"
    )
    parser.add_argument("--json", action="store_true", help="print the whole record as JSON")
    parser.set_defaults(handler=run)


def _check_model_names_something(model: str) -> None:
    """A --model that is neither an existing path nor a hub id is a typo: say so, rather than measure nothing or show
    the device table as if the model had no record."""
    import os

    from ..convert.source import HUB_ID

    if not os.path.exists(os.path.expanduser(model)) and not HUB_ID.fullmatch(model):
        raise ValueError(f"--model {display(model)}: no such directory, and not a hub id (ORG/NAME).")


def run(args) -> int:
    from ..fast_measurement import measure_fast_settings
    from ..loading import resolve_device
    from ..presets import fast_settings, setting_name

    device = resolve_device(args.device)
    _check_model_names_something(args.model)
    if args.show:
        choice = fast_settings(device, model_id=args.model, original_config=args.config)
        print(f"--fast for {display(args.model)} on {device}: {setting_name(choice.dtype, choice.quantization)} "
              f"({choice.reason})")  # fmt: skip
        return 0
    audio = None
    if args.audio:
        for path in args.audio:
            if (problem := unreadable_audio_file(path)) is not None:
                raise ValueError(f"--audio {problem}")
        audio = {display(path): path for path in args.audio}
    record = measure_fast_settings(
        args.model, device, audio=audio, prompt=args.prompt, new_tokens=args.new_tokens,
        candidates=args.candidates, original_config=args.config,
        report=lambda line: print(f"af2 fast-settings: {line}", file=sys.stderr, flush=True),
    )  # fmt: skip
    if args.json:
        print(json.dumps(record, ensure_ascii=False))
        return 0
    print("| setting | time of float32's answers | agreement with float32 (tokens / identical answers) | --fast |")
    print("|---|---|---|---|")
    for entry in record["measurements"]:
        agreement = entry["agreement"]
        chosen = "yes" if entry["setting"] == record["choice"]["setting"] else ""
        print(f"| {entry['setting']} | {entry['seconds']:.2f} s | {agreement['tokens']:.1%} / "
              f"{agreement['identical_answers']} of {agreement['answers']} | {chosen} |")  # fmt: skip
    where = f"recorded in {record['path']}" if "path" in record else "not recorded (the model's files are unknown)"
    print(f"--fast takes {record['choice']['setting']} for this model on this machine; {where}")
    return 0
