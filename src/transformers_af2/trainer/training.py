"""`AudioFlamingo2Trainer`: the transformers `Trainer` with what AF2 training needs on top.

- The collator reads the raw `audio` / `prompt` / `answer` columns, so they are never dropped as "unused columns"
  (whatever `remove_unused_columns` says).
- Weight decay follows the original optimizer: only the gated cross-attention blocks decay (`weight_decay_scope=
  "cross_attention"`, the default); "default" uses transformers' rule (no decay for biases and norms). Either way,
  an embedding matrix whose gradient is restricted to a few rows (`set_trainable_parameters(train_embeddings=True)`)
  never decays, so its other rows stay exactly as they were.
- Given `set_trainable_parameters`' summary (`trainable=`), only the embedding rows it names train: their gradient is
  masked after every backward, before clipping (`mask_embedding_gradient`).
- A frozen audio tower runs in eval mode during training (BatchNorm statistics and stochastic depth untouched): the
  trainer keeps the names of such modules and puts them in eval mode after the Trainer's `model.train()` at each
  step. Nothing is stored on the model (no hooks, no attributes on parameters), so FSDP's re-created parameters
  lose nothing.
- A batch with no trainable label (every label -100: answers cut by `max_length`) raises instead of logging a loss
  of 0; `af2 train` checks the data before training (`data.check_training_data`), so such rows never get that far.

Everything else is the standard Trainer: length-grouped batches with `train_sampling_strategy="group_by_length"`
(the readers in `data.py` add the `length` column, windows first), variable-size batches balanced by cost with
`"batch_rebalance"`, `activation_checkpointing`, `bf16` / `fp16`, `gradient_accumulation_steps`,
`resume_from_checkpoint`, FSDP / DeepSpeed / DDP through accelerate.
"""

from __future__ import annotations

import json
import os
import re

from torch import nn
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

from ..quantization import quiet_repeated_bitsandbytes_notices
from .collator import IGNORE_INDEX
from .stages import (
    TrainableSummary,
    eval_frozen_modules,
    frozen_eval_module_names,
    mask_embedding_gradient,
    unwrap_model,
)

logger = logging.get_logger(__name__)

WEIGHT_DECAY_SCOPES = ("cross_attention", "default")
# What every parameter of a gated cross-attention block has in its name: the weight-decay scope selects these, and a
# model without any is refused that scope.
CROSS_ATTENTION_PARAMETER = ".cross_attn."


