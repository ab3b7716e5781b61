"""`af2 train`: fine-tune Audio Flamingo 2 with the transformers Trainer.

    af2 train --model nvidia/audio-flamingo-2 --train-file train.json --data-root /data \
        --output-dir runs/sft --stage finetune --per-device-train-batch-size 4 --gradient-accumulation-steps 2 \
        --learning-rate 2e-5 --bf16 --train-sampling-strategy group_by_length

Every `TrainingArguments` field is an option (`--learning-rate` or `--learning_rate`, `--bf16`,
`--activation-checkpointing`, `--resume-from-checkpoint PATH|last`, `--fsdp`, `--deepspeed`, ...). Several
processes: `torchrun --nproc-per-node N -m transformers_af2.trainer.cli train ...` or `accelerate launch --multi_gpu
--num_processes N -m transformers_af2.trainer.cli train ...`; on a machine without GPUs the processes train together
with gloo DDP, and a launch the Trainer would not run as one job is refused (see `trainer/README.md`).

Before the model loads, every row of the data is read (`data.check_training_data`): bad rows stop the run, or are
dropped with `--skip-bad-rows` and listed in OUTPUT_DIR/dropped_rows.jsonl.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from typing import get_type_hints


class _NoHubKernelNotice(logging.Filter):
    """
    transformers' `TrainingArguments` imports peft when installed, and peft imports bitsandbytes, which on CPUs with
    AVX512-BF16 tries at import to fetch a kernel from the Hugging Face Hub and, when that fails (as it must: this
    package runs no code from the hub), logs "Failed to load CPU gemm_4bit_forward from kernels-community: ..." on
    every `af2 train`, whatever the options. bitsandbytes falls back to its own kernel; the notice is dropped.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Failed to load CPU gemm_4bit_forward from kernels-community")


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_NoHubKernelNotice())

import torch  # noqa: E402  (after the filter: the imports below import bitsandbytes)
from transformers import HfArgumentParser, TrainingArguments  # noqa: E402
from transformers.hf_argparser import string_to_bool  # noqa: E402

from .stages import STAGES  # noqa: E402

