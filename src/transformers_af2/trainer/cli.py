"""`af2 train`: fine-tune Audio Flamingo 2 with the transformers Trainer.

    af2 train --model nvidia/audio-flamingo-2 --train-file train.json --data-root /data \
        --output-dir runs/sft --stage finetune --per-device-train-batch-size 4 --gradient-accumulation-steps 2 \
        --learning-rate 2e-5 --bf16 --train-sampling-strategy group_by_length

Every `TrainingArguments` field is an option (`--learning-rate` or `--learning_rate`, `--bf16`,
`--gradient-checkpointing`, `--resume-from-checkpoint PATH|last`, `--fsdp`, `--deepspeed`, ...). Multi-GPU:
`accelerate launch -m transformers_af2.trainer.cli train ...` or
`torchrun --nproc-per-node 8 -m transformers_af2.trainer.cli train ...` (see `trainer/README.md` for an FSDP config).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import get_type_hints

from transformers import HfArgumentParser, TrainingArguments

from .stages import STAGES

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
        help="converted AF2 repository (directory or hub id), or a checkpoint in the original layout",
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
        default="finetune",
        choices=sorted(STAGES),
        help="what trains: pretrain (audio transformer + cross-attention), finetune (+ audio tower), "
        "long-audio (audio transformer + cross-attention), full (everything), none (LoRA only)",
    )
    own.add_argument(
        "--train-embeddings",
        "--train_embeddings",
        dest="train_embeddings",
        default="new",
        choices=["new", "all", "none"],
        help="input embeddings: 'new' = only the <audio> and <|endofchunk|> rows (the original), "
        "'all' = the whole matrix, 'none' = frozen",
    )
    own.add_argument(
        "--lora",
        metavar="TARGETS",
        help="LoRA adapters on language_model, cross_attention, audio_transformer or both "
        "(comma-separated); the stage's other components then train fully beside them",
    )
    own.add_argument("--lora-r", "--lora_r", dest="lora_r", type=int, default=16, help="LoRA rank")
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
        help="processes for reading the data files' audio headers",
    )

    training = parser.add_argument_group("TrainingArguments")
    hints = get_type_hints(TrainingArguments)
    for field in dataclasses.fields(TrainingArguments):
        if not field.init or field.name in _OWN_OPTIONS:
            continue
        field.type = hints[field.name]
        HfArgumentParser._parse_dataclass_field(training, field)
    # Evaluation reports the loss only unless asked otherwise: gathering full-vocabulary logits of a whole eval set
    # costs far more memory than a language model's evaluation needs.
    parser.set_defaults(handler=run_train, prediction_loss_only=True)
    return parser


def training_arguments_from(args: argparse.Namespace) -> TrainingArguments:
    names = {field.name for field in dataclasses.fields(TrainingArguments) if field.init}
    values = {name: value for name, value in vars(args).items() if name in names}
    if not values.get("output_dir"):
        raise ValueError("--output-dir is required.")
    return TrainingArguments(**values)


def run_train(args: argparse.Namespace) -> int:
    """Runs `af2 train` with parsed arguments; returns the exit code."""
    import transformers
    from transformers import AutoProcessor

    from .. import AudioFlamingo2ForConditionalGeneration
    from .collator import AudioFlamingo2DataCollator
    from .data import load_training_data
    from .lora import apply_lora, merge_lora
    from .stages import set_trainable_parameters
    from .training import AudioFlamingo2Trainer

    training_args = training_arguments_from(args)
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()

    train_embeddings = {"new": True, "all": "all", "none": False}[args.train_embeddings]
    if args.lora and train_embeddings == "all":
        raise ValueError("--train-embeddings all does not combine with --lora; use 'new' or 'none'.")

    processor = AutoProcessor.from_pretrained(args.processor or args.model)
    reader = {
        "data_root": args.data_root,
        "feature_extractor": processor.feature_extractor,
        "num_proc": args.preprocessing_num_workers,
    }
    with training_args.main_process_first(desc="reading the training data"):
        train_dataset = load_training_data(args.train_file, **reader)
        eval_dataset = load_training_data(args.eval_file, **reader) if args.eval_file else None

    model = AudioFlamingo2ForConditionalGeneration.from_pretrained(args.model, dtype="float32")
    if args.lora:
        model = apply_lora(
            model,
            targets=args.lora,
            r=args.lora_r,
            alpha=args.lora_alpha,
            dropout=args.lora_dropout,
            stage=None if args.stage == "none" else args.stage,
            train_embeddings=bool(train_embeddings),
        )
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"LoRA on {args.lora} (stage {args.stage}): {trainable:,} trainable parameters", file=sys.stderr)
    else:
        print(set_trainable_parameters(model, args.stage, train_embeddings=train_embeddings), file=sys.stderr)

    trainer = AudioFlamingo2Trainer(
        model=model,
        args=training_args,
        data_collator=AudioFlamingo2DataCollator(processor, max_length=args.max_length),
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=processor,
        weight_decay_scope=args.weight_decay_scope,
    )
    resume = training_args.resume_from_checkpoint
    if resume is not None and resume.lower() in ("true", "last", "latest"):
        from transformers.trainer_utils import get_last_checkpoint

        resume = get_last_checkpoint(training_args.output_dir)
        if resume is None:
            raise ValueError(
                f"--resume-from-checkpoint {training_args.resume_from_checkpoint}: no checkpoint in "
                f"{training_args.output_dir}."
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
        if args.lora and args.merge_lora:
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
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
