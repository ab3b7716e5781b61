"""The `af2` command line: `af2 generate` answers questions about audio files, `af2 convert` converts checkpoints."""

from __future__ import annotations

import argparse
import json
import os
import sys

from transformers import TextStreamer

DEFAULT_MODEL = "nvidia/audio-flamingo-2"
# The original demo's sampling settings (inference_HF_pretrained/inference.py).
DEFAULT_TOP_K = 30
DEFAULT_TOP_P = 0.95
DTYPES = ("auto", "float32", "bfloat16", "float16")


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
    parser.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="dtype of the written weights"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(handler=_run_convert)


def _run_convert(args) -> int:
    from transformers.utils import logging as hf_logging

    from .convert import check_output, convert_checkpoint, resolve_source

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
        check_output(args.output, directory, args.overwrite)  # refuse before the conversion, not after it
        bar.update()
        bar.set_postfix_str(f"converting into {args.output}")
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
            "examples:\n"
            '  af2 generate --audio dog.wav --prompt "What is the sound in this audio?"\n'
            '  af2 generate --model af2-3b-hf --audio a.wav --audio b.flac --prompt "Describe the audio." --json\n'
            '  af2 generate --model nvidia/audio-flamingo-2-SoundCoT --audio a.wav --prompt "Why is he angry?" \\\n'
            "      --max-new-tokens 1024 --sample --soundcot-repair --stream"
        ),
    )
    parser.add_argument(
        "--model", default=DEFAULT_MODEL, help="converted repository, or original-layout hub id or directory"
    )
    parser.add_argument(
        "--config",
        metavar="YAML",
        help="for an original-layout directory without configs/inference.yaml: the original inference YAML",
    )
    parser.add_argument(
        "--audio",
        action="append",
        required=True,
        metavar="FILE",
        help="audio file (WAV, FLAC, OGG, MP3); repeat for several files",
    )
    parser.add_argument(
        "--prompt",
        action="append",
        required=True,
        metavar="TEXT",
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
        type=float,
        default=None,
        metavar="P",
        help=f"with --sample: nucleus sampling mass (default {DEFAULT_TOP_P})",
    )
    parser.add_argument("--temperature", type=float, default=None, metavar="T", help="with --sample: temperature")
    parser.add_argument("--seed", type=int, default=None, help="random seed, for repeatable sampling")
    parser.add_argument("--batch-size", type=_positive_int, default=1, metavar="B", help="files per generate call")
    parser.add_argument(
        "--device", default="auto", help='"cpu", "cuda", "cuda:1", ...; "auto" takes the GPU when there is one'
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=DTYPES,
        help='model precision; "auto" is bfloat16 on GPU and float32 on CPU',
    )
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
        help="print one JSON list of {audio, prompt, answer, tokens} (tokens: the generated ids, up to and "
        "including eos) instead of text",
    )
    parser.set_defaults(handler=_run_generate)


def _positive_int(value: str) -> int:
    number = int(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return number


def _resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"--device {name!r} is not a device ({error}).") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine; use --device cpu.")
    return device


def _resolve_dtype(name: str, device):
    import torch

    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def load_model_and_processor(
    model_id: str, device=None, dtype=None, original_config: str | None = None, fast_cpu_linears: bool = False
):
    """
    `(model, processor)` for a converted repository (local or hub) or an original-layout checkpoint (hub id or
    directory; converted on first use and cached, see `transformers_af2.hub_ids`). `original_config` is the original
    inference YAML, for original-layout directories that lack one.
    `fast_cpu_linears` turns on the CPU inference kernels of `transformers_af2.modeling.cpu_linear` when the model
    runs on CPU (the commands do; a model meant for quantization, PEFT or training must not).
    """
    from transformers import AutoProcessor

    from .convert import cached_conversion, is_original_layout
    from .modeling import AudioFlamingo2ForConditionalGeneration

    looks_local = os.path.isabs(model_id) or model_id.startswith((".", "~")) or os.path.exists(model_id)
    if looks_local and not os.path.isdir(os.path.expanduser(model_id)):
        raise FileNotFoundError(f"model {model_id}: no such directory.")
    model_id = os.path.expanduser(model_id)
    if original_config is not None:
        if not is_original_layout(model_id):
            raise ValueError(
                f"original_config (--config) is for checkpoints in the original layout; {model_id} is not one."
            )
        model_id = str(cached_conversion(model_id, config=original_config))
    # An original-layout id is converted (once, cached) by these calls themselves: see transformers_af2.hub_ids.
    model = AudioFlamingo2ForConditionalGeneration.from_pretrained(model_id, dtype=dtype)
    processor = AutoProcessor.from_pretrained(model_id)
    if device is not None:
        model.to(device)
    if fast_cpu_linears and model.device.type == "cpu":
        from .modeling.cpu_linear import enable_fast_cpu_linears

        enable_fast_cpu_linears(model)
    return model.eval(), processor


