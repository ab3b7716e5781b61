"""`af2 eval`: a benchmark, evaluated the way the original does (`evaluation.runner.run_evaluation` runs it)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .options import DEFAULT_MODEL, HelpFormatter, add_device_arguments, add_speed_arguments, positive_int

HELP = "evaluate AF2 on a benchmark (MMAU, ClothoAQA, Clotho/AudioCaps captioning, classification)"


def _task_table() -> str:
    from ..evaluation.tasks import TASKS

    width = max(len(name) for name in TASKS)
    return "\n".join(
        f"  {name:<{width}}  {task.description}\n  {'':<{width}}  --data {task.data_hint}"
        for name, task in TASKS.items()
    )


def add_parser(subparsers) -> None:
    # Here, not at the top: `af2 --help` and the other commands import this module for HELP only.
    from ..evaluation.tasks import GENERATION_SETTINGS, TASKS

    parser = subparsers.add_parser(
        "eval",
        help=HELP,
        formatter_class=HelpFormatter,
        description=(
            "Evaluate Audio Flamingo 2 on a benchmark in its public file format, the way the original evaluation "
            "does: AF2's prompt for the task, greedy decoding (1 beam, 256 new tokens, stop at eos), the benchmark's "
            "official scoring. Predictions go to OUTPUT/predictions.jsonl (a re-run resumes), scores to "
            "OUTPUT/results.json and OUTPUT/results.md (MMAU: also OUTPUT/mmau-submission.json, the official "
            "submission format). af2 writes only into a folder it created, one run at a time; a resume with another "
            "model, weights, data, prompt or settings is refused, naming the difference (--overwrite starts anew).\n\n"
            f"tasks:\n{_task_table()}\n\n"
            "examples:\n"
            "  af2 eval --task mmau --data mmau-test-mini.json --model af2-3b-hf --output runs/mmau\n"
            "  af2 eval --task clotho_caption --data clotho_captions_evaluation.csv --audio-root evaluation/ \\\n"
            "      --model nvidia/audio-flamingo-2 --output runs/clotho"
        ),
    )
    parser.add_argument("--task", required=True, choices=sorted(TASKS), metavar="NAME", help="the benchmark")
    parser.add_argument("--data", required=True, metavar="FILE_OR_DIR", help="the benchmark's file or folder")
    parser.add_argument("--audio-root", metavar="DIR", help="folder of the audio files (default: per task)")
    parser.add_argument(
        "--model", default=DEFAULT_MODEL, help="converted repository, or original-layout hub id or directory"
    )
    parser.add_argument("--output", required=True, metavar="DIR", help="folder for predictions and results")
    parser.add_argument(
        "--prompt", metavar="TEMPLATE", help="replace the task's prompt template ({question}, {options}, ...)"
    )
    parser.add_argument("--batch-size", type=positive_int, default=8, metavar="B", help="questions per generate call")
    parser.add_argument(
        "--max-new-tokens",
        type=positive_int,
        default=GENERATION_SETTINGS["max_new_tokens"],
        metavar="N",
        help="most tokens per answer (the original evaluation: 256)",
    )
    parser.add_argument("--limit", type=positive_int, metavar="N", help="evaluate the first N items only")
    parser.add_argument(
        "--engine",
        default="auto",
        choices=("auto", "loop", "caption"),
        help="caption: af2 caption's engine (audio read ahead in worker processes, batches grouped by length, "
        "data-parallel under torchrun); loop: a plain batched loop in this process; auto: caption",
    )
    parser.add_argument(
        "--num-workers", type=int, default=2, metavar="N", help="caption engine: processes reading audio (0: none)"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="start anew in --output: remove af2's files there (other files are left alone)",
    )
    add_device_arguments(parser)
    add_speed_arguments(parser)
    parser.set_defaults(handler=run)


def run(args) -> int:
    import torch

    from ..evaluation.engines import CaptionEngine, LoopEngine
    from ..evaluation.generation import BatchedAnswerGenerator
    from ..evaluation.runner import run_evaluation
    from ..evaluation.tasks import GENERATION_SETTINGS
    from ..families import family_for
    from ..loading import load_model_and_processor, model_loading_options, resolve_device

    if args.num_workers < 0:
        raise ValueError(f"--num-workers must be 0 or more, got {args.num_workers}.")
    device = resolve_device(args.device)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device(f"cuda:{os.environ['LOCAL_RANK']}")  # one GPU per data-parallel process
    model, processor = load_model_and_processor(
        args.model,
        device=device,
        **model_loading_options(device, args.dtype, args.fast, args.quantization, model_id=args.model),
    )
    # The family's own prompt for the task where its authors publish one (recorded as the run's prompt template).
    family_prompt = family_for(model, processor).eval_prompt(args.task)
    prompt_template = args.prompt if args.prompt is not None or family_prompt is None else family_prompt.template
    settings = {**GENERATION_SETTINGS, "max_new_tokens": args.max_new_tokens}
    if args.engine == "loop":
        engine = LoopEngine(BatchedAnswerGenerator(model, processor, settings))
    else:
        engine = CaptionEngine(model, processor, settings, num_workers=args.num_workers)

    results = run_evaluation(
        args.task,
        args.data,
        args.output,
        engine,
        audio_root=args.audio_root,
        model_name=args.model,
        prompt_template=prompt_template,
        batch_size=args.batch_size,
        limit=args.limit,
        overwrite=args.overwrite,
    )
    if results is None:  # a data-parallel helper process: the main one scores and prints
        return 0
    for name, reason in results["skipped"].items():
        print(f"af2 eval: {name} skipped: {reason}", file=sys.stderr)
    print((Path(args.output) / "results.md").read_text(encoding="utf-8"), end="")
    return 0
