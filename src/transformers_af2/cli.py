"""The `af2` command line: `af2 generate` answers questions about audio files, `af2 convert` converts checkpoints."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

from .quantization import QUANTIZATION_NAMES
from .utils import DTYPE_NAMES, parse_dtype

DEFAULT_MODEL = "nvidia/audio-flamingo-2"
# The original demo's sampling settings (inference_HF_pretrained/inference.py).
DEFAULT_TOP_K = 30
DEFAULT_TOP_P = 0.95


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the examples in descriptions as written; shows an option's default when it has a meaningful one."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, True, argparse.SUPPRESS) or not action.option_strings:
            return text
        return text + " (default: %(default)s)"


# ---------------------------------------------------------------------------------------------------------------------
# af2 convert
# ---------------------------------------------------------------------------------------------------------------------


def _add_convert(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert an original-layout AF2 checkpoint into a transformers repository",
        formatter_class=_HelpFormatter,
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
    parser.set_defaults(handler=_run_convert)


def _run_convert(args) -> int:
    from transformers.utils import logging as hf_logging

    from .convert import convert_checkpoint, resolve_source

    if args.quiet:
        _disable_progress_bars()
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


# ---------------------------------------------------------------------------------------------------------------------
# af2 generate
# ---------------------------------------------------------------------------------------------------------------------


def _add_generate(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="answer a question about one or more audio files",
        formatter_class=_HelpFormatter,
        description=(
            "Answer a question about audio files with Audio Flamingo 2 and print the answers.\n\n"
            "The model is a converted repository (local or hub), or a checkpoint in NVIDIA's original layout (hub id "
            "or directory), which is converted on first use and cached under $AF2_CACHE "
            "(default $HF_HOME/transformers_af2).\n\n"
            "Every file that can be answered is answered: a file that cannot be read (or whose generation fails) is "
            "reported on stderr, one line each (and as `error` in --json), and af2 exits with status 1 after "
            "printing all answers.\n\n"
            "examples:\n"
            '  af2 generate --audio dog.wav --prompt "What is the sound in this audio?"\n'
            '  af2 generate --model af2-3b-hf --audio a.wav --audio b.flac --prompt "Describe the audio." --json\n'
            '  af2 generate --model nvidia/audio-flamingo-2-SoundCoT --audio a.wav --prompt "Why is he angry?" \\\n'
            "      --max-new-tokens 1024 --sample --soundcot-repair --stream"
        ),
    )
    add_model_arguments(parser, speed_options=True)
    parser.add_argument(
        "--audio",
        action="append",
        required=True,
        metavar="FILE",
        type=_non_empty("--audio"),
        help="audio file (WAV, FLAC, OGG, MP3); repeat for several files",
    )
    parser.add_argument(
        "--prompt",
        action="append",
        required=True,
        metavar="TEXT",
        type=_question,
        help="the question; give it once for all files, or once per --audio in the same order",
    )
    parser.add_argument(
        "--max-new-tokens",
        type=_positive_int,
        default=None,
        metavar="N",
        help="most tokens to generate (default: the model's generation config, 256 for converted checkpoints)",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--sample",
        dest="do_sample",
        action="store_true",
        default=False,
        help=f"sample, as the original demo did (top-k {DEFAULT_TOP_K}, top-p {DEFAULT_TOP_P} unless set)",
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
        type=_positive_int,
        default=None,
        metavar="K",
        help=f"with --sample: keep the K most likely tokens (default {DEFAULT_TOP_K})",
    )
    parser.add_argument(
        "--top-p",
        type=_probability,
        default=None,
        metavar="P",
        help=f"with --sample: nucleus sampling mass, in (0, 1] (default {DEFAULT_TOP_P})",
    )
    parser.add_argument(
        "--temperature", type=_positive_float, default=None, metavar="T", help="with --sample: temperature, > 0"
    )
    parser.add_argument(
        "--seed", type=_seed, default=None, help=f"random seed in [0, {MAX_SEED}], for repeatable sampling"
    )
    parser.add_argument("--batch-size", type=_positive_int, default=1, metavar="B", help="files per generate call")
    add_device_arguments(parser)
    parser.add_argument(
        "--soundcot-repair",
        action="store_true",
        help="for AF2-SoundCoT: when an answer reasons without concluding, cut it and generate the conclusion again "
        "(the original's repair step)",
    )
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--stream", action="store_true", help="print each answer while it is generated")
    output.add_argument(
        "--json",
        action="store_true",
        help="print one JSON list of {audio, prompt, answer, tokens, error} (tokens: the generated ids, up to and "
        "including eos; error: null, or why this file has no answer) instead of text",
    )
    parser.set_defaults(handler=_run_generate)


# -- argument types: each bad value is an argparse error naming the option, the value and what is expected ----------

# numpy's generator (seeded by utils.set_seed) takes 32-bit seeds.
MAX_SEED = 2**32 - 1


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value!r}") from None
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return number


def _seed(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, {MAX_SEED}], got {value!r}") from None
    if not 0 <= number <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, {MAX_SEED}], got {value}")
    return number


def _finite_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {value}")
    return number


def _probability(value: str) -> float:
    number = _finite_float(value)
    if not 0 < number <= 1:  # top-p 0 would keep one token (greedy), above 1 nothing: both silently not sampling
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return number


def _positive_float(value: str) -> float:
    number = _finite_float(value)
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
        type=_non_empty("--model"),
        help="converted repository, or original-layout hub id or directory",
    )
    parser.add_argument(
        "--config",
        metavar="YAML",
        type=_non_empty("--config"),
        help="for an original-layout directory without configs/inference.yaml: the original inference YAML",
    )
    if speed_options:
        add_speed_arguments(parser)


def add_speed_arguments(parser) -> None:
    """`--fast` and `--quantization`; the command passes them to `model_loading_options`."""
    parser.add_argument(
        "--fast",
        action="store_true",
        help="the settings measured fastest on this kind of device while keeping float32's answers (with --dtype "
        "auto: bfloat16 on GPUs and on CPUs with avx512_bf16/AMX; on CPU, linear kernels measured once and cached). "
        "See transformers_af2.presets",
    )
    parser.add_argument(
        "--quantization",
        choices=QUANTIZATION_NAMES,
        help="weight-only quantization of the language model at load (the audio encoder stays in --dtype): int8 / "
        "int4 (torchao), bnb-8bit / bnb-4bit (bitsandbytes); needs transformers-af2[quantization]. See "
        "transformers_af2.quantization",
    )


def add_device_arguments(parser) -> None:
    """`--device` and `--dtype`, as the commands that place the model themselves take them (`_resolve_device`,
    `parse_dtype` read them)."""
    parser.add_argument(
        "--device", default="auto", help='"cpu", "cuda", "cuda:1", ...; "auto" takes the GPU when there is one'
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", *DTYPE_NAMES),
        help='model precision; "auto" is bfloat16 on GPU and float32 on CPU',
    )


def _non_empty(option: str):
    def check(value: str) -> str:
        if not value.strip():
            raise argparse.ArgumentTypeError(f"{option} must not be empty")
        return value

    check.__name__ = option.lstrip("-")  # argparse names the type in some messages
    return check


def _question(value: str) -> str:
    if not value.strip():
        raise argparse.ArgumentTypeError("the question must not be empty")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # bytes that are not UTF-8 reach Python as lone surrogates
        raise argparse.ArgumentTypeError(
            f"the question is not valid UTF-8 text: '{_display(value)}'; check the terminal's encoding"
        ) from None
    return value


def _display(text: str) -> str:
    """`text` printable on any UTF-8 stream, as the front end names files: undecodable bytes as `\\udcXX`."""
    from .processing.feature_extraction_audioflamingo2 import _printable

    return _printable(text)


def _resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"--device {name!r} is not a device ({error}).") from None
    if device.type == "meta":
        raise ValueError("--device meta holds no weights and cannot generate; use cpu or cuda.")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine; use --device cpu.")
    return device


def model_loading_options(device, dtype: str = "auto", fast: bool = False, quantization: str | None = None) -> dict:
    """
    The `dtype`, `quantization` and `linear_kernels` arguments of `load_model_and_processor` from a command's
    `--dtype`, `--fast` and `--quantization` (one place for every command): `--fast` picks the dtype when `--dtype` is
    auto, and the CPU linear kernels (`presets.fast_settings`).
    """
    from .presets import fast_settings

    fast_choice = fast_settings(device) if fast else None
    return {
        "dtype": parse_dtype(fast_choice.dtype if fast_choice and dtype == "auto" else dtype, device),
        "quantization": quantization,
        "linear_kernels": fast_choice.linear_kernels if fast_choice else None,
    }


def load_model_and_processor(
    model_id: str,
    device=None,
    dtype=None,
    original_config: str | None = None,
    quantization: str | None = None,
    linear_kernels: str | None = None,
    **from_pretrained_options,
):
    """
    `(model, processor)` of any supported family (see `transformers_af2.families`): an AF2 converted repository
    (local or hub) or original-layout checkpoint (hub id or directory; converted on first use and cached, see
    `transformers_af2.hub_ids`), Audio Flamingo 3 or Music Flamingo; the family comes from `config.json`.
    `original_config` is the original AF2 inference YAML, for original-layout directories that lack one.
    `quantization`: one of `quantization.QUANTIZATION_NAMES` (`--quantization`), applied while loading (AF2; its
    audio side stays unquantized). The model keeps its plain `nn.Linear` layers; on CPU, `linear_kernels` (default
    `$AF2_LINEAR_KERNELS`) routes their products through other kernels (`modeling.cpu_linear.choose_linear_kernels`:
    "auto" measures them on this machine once). Other keyword arguments go to `from_pretrained`
    (`attn_implementation`, ...).
    """
    from .families import load_model_and_processor as load_any_family

    options = dict(from_pretrained_options)
    if quantization is not None:
        from .families import AudioFlamingo2Family, detect_family
        from .quantization import quantization_config

        family = detect_family(os.path.expanduser(model_id))
        if family is not AudioFlamingo2Family:
            raise ValueError(
                f"--quantization is measured and supported for AF2 checkpoints (which modules stay unquantized is "
                f"the model's); {model_id} is {family.display_name}: load it without --quantization."
            )
        options["quantization_config"] = quantization_config(quantization, device=device, dtype=dtype)
        if device is not None:  # quantized weights are placed while loading; they cannot all be moved afterwards
            options["device_map"] = str(device)
    model, processor = load_any_family(
        model_id, device=device, dtype=dtype, original_config=original_config, **options
    )
    if model.device.type == "cpu":
        from .modeling.cpu_linear import choose_linear_kernels, use_linear_kernels

        # $AF2_LINEAR_KERNELS: unset or "default" keeps nn.Linear's path; "auto" measures once per CPU (cached).
        use_linear_kernels(model, choose_linear_kernels(model, linear_kernels))
    return model, processor


def _pair_inputs(audios: list[str], prompts: list[str]) -> list[tuple[str, str]]:
    if len(prompts) == 1:
        prompts = prompts * len(audios)
    if len(prompts) != len(audios):
        raise ValueError(
            f"got {len(audios)} --audio and {len(prompts)} --prompt; give one --prompt for all files or one per file."
        )
    return list(zip(audios, prompts))


def _unreadable(path: str) -> str | None:
    """Why `path` cannot be an audio file (checked before the model loads), or None."""
    if os.path.isdir(path):
        return f"{_display(path)}: is a directory, not an audio file."
    if not os.path.isfile(path):
        return f"{_display(path)}: no such audio file."
    return None


def _check_max_new_tokens(max_new_tokens: int | None, model) -> None:
    positions = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if max_new_tokens is not None and positions is not None and max_new_tokens >= positions:
        raise ValueError(
            f"--max-new-tokens {max_new_tokens} does not fit the model's context of {positions} positions "
            "(prompt included); give a smaller value."
        )


def _report(index: int, several: bool, audio: str, error: BaseException | str) -> str:
    """One stderr line for a file without an answer; the file is named once."""
    message = error if isinstance(error, str) else _one_line(error)
    if _display(audio) not in message and audio not in message:
        message = f"{_display(audio)}: {message}"
    line = f"af2 generate: error: {f'[{index + 1}] ' if several else ''}{message}"
    print(line, file=sys.stderr, flush=True)
    return message


def _run_generate(args) -> int:
    from transformers import pipeline

    from .families import detect_family
    from .pipelines import TASK
    from .utils import set_seed

    pairs = _pair_inputs(args.audio, args.prompt)
    if not args.do_sample and any(v is not None for v in (args.top_k, args.top_p, args.temperature)):
        raise ValueError("--top-k, --top-p and --temperature apply to --sample only.")
    if args.stream and args.batch_size > 1:
        raise ValueError("--stream prints one answer at a time; --batch-size does not apply to it.")
    device = _resolve_device(args.device)
    several = len(pairs) > 1
    errors: dict[int, str] = {}
    for index, (audio, _) in enumerate(pairs):
        if (problem := _unreadable(audio)) is not None:
            errors[index] = _report(index, several, audio, problem)
    todo = [index for index in range(len(pairs)) if index not in errors]
    answers: dict[int, dict] = {}
    family = detect_family(args.model) if todo else None
    if family is not None and not family.has_af2_pipeline:
        raise ValueError(
            f"--model {args.model} is {family.display_name}; af2 generate runs AF2's pipeline. Ask it with af2 caption "
            "(one file works too), af2 demo, or transformers' own processor and generate."
        )
    if todo:
        if args.seed is not None:
            set_seed(args.seed)
        model, processor = load_model_and_processor(
            args.model,
            device=device,
            original_config=args.config,
            **model_loading_options(device, args.dtype, args.fast, args.quantization),
        )
        _check_max_new_tokens(args.max_new_tokens, model)
        pipe = pipeline(TASK, model=model, processor=processor, device=device)
        options = {"return_tensors": True, "soundcot_repair": args.soundcot_repair, **_generate_kwargs(args)}
        if args.stream:
            _stream_answers(pipe, processor, pairs, todo, options, errors)
            return 1 if errors else 0
        inputs = [{"audio": pairs[index][0], "text": pairs[index][1]} for index in todo]
        try:
            for position, records, error in pipe.answer_each(inputs, batch_size=args.batch_size, **options):
                index = todo[position]
                if error is not None:
                    errors[index] = _report(index, several, pairs[index][0], error)
                    continue
                answers[index] = records[0]
                if not args.json:  # text: each answer as soon as it is there
                    if several:
                        print(f"[{index + 1}] {_display(pairs[index][0])}")
                    print(records[0]["generated_text"], flush=True)
        except KeyboardInterrupt:
            if args.json:  # the answers so far are not lost; the rest are marked
                for index in range(len(pairs)):
                    if index not in answers and index not in errors:
                        errors[index] = "interrupted"
                _print_json(args, pairs, answers, errors)
            raise
    if args.json:
        _print_json(args, pairs, answers, errors)
    return 1 if errors else 0


def _generate_kwargs(args) -> dict:
    generate_kwargs = {"do_sample": args.do_sample}
    if args.do_sample:
        generate_kwargs.update(
            top_k=args.top_k or DEFAULT_TOP_K, top_p=DEFAULT_TOP_P if args.top_p is None else args.top_p
        )
        if args.temperature is not None:
            generate_kwargs["temperature"] = args.temperature
    if args.max_new_tokens is not None:
        generate_kwargs["max_new_tokens"] = args.max_new_tokens
    return generate_kwargs


def _stream_answers(pipe, processor, pairs, todo, options, errors) -> None:
    """--stream: a streamer follows one sequence, so the files go one by one."""
    from .generation_utils import AnswerStreamer

    several = len(pairs) > 1
    for index in todo:
        audio, prompt = pairs[index]
        if several:
            print(f"[{index + 1}] {_display(audio)}", flush=True)
        streamer = AnswerStreamer(processor, sys.stdout)
        try:
            record = pipe(audio=audio, text=prompt, streamer=streamer, **options)[0]
        except Exception as error:
            if streamer.started:  # end the partial answer's line before the error
                print(flush=True)
            errors[index] = _report(index, several, audio, error)
            continue
        if record.get("soundcot_repaired"):
            print("af2 generate: the answer above had no conclusion; printed again, repaired.", file=sys.stderr)


def _print_json(args, pairs, answers: dict, errors: dict) -> None:
    payload = []
    for index, (audio, prompt) in enumerate(pairs):
        entry = {"audio": _display(audio), "prompt": prompt, "answer": None, "tokens": None, "error": None}
        if index in answers:
            record = answers[index]
            entry.update(answer=record["generated_text"], tokens=record["generated_token_ids"].tolist())
            if args.soundcot_repair:
                entry["soundcot_repaired"] = record["soundcot_repaired"]
        else:
            entry["error"] = errors.get(index, "not answered")
        payload.append(entry)
    print(json.dumps(payload, ensure_ascii=False), flush=True)


# ---------------------------------------------------------------------------------------------------------------------
# af2 train (from transformers_af2.trainer.cli, when present)
# ---------------------------------------------------------------------------------------------------------------------


def _add_train(subparsers) -> None:
    """`af2 train` comes from `transformers_af2.trainer.cli.add_train_parser(subparsers)` when that module exists."""
    import importlib

    name = "transformers_af2.trainer.cli"
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as error:
        if error.name in (name, "transformers_af2.trainer"):
            return  # no trainer command in this installation
        module, missing = None, error
    except ImportError as error:
        module, missing = None, error
    if module is None:  # the module is there but its dependencies are not, e.g. the [train] extras
        message = f"needs the training dependencies ({missing}); install them with: pip install -e '.[train]'"
        parser = subparsers.add_parser("train", help="fine-tune AF2 (unavailable: missing dependencies)")
        parser.set_defaults(handler=lambda args: _fail(message))
        return
    module.add_train_parser(subparsers)


def _add_eval(subparsers) -> None:
    """`af2 eval` lives in `transformers_af2.evaluation` (its metrics' extras are imported when used)."""
    from .evaluation.cli import add_eval_parser

    add_eval_parser(subparsers, formatter_class=_HelpFormatter)


def _add_caption(subparsers) -> None:
    from .caption.command import add_caption_parser

    add_caption_parser(subparsers, formatter_class=_HelpFormatter)


def _add_demo(subparsers) -> None:
    from .demo import add_demo_parser

    add_demo_parser(subparsers, formatter_class=_HelpFormatter, default_model=DEFAULT_MODEL)


def _add_serve(subparsers) -> None:
    from .serving import add_serve_parser

    add_serve_parser(subparsers, formatter_class=_HelpFormatter, default_model=DEFAULT_MODEL)


def _fail(message: str) -> int:
    raise RuntimeError(message)


# ---------------------------------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------------------------------


def _disable_progress_bars() -> None:
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    disable_progress_bars()


# The commands whose parsers live in other modules, with the line `af2 --help` shows for each. Only the command being
# run has its module imported and its parser built, so `af2 --help` or `af2 generate` import none of them, nor what
# they import (the trainer: transformers' Trainer, peft, bitsandbytes; the demo: gradio; ...).
_COMMANDS_ELSEWHERE = {
    "caption": (
        "caption or label many audio clips into a JSONL/Parquet/CSV file (resumable, data-parallel)",
        _add_caption,
    ),
    "train": ("fine-tune AF2 with the transformers Trainer (stages, LoRA, any TrainingArguments option)", _add_train),
    "eval": ("evaluate AF2 on a benchmark (MMAU, ClothoAQA, Clotho/AudioCaps captioning, classification)", _add_eval),
    "demo": ("a web page to ask AF2 about uploaded or recorded audio (Gradio)", _add_demo),
    "serve": ("serve AF2 over an OpenAI-style /v1/chat/completions API (audio as input_audio)", _add_serve),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """
    The `af2` parser. `command`: the one command of `_COMMANDS_ELSEWHERE` whose full parser is built (the others get
    their one-line help only); None builds every command's.
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
    from ._version import __version__

    parser.add_argument("--version", action="version", version=f"af2 {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_generate(subparsers)
    _add_convert(subparsers)
    for name, (summary, add_parser) in _COMMANDS_ELSEWHERE.items():
        if command is None or command == name:
            add_parser(subparsers)
        else:
            subparsers.add_parser(name, help=summary, add_help=False)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, parsed with only the named command's parser built (see `build_parser`)."""
    argv = sys.argv[1:] if argv is None else argv
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    return build_parser(command if command in _COMMANDS_ELSEWHERE else "").parse_args(argv)


def _one_line(error: BaseException) -> str:
    """An error's message on one line (the command line's and the demo's error text)."""
    return " ".join(str(error).split()) or type(error).__name__


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except KeyboardInterrupt:
        print("af2: interrupted", file=sys.stderr)
        return 130
    return run(args)


def run(args: argparse.Namespace) -> int:
    """Runs a parsed command: errors in one line (exit status 2), Ctrl-C as exit status 130."""
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print(f"af2 {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, FileNotFoundError, OSError, RuntimeError, KeyError) as error:
        if os.environ.get("AF2_DEBUG"):
            raise
        print(f"af2 {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