def _pair_inputs(audios: list[str], prompts: list[str]) -> list[tuple[str, str]]:
    if len(prompts) == 1:
        prompts = prompts * len(audios)
    if len(prompts) != len(audios):
        raise ValueError(
            f"got {len(audios)} --audio and {len(prompts)} --prompt; give one --prompt for all files or one per file."
        )
    for path in audios:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such audio file.")
    return list(zip(audios, prompts))


def _run_generate(args) -> int:
    import torch
    from transformers import pipeline, set_seed

    from .pipelines import TASK

    pairs = _pair_inputs(args.audio, args.prompt)
    if not args.do_sample and any(v is not None for v in (args.top_k, args.top_p, args.temperature)):
        raise ValueError("--top-k, --top-p and --temperature apply to --sample only.")
    device = _resolve_device(args.device)
    dtype = _resolve_dtype(args.dtype, device)
    if args.seed is not None:
        set_seed(args.seed)
    model, processor = load_model_and_processor(
        args.model, device=device, dtype=dtype, original_config=args.config, fast_cpu_linears=True
    )
    pipe = pipeline(TASK, model=model, processor=processor, device=device)

    generate_kwargs = {"do_sample": args.do_sample}
    if args.do_sample:
        generate_kwargs.update(
            top_k=args.top_k or DEFAULT_TOP_K, top_p=DEFAULT_TOP_P if args.top_p is None else args.top_p
        )
        if args.temperature is not None:
            generate_kwargs["temperature"] = args.temperature
    if args.max_new_tokens is not None:
        generate_kwargs["max_new_tokens"] = args.max_new_tokens
    options = {"return_tensors": True, "soundcot_repair": args.soundcot_repair, **generate_kwargs}

    several = len(pairs) > 1
    if args.stream:
        # A streamer follows one sequence: the files go one by one.
        for index, (audio, prompt) in enumerate(pairs):
            if several:
                print(f"[{index + 1}] {audio}", flush=True)
            record = pipe(audio=audio, text=prompt, streamer=AnswerStreamer(processor, sys.stdout), **options)[0]
            if record.get("soundcot_repaired"):
                print("af2 generate: the answer above had no conclusion; printed again, repaired.", file=sys.stderr)
        return 0
    with torch.inference_mode():
        outputs = pipe(audio=[a for a, _ in pairs], text=[p for _, p in pairs], batch_size=args.batch_size, **options)
    results = [(audio, prompt, records[0]) for (audio, prompt), records in zip(pairs, outputs)]

    if args.json:
        payload = []
        for audio, prompt, record in results:
            entry = {
                "audio": audio,
                "prompt": prompt,
                "answer": record["generated_text"],
                "tokens": record["generated_token_ids"].tolist(),
            }
            if args.soundcot_repair:
                entry["soundcot_repaired"] = record["soundcot_repaired"]
            payload.append(entry)
        print(json.dumps(payload, ensure_ascii=False))
        return 0
    for index, (audio, _, record) in enumerate(results):
        if several:
            print(f"[{index + 1}] {audio}")
        print(record["generated_text"])
    return 0


class AnswerStreamer(TextStreamer):
    """
    Writes the answer while it is generated: only what follows the prompt's `<SEP>` (so the prefix of a SoundCoT
    repair pass shows too), special tokens skipped, leading whitespace dropped as in the final answer.
    """

    def __init__(self, processor, file=None):
        super().__init__(processor.tokenizer, skip_prompt=False, skip_special_tokens=True)
        self.sep_token_id = processor.tokenizer.convert_tokens_to_ids("<SEP>")
        self.file = file if file is not None else sys.stdout
        self.started = False

    def put(self, value):
        if self.next_tokens_are_prompt:
            self.next_tokens_are_prompt = False
            ids = value[0].tolist() if value.ndim > 1 else value.tolist()
            after = ids[len(ids) - ids[::-1].index(self.sep_token_id) :] if self.sep_token_id in ids else []
            if after:
                super().put(value.new_tensor(after))
            return
        super().put(value)

    def on_finalized_text(self, text: str, stream_end: bool = False):
        if not self.started:
            text = text.lstrip()
            self.started = bool(text)
        self.file.write(text)
        if stream_end:
            self.file.write("\n")
            self.started = False
        self.file.flush()


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="af2",
        description=(
            "Audio Flamingo 2 with Hugging Face transformers: answer questions about audio, convert NVIDIA's "
            "checkpoints. Run `af2 COMMAND --help` for a command's options."
        ),
        epilog="Errors print one line, `af2 COMMAND: error: ...`, and exit with status 2 (set AF2_DEBUG=1 for a "
        "traceback).",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"af2 {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_generate(subparsers)
    _add_convert(subparsers)
    _add_caption(subparsers)
    _add_train(subparsers)
    _add_demo(subparsers)
    _add_serve(subparsers)
    return parser


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
