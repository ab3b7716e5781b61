"""`AudioFlamingo2Trainer`: the transformers `Trainer` with what AF2 training needs on top.

- The collator reads the raw `audio` / `prompt` / `answer` columns, so they are never dropped as "unused columns"
  (whatever `remove_unused_columns` says).
- Weight decay follows the original optimizer: only the gated cross-attention blocks decay (`weight_decay_scope=
  "cross_attention"`, the default); "default" uses transformers' rule (no decay for biases and norms). Either way,
  an embedding matrix whose gradient is restricted to a few rows (`set_trainable_parameters(train_embeddings=True)`)
  never decays, so its other rows stay exactly as they were.
- A frozen audio tower runs in eval mode during training (BatchNorm statistics and stochastic depth untouched).

Everything else is the standard Trainer: length-grouped batches with `train_sampling_strategy="group_by_length"`
(the readers in `data.py` add the `length` column, windows first), variable-size batches balanced by cost with
`"batch_rebalance"`, `gradient_checkpointing`, `bf16` / `fp16`, `gradient_accumulation_steps`,
`resume_from_checkpoint`, FSDP / DeepSpeed / DDP through accelerate.
"""

from __future__ import annotations

from torch import nn
from transformers import Trainer
from transformers.utils import logging

from .stages import embedding_rows_restricted, keep_frozen_audio_tower_in_eval

logger = logging.get_logger(__name__)

WEIGHT_DECAY_SCOPES = ("cross_attention", "default")


class AudioFlamingo2Trainer(Trainer):
    """
    `transformers.Trainer` for Audio Flamingo 2 (see the module docstring).

    Args:
        weight_decay_scope (`str`, defaults to "cross_attention"): which parameters `args.weight_decay` applies to:
            "cross_attention" (the original's optimizer groups) or "default" (transformers' rule).
        All other arguments are `Trainer`'s.
    """

    def __init__(self, *args, weight_decay_scope: str = "cross_attention", **kwargs):
        if weight_decay_scope not in WEIGHT_DECAY_SCOPES:
            raise ValueError(f"weight_decay_scope must be one of {WEIGHT_DECAY_SCOPES}, got {weight_decay_scope!r}.")
        self.weight_decay_scope = weight_decay_scope
        super().__init__(*args, **kwargs)
        if self.args.label_names is None:
            self.label_names = ["labels"]
        keep_frozen_audio_tower_in_eval(self.model)
        if getattr(self, "is_fsdp_enabled", False) and any(
            embedding_rows_restricted(p) is not None for p in self.model.parameters()
        ):
            logger.warning(
                "FSDP re-creates the parameters, so the embedding row mask of set_trainable_parameters("
                "train_embeddings=True) does not apply: the whole embedding matrix trains (as in the original's FSDP "
                "runs). Use train_embeddings=False or 'all' to be explicit."
            )

    def _remove_unused_columns(self, dataset, description: str | None = None):
        # The collator turns `audio`, `prompt`, `answer` into model inputs; none of them is a forward argument.
        return dataset

    def _get_collator_with_removed_columns(self, data_collator, description: str | None = None):
        return data_collator

    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        names = super().get_decay_parameter_names(model)
        if self.weight_decay_scope == "cross_attention":
            names = [name for name in names if ".cross_attn." in name]
        params = dict(model.named_parameters())
        return [name for name in names if name in params and embedding_rows_restricted(params[name]) is None]


__all__ = ["WEIGHT_DECAY_SCOPES", "AudioFlamingo2Trainer"]