# Options of our own; every other option is a TrainingArguments field.
_OWN_OPTIONS = (
    "model",
    "processor",
    "train_file",
    "eval_file",
    "data_root",
    "stage",
    "train_embeddings",
    "lora",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "max_length",
    "weight_decay_scope",
    "preprocessing_num_workers",
    "skip_bad_rows",
    "dropped_rows_file",
    "merge_lora",
    "handler",
    "command",
)


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    """Adds the `train` command to an `argparse` sub-parser collection (the `af2` CLI's)."""
    parser = subparsers.add_parser(
        "train",
        help="fine-tune AF2 with the transformers Trainer (stages, LoRA, any TrainingArguments option)",
        description=(
            "Fine-tune Audio Flamingo 2 on (audio, prompt, answer) examples with AF2's training text and label rule. "
            "All transformers TrainingArguments are accepted as options; the ones below are AF2's own."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    own = parser.add_argument_group("Audio Flamingo 2")
    own.add_argument(
        "--model",
        required=True,
        help="converted AF2 repository (directory or hub id), a checkpoint in the original layout, an Audio "
        "Flamingo 3 / Music Flamingo checkpoint (with --lora language_model), or a LoRA adapter saved by af2 train "
        "(folder or hub id): that adapter is then trained further",
    )
    own.add_argument("--processor", help="processor to use (default: the one saved with --model)")
    own.add_argument(
        "--train-file",
        "--train_file",
        dest="train_file",
        required=True,
        help="original AF2 dataset .json, a .jsonl of {audio, prompt, answer}, or a datasets directory",
    )
    own.add_argument("--eval-file", "--eval_file", dest="eval_file", help="evaluation data, same formats")
    own.add_argument(
        "--data-root",
        "--data_root",
        dest="data_root",
        help="folder relative audio paths are read from (default: the data file's folder)",
    )
    own.add_argument(
        "--stage",
        choices=sorted(STAGES),
        help="what trains: pretrain (audio transformer + cross-attention), finetune (+ audio tower), "
        "long-audio (audio transformer + cross-attention), full (everything), none (LoRA only). "
        "Default: finetune; with --lora: none (the adapters only)",
    )
    own.add_argument(
        "--train-embeddings",
        "--train_embeddings",
        dest="train_embeddings",
        choices=["new", "all", "none"],
        help="input embeddings: 'new' = only the <audio> and <|endofchunk|> rows (the original), "
        "'all' = the whole matrix, 'none' = frozen. Default: new; with --lora: none",
    )
    own.add_argument(
        "--lora",
        metavar="TARGETS",
        help="LoRA adapters on language_model, cross_attention, audio_transformer or both "
        "(comma-separated); only the adapters train unless --stage / --train-embeddings add more",
    )
    own.add_argument("--lora-r", "--lora_r", dest="lora_r", type=int, help="LoRA rank (default 16)")
    own.add_argument("--lora-alpha", "--lora_alpha", dest="lora_alpha", type=int, help="LoRA alpha (default 2 * r)")
    own.add_argument("--lora-dropout", "--lora_dropout", dest="lora_dropout", type=float, default=0.05)
    own.add_argument(
        "--merge-lora",
        "--merge_lora",
        dest="merge_lora",
        action="store_true",
        help="after training, also save the model with the adapters merged to OUTPUT_DIR/merged",
    )
    own.add_argument(
        "--max-length",
        "--max_length",
        dest="max_length",
        type=int,
        default=512,
        help="token limit of a training sample (the original's max_tokens)",
    )
    own.add_argument(
        "--weight-decay-scope",
        "--weight_decay_scope",
        dest="weight_decay_scope",
        default="cross_attention",
        choices=["cross_attention", "default"],
        help="parameters --weight-decay applies to: the cross-attention blocks (the original) or "
        "transformers' default rule",
    )
    own.add_argument(
        "--preprocessing-num-workers",
        "--preprocessing_num_workers",
        dest="preprocessing_num_workers",
        type=int,
        help="processes for reading the data files' audio headers and checking every row",
    )
    own.add_argument(
        "--skip-bad-rows",
        "--skip_bad_rows",
        dest="skip_bad_rows",
        action="store_true",
        help="drop rows that cannot be trained on (missing fields, audio that does not decode, no answer token left "
        "under --max-length) instead of stopping; each is listed in --dropped-rows-file",
    )
    own.add_argument(
        "--dropped-rows-file",
        "--dropped_rows_file",
        dest="dropped_rows_file",
        help="where --skip-bad-rows lists the dropped rows (default OUTPUT_DIR/dropped_rows.jsonl; "
        "OUTPUT_DIR/dropped_eval_rows.jsonl for --eval-file)",
    )

    training = parser.add_argument_group("TrainingArguments")
    hints = get_type_hints(TrainingArguments)
    fields = {field.name: field for field in dataclasses.fields(TrainingArguments) if field.init}
    for name, field in fields.items():
        if name in _OWN_OPTIONS:
            continue
        field.type = hints[name]
        HfArgumentParser._parse_dataclass_field(training, field)
    if "activation_checkpointing" not in fields:
        # Releases before the rename call it gradient_checkpointing; the current name works on every release.
        training.add_argument(
            "--activation-checkpointing",
            "--activation_checkpointing",
            dest="gradient_checkpointing",
            type=string_to_bool,
            nargs="?",
            const=True,
            default=argparse.SUPPRESS,
            help="recompute activations in the backward pass (gradient_checkpointing in this transformers release)",
        )
    # Evaluation reports the loss only unless asked otherwise: gathering full-vocabulary logits of a whole eval set
    # costs far more memory than a language model's evaluation needs.
    parser.set_defaults(handler=run_train, prediction_loss_only=True)
    return parser


def training_arguments_from(args: argparse.Namespace) -> TrainingArguments:
    """`TrainingArguments` from the parsed options. Launched as several processes (`WORLD_SIZE` > 1) on a machine
    without CUDA, the run is put on the CPU with gloo (the Trainer otherwise runs N unrelated trainings); a launch
    that still would not train as one job raises, naming the options to add."""
    refuse_single_process_accelerate_launch()
    names = {field.name for field in dataclasses.fields(TrainingArguments) if field.init}
    values = {name: value for name, value in vars(args).items() if name in names}
    if not values.get("output_dir"):
        raise ValueError("--output-dir is required.")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and not torch.cuda.is_available():
        values["use_cpu"] = True
        values["ddp_backend"] = values.get("ddp_backend") or "gloo"
    training_args = TrainingArguments(**values)
    if world_size > 1 and training_args.world_size != world_size:
        raise ValueError(
            f"launched as {world_size} processes, but the Trainer would run {training_args.world_size} "
            f"({training_args.parallel_mode}): each process would train alone into the same output folder. On CPU add "
            "--use-cpu true --ddp-backend gloo; on GPUs give each process its own device (--ddp-backend nccl)."
        )
    return training_args


def refuse_single_process_accelerate_launch() -> None:
    """
    `accelerate launch --num_processes N` without a distributed type (`--multi_gpu`) starts ONE process, which would
    train alone with 1/N of the global batch asked for. accelerate's single-process launcher then still sets
    `MASTER_ADDR`/`MASTER_PORT` (for N > 1) but no `WORLD_SIZE`; that launch is refused before anything loads.
    """
    if "ACCELERATE_USE_CPU" in os.environ and "MASTER_PORT" in os.environ and "WORLD_SIZE" not in os.environ:
        raise ValueError(
            "accelerate started 1 process although --num_processes asked for several (without GPUs it starts "
            "several only with a distributed type): launch with `accelerate launch --multi_gpu --num_processes N -m "
            "transformers_af2.trainer.cli train ...` or `torchrun --nproc-per-node N -m transformers_af2.trainer.cli "
            "train ...`."
        )


def _checked_data(path, reader: dict, collator, args, training_args, dropped_name: str):
    from .data import check_training_data, load_training_data

    dataset = load_training_data(path, **reader)
    dropped_file = args.dropped_rows_file if dropped_name == "dropped_rows.jsonl" else None
    dropped_file = dropped_file or os.path.join(training_args.output_dir, dropped_name)
    dataset, report = check_training_data(
        dataset,
        collator,
        skip_bad_rows=args.skip_bad_rows,
        dropped_rows_file=dropped_file if training_args.process_index == 0 else None,
        source=str(path),
        num_proc=args.preprocessing_num_workers,
    )
    if training_args.process_index == 0:
        print(str(report), file=sys.stderr)
        if report.dropped:
            print(f"{len(report.dropped)} rows dropped, listed in {dropped_file}", file=sys.stderr)
    if len(dataset) == 0:
        raise ValueError(f"{path}: no row left to train on ({report}).")
    return dataset


def _refuse_what_the_family_lacks(args, family) -> None:
    """Stops, in one line, a run asking for what `family` cannot train (its `training_stages`, `lora_targets`,
    `trains_new_embedding_rows`), before the data is read."""
    from .lora import resolve_lora_targets

    refusal = None
    stage = args.stage or ("none" if args.lora else "finetune")
    if family.training_unsupported:
        refusal = family.training_unsupported
    elif stage not in family.training_stages:
        refusal = (
            f"stage {stage!r} is AF2's recipe (its audio transformer, cross-attention, CLAP tower); this family "
            f"trains with --stage "
            f"{' or '.join(family.training_stages)}"
            + (f" (LoRA: --lora {','.join(family.lora_targets)})" if family.lora_targets else "")
        )
    elif args.lora and not set(resolve_lora_targets(args.lora)) <= set(family.lora_targets):
        refusal = f"--lora {args.lora}: LoRA targets for this family are {', '.join(family.lora_targets)}"
    elif args.train_embeddings not in (None, "none") and not family.trains_new_embedding_rows:
        refusal = f"--train-embeddings {args.train_embeddings} is AF2's (its added token rows); use none"
    elif (
        args.weight_decay_scope == "cross_attention"
        and getattr(args, "weight_decay", 0)
        and ("cross_attention" not in family.lora_targets)
    ):
        refusal = "it has no cross-attention blocks for --weight-decay to apply to; add --weight-decay-scope default"
    if refusal:
        raise ValueError(f"--model {args.model} is {family.display_name}: {refusal}.")


def _model_and_trainable(args, adapter: dict | None, family):
    """The model to train and, for a plain model, `set_trainable_parameters`' summary."""
    from .lora import apply_lora, continue_lora, lora_target_regex
    from .stages import set_trainable_parameters

    if adapter is not None:
        # A saved adapter trains on as it is: same targets, rank, saved modules and token rows.
        if args.lora and lora_target_regex(args.lora) != adapter.get("target_modules"):
            raise ValueError(
                f"--model {args.model} is an adapter on {adapter.get('target_modules')!r}; --lora {args.lora} asks for "
                "other targets. Drop --lora to continue this adapter, or start a new one from its base model "
                f"({adapter.get('base_model_name_or_path')})."
            )
        if args.lora_r is not None and args.lora_r != adapter.get("r"):
            raise ValueError(f"--lora-r {args.lora_r}: the adapter at {args.model} has rank {adapter.get('r')}.")
        if args.stage not in (None, "none") or args.train_embeddings not in (None, "none"):
            raise ValueError(
                "--stage / --train-embeddings do not apply when continuing an adapter: what it saves trains on."
            )
        model = continue_lora(args.model, dtype="float32")
        return model, None, "continuing adapter"

    stage = args.stage or ("none" if args.lora else "finetune")
    train_embeddings = {"new": True, "all": "all", "none": False}[
        args.train_embeddings or ("none" if args.lora else "new")
    ]
    if args.lora and train_embeddings == "all":
        raise ValueError("--train-embeddings all does not combine with --lora; use 'new' or 'none'.")
    # A local folder is loaded by its absolute path, so that an adapter trained on it names a base that loads from
    # any working directory.
    source = os.path.abspath(args.model) if os.path.isdir(args.model) else args.model
    model = family.load(source, dtype="float32")[0]
    if args.lora:
        model = apply_lora(
            model,
            targets=args.lora,
            r=16 if args.lora_r is None else args.lora_r,
            alpha=args.lora_alpha,
            dropout=args.lora_dropout,
            stage=None if stage == "none" else stage,
            train_embeddings=bool(train_embeddings),
        )
        return model, None, f"LoRA on {args.lora} (stage {stage})"
    summary = set_trainable_parameters(model, stage, train_embeddings=train_embeddings)
    return model, summary, str(summary)


def run_train(args: argparse.Namespace) -> int:
    """Runs `af2 train` with parsed arguments; returns the exit code."""
    import transformers
    from transformers import AutoProcessor

    from ..families import detect_family
    from .collator import TrainingDataCollator
    from .lora import adapter_config_of, merge_lora
    from .training import AudioFlamingo2Trainer, last_complete_checkpoint

    training_args = training_arguments_from(args)
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()

    resume = training_args.resume_from_checkpoint
    if resume is not None and resume.lower() in ("true", "last", "latest"):
        resume = last_complete_checkpoint(training_args.output_dir)
        if resume is None:
            raise ValueError(
                f"--resume-from-checkpoint {training_args.resume_from_checkpoint}: no complete checkpoint in "
                f"{training_args.output_dir}."
            )

    adapter = adapter_config_of(args.model)
    family = detect_family(adapter.get("base_model_name_or_path") if adapter is not None else args.model)
    if adapter is None:
        _refuse_what_the_family_lacks(args, family)
    processor_source = args.processor or args.model
    if args.processor is None and adapter is not None:
        has_processor = os.path.isfile(os.path.join(args.model, "processor_config.json"))
        processor_source = args.model if has_processor else adapter.get("base_model_name_or_path")
    processor = AutoProcessor.from_pretrained(processor_source)
    collator = TrainingDataCollator(family(processor), max_length=args.max_length)
    reader = {"data_root": args.data_root, "family": collator.family, "num_proc": args.preprocessing_num_workers}
    # Every row is read before the model loads: a bad row stops the run now, not hours in.
    with training_args.main_process_first(desc="reading and checking the data"):
        train_dataset = _checked_data(args.train_file, reader, collator, args, training_args, "dropped_rows.jsonl")
        eval_dataset = (
            _checked_data(args.eval_file, reader, collator, args, training_args, "dropped_eval_rows.jsonl")
            if args.eval_file
            else None
        )

    # The seed covers the adapter initialisation too (the Trainer seeds only when it is built, after it).
    transformers.set_seed(training_args.seed)
    model, trainable, description = _model_and_trainable(args, adapter, family)
    if trainable is None:
        count = sum(p.numel() for p in model.parameters() if p.requires_grad)
        description = f"{description}: {count:,} trainable parameters"
    if training_args.process_index == 0:
        print(description, file=sys.stderr)

    trainer = AudioFlamingo2Trainer(
        model=model,
        args=training_args,
        data_collator=collator,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=processor,
        weight_decay_scope=args.weight_decay_scope,
        trainable=trainable,
    )
    result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model()
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)
    trainer.save_state()
    if eval_dataset is not None:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
    if trainer.is_world_process_zero():
        if (args.lora or adapter is not None) and args.merge_lora:
            merged_dir = os.path.join(training_args.output_dir, "merged")
            merge_lora(trainer.model).save_pretrained(merged_dir)
            processor.save_pretrained(merged_dir)
            print(f"merged model written to {merged_dir}", file=sys.stderr)
        print(f"training done; model written to {training_args.output_dir}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m transformers_af2.trainer.cli ...` (the same as `af2 train ...`)."""
    parser = argparse.ArgumentParser(prog="af2")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_train_parser(subparsers)
    args = parser.parse_args(argv)
    from ..commands import run  # errors in one line, as `af2 train`'s

    return run(args)


if __name__ == "__main__":
    sys.exit(main())