class AudioFlamingo2Trainer(Trainer):
    """
    `transformers.Trainer` for Audio Flamingo 2 (see the module docstring).

    Args:
        weight_decay_scope (`str`, defaults to "cross_attention"): which parameters `args.weight_decay` applies to:
            "cross_attention" (the original's optimizer groups) or "default" (transformers' rule).
        trainable (`TrainableSummary`, *optional*): what `set_trainable_parameters` returned; its `embedding_rows`
            are the only rows of the input embedding matrix that train (the matrix gets no weight decay then).
            Without it an embedding matrix that requires grad trains whole.
        All other arguments are `Trainer`'s.
    """

    def __init__(
        self,
        *args,
        weight_decay_scope: str = "cross_attention",
        trainable: TrainableSummary | None = None,
        **kwargs,
    ):
        if weight_decay_scope not in WEIGHT_DECAY_SCOPES:
            raise ValueError(f"weight_decay_scope must be one of {WEIGHT_DECAY_SCOPES}, got {weight_decay_scope!r}.")
        self.weight_decay_scope = weight_decay_scope
        self.embedding_rows = self.embedding_parameter_name = None
        quiet_repeated_bitsandbytes_notices()
        super().__init__(*args, **kwargs)
        if self.args.label_names is None:
            self.label_names = ["labels"]
        if (
            weight_decay_scope == "cross_attention"
            and self.args.weight_decay
            and not any(CROSS_ATTENTION_PARAMETER in name for name, _ in self.model.named_parameters())
        ):
            # Else the decay would silently apply to nothing (an AF3 / Music Flamingo model, or an adapter on one).
            raise ValueError(
                f"weight_decay={self.args.weight_decay} with weight_decay_scope='cross_attention': this model has no "
                "cross-attention blocks, so nothing would decay. Use weight_decay_scope='default' (af2 train: "
                "--weight-decay-scope default) to decay its trainable weights, or weight_decay=0."
            )
        # Read once, on the unwrapped model: which modules stay in eval mode, which embedding rows train.
        self.frozen_eval_modules = frozen_eval_module_names(self.model)
        self.embedding_rows = None if trainable is None else trainable.embedding_rows
        weight = unwrap_model(self.model).get_input_embeddings().weight
        self.embedding_parameter_name = next(
            (name for name, param in self.model.named_parameters() if param is weight), None
        )
        if self.embedding_rows is not None and (
            getattr(self, "is_fsdp_enabled", False) or getattr(self, "is_deepspeed_enabled", False)
        ):
            logger.warning(
                "FSDP / DeepSpeed shard the parameters, so the embedding row mask of set_trainable_parameters("
                "train_embeddings=True) does not apply: the whole embedding matrix trains (as in the original's FSDP "
                "runs). Use train_embeddings=False or 'all' to be explicit."
            )
            self.embedding_rows = None
        if (
            trainable is None
            and weight.requires_grad
            and not all(param.requires_grad for param in self.model.parameters())
        ):
            logger.warning(
                "the whole input embedding matrix trains; to train only AF2's new rows (<audio>, <|endofchunk|>) as "
                "the original does, pass trainable=set_trainable_parameters(model, ...) to AudioFlamingo2Trainer."
            )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.get("labels")
        if labels is not None and not bool((labels != IGNORE_INDEX).any()):
            raise ValueError(
                "a batch has no trainable label (every label is -100): its answers were cut by max_length or hold no "
                "token. Its loss would read 0 and teach nothing. Check the data first (af2 train does: "
                "trainer.data.check_training_data), drop such rows (--skip-bad-rows) or raise --max-length."
            )
        if model.training:
            # After the Trainer's model.train() of this step: frozen modules compute as at inference.
            eval_frozen_modules(model, self.frozen_eval_modules)
        return super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.embedding_rows is not None:
            # After backward (gradients reduced across processes), before clipping and the optimizer step.
            mask_embedding_gradient(self.model.get_parameter(self.embedding_parameter_name), self.embedding_rows)
        return loss

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """`Trainer.train`; `resume_from_checkpoint=True` resumes from the newest *complete* checkpoint of
        `args.output_dir` (see `last_complete_checkpoint`), not a half-written one."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"resume_from_checkpoint=True: no complete checkpoint in {self.args.output_dir}.")
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _remove_unused_columns(self, dataset, description: str | None = None):
        # The collator turns `audio`, `prompt`, `answer` into model inputs; none of them is a forward argument.
        return dataset

    def _get_collator_with_removed_columns(self, data_collator, description: str | None = None):
        return data_collator

    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        names = super().get_decay_parameter_names(model)
        if self.weight_decay_scope == "cross_attention":
            names = [name for name in names if CROSS_ATTENTION_PARAMETER in name]
        if self.embedding_rows is not None:
            # Weight decay would move the frozen rows of a row-restricted matrix.
            names = [name for name in names if name != self.embedding_parameter_name]
        return names


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """
    The newest `checkpoint-N` folder of `output_dir` that a save finished, or None. The Trainer writes
    `trainer_state.json` last, after the weights, optimizer, scheduler and RNG states, so a folder counts as complete
    when that file parses and records step N; a save killed half-way leaves a folder without it, which is skipped
    (with a warning) where `transformers.trainer_utils.get_last_checkpoint` would pick it and fail.
    """
    if not os.path.isdir(output_dir):
        return None
    pattern = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
    steps = sorted(
        (int(match.group(1)), name)
        for name in os.listdir(output_dir)
        if (match := pattern.match(name)) and os.path.isdir(os.path.join(output_dir, name))
    )
    for step, name in reversed(steps):
        folder = os.path.join(output_dir, name)
        try:
            with open(os.path.join(folder, "trainer_state.json")) as handle:
                complete = json.load(handle).get("global_step") == step
        except (OSError, ValueError):
            complete = False
        if complete:
            return folder
        logger.warning(f"{folder}: incomplete checkpoint (a save that did not finish), skipped.")
    return None


__all__ = ["WEIGHT_DECAY_SCOPES", "AudioFlamingo2Trainer", "last_complete_checkpoint"]
