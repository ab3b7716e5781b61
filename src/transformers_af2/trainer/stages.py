"""Which parameters train in each of AF2's training stages.

The original (`src/factory.py`, `train/train.py`) freezes the whole model and then unfreezes:

- pre-training: the audio transformer and the gated cross-attention blocks;
- fine-tuning (SFT): the same plus the AF-CLAP audio tower (`clap_config.finetune: true`);
- long-audio fine-tuning: the audio transformer and the cross-attention blocks (the tower frozen again);
- in every stage, unless `freeze_lm_embeddings`, the input embedding matrix, whose gradient is then masked so that
  only the rows of `<audio>` and `<|endofchunk|>` change (the tokens AF2 added and conditions on);
- `unfreeze_full_lm` (off for the released models) trains the whole language model as well ("full" here).

The policy lives here, not in the model or its config: call `set_trainable_parameters` on a loaded model before
building the `Trainer` and give its summary to `AudioFlamingo2Trainer(trainable=...)` (with LoRA,
`lora.apply_lora(..., stage=...)` applies the same recipe through PEFT). Nothing is stored on the model: no hooks,
no attributes on parameters (FSDP re-creates parameters and would lose them); the trainer applies the embedding row
mask (`mask_embedding_gradient`) and keeps a frozen tower in eval mode (`frozen_eval_module_names`) itself.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.utils import logging

logger = logging.get_logger(__name__)

COMPONENTS = ("audio_tower", "audio_transformer", "cross_attention", "language_model")

STAGES: dict[str, tuple[str, ...]] = {
    "pretrain": ("audio_transformer", "cross_attention"),
    "finetune": ("audio_tower", "audio_transformer", "cross_attention"),
    "long-audio": ("audio_transformer", "cross_attention"),
    "full": ("audio_tower", "audio_transformer", "cross_attention", "language_model"),
    "none": (),
}
STAGE_ALIASES = {
    "pre-training": "pretrain",
    "pretraining": "pretrain",
    "fine-tune": "finetune",
    "fine-tuning": "finetune",
    "sft": "finetune",
    "long-audio-finetune": "long-audio",
    "long_audio": "long-audio",
    "long": "long-audio",
    "frozen": "none",
    "lora": "none",
}


@dataclass
class TrainableSummary:
    """What `set_trainable_parameters` unfroze: parameter counts per component and the trained embedding rows."""

    stage: str
    components: tuple[str, ...]
    trainable: int
    total: int
    per_component: dict[str, int] = field(default_factory=dict)
    embedding_rows: tuple[int, ...] | None = None

    def __str__(self) -> str:
        parts = ", ".join(f"{name} {count:,}" for name, count in self.per_component.items() if count)
        rows = "" if self.embedding_rows is None else f"; embedding rows {list(self.embedding_rows)}"
        return f"stage {self.stage!r}: {self.trainable:,} of {self.total:,} parameters train ({parts or 'none'}){rows}"


def unwrap_model(model: nn.Module) -> nn.Module:
    """The `AudioFlamingo2ForConditionalGeneration` inside a PEFT / DDP / compiled wrapper."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
    return model


def resolve_stage(stage: str) -> str:
    name = stage.strip().lower().replace("_", "-")
    name = STAGE_ALIASES.get(name, name)
    if name not in STAGES:
        raise ValueError(
            f"unknown stage {stage!r}; choose one of {sorted(STAGES)} (aliases: {sorted(STAGE_ALIASES)})."
        )
    return name


def component_modules(model: nn.Module) -> dict[str, list[nn.Module]]:
    """The modules of each component of an AF2 model: audio tower, audio transformer, cross-attention blocks and
    the language model (every decoder layer without its cross-attention block, the final norm and `lm_head`)."""
    base = unwrap_model(model)
    inner = base.model
    language_model = inner.language_model
    cross = [layer.cross_attn for layer in language_model.layers if getattr(layer, "cross_attn", None) is not None]
    lm_parts: list[nn.Module] = []
    for layer in language_model.layers:
        lm_parts.extend(child for name, child in layer.named_children() if name != "cross_attn")
    lm_parts.append(language_model.norm)
    lm_parts.append(language_model.get_input_embeddings())
    if base.get_output_embeddings() is not None:
        lm_parts.append(base.get_output_embeddings())
    return {
        "audio_tower": [inner.audio_tower],
        "audio_transformer": [inner.audio_transformer],
        "cross_attention": cross,
        "language_model": lm_parts,
    }


def _parameters(modules: Iterable[nn.Module]) -> list[nn.Parameter]:
    seen, params = set(), []
    for module in modules:
        for param in module.parameters():
            if id(param) not in seen:
                seen.add(id(param))
                params.append(param)
    return params


def default_embedding_token_ids(model: nn.Module) -> tuple[int, ...]:
    """The rows the original trains: `<audio>` and `<|endofchunk|>`."""
    config = unwrap_model(model).config
    return (int(config.audio_token_id), int(config.end_of_chunk_token_id))


def mask_embedding_gradient(weight: torch.Tensor, token_ids: Iterable[int]) -> None:
    """
    Zeroes the gradient of every row of an embedding matrix but `token_ids` (the original's `zero_mask`), in place.
    Call it after `backward()` and before gradient clipping and the optimizer step; `AudioFlamingo2Trainer` does
    when given `set_trainable_parameters`' summary. With no weight decay on this matrix (the trainer's rule) the
    other rows then stay exactly as they are. A tied output head shares the matrix, so it is restricted too.

    The rows live with the caller, not on the tensor: wrappers that re-create parameters (FSDP's flattening) would
    drop anything stored there.
    """
    if weight.grad is None:
        return
    rows = sorted({int(t) for t in token_ids})
    if any(not 0 <= row < weight.shape[0] for row in rows):
        raise ValueError(f"embedding rows {rows} out of range for a matrix of {weight.shape[0]} rows.")
    mask = torch.zeros(weight.shape[0], 1, dtype=weight.grad.dtype, device=weight.grad.device)
    mask[rows] = 1
    weight.grad.mul_(mask)


def frozen_eval_module_names(model: nn.Module) -> tuple[str, ...]:
    """
    Names (in the plain AF2 model, e.g. `"model.audio_tower"`) of the modules that should run in eval mode during
    training: the audio tower when none of its parameters train. Its BatchNorm then keeps its running statistics and
    its stochastic depth stays off, so a frozen tower computes exactly what it computes at inference; a tower that
    trains (stage "finetune") follows `model.train()` as usual. Read it once, before wrapping the model for
    distributed training, and pass the names to `eval_frozen_modules` after every `model.train()`.
    """
    tower = unwrap_model(model).model.audio_tower
    if any(param.requires_grad for param in tower.parameters()):
        return ()
    return ("model.audio_tower",)


def eval_frozen_modules(model: nn.Module, names: Iterable[str]) -> None:
    """Puts the named modules of the AF2 model inside `model` (PEFT / DDP wrappers allowed) into eval mode; the
    trainer calls it at every step, after the Trainer's `model.train()`."""
    base = unwrap_model(model)
    for name in names:
        base.get_submodule(name).eval()


def set_trainable_parameters(
    model: nn.Module,
    stage: str = "finetune",
    train_embeddings: bool | str = True,
    embedding_token_ids: Iterable[int] | None = None,
) -> TrainableSummary:
    """
    Freezes the model and unfreezes the parameters AF2 trains in `stage`.

    Args:
        model: an `AudioFlamingo2ForConditionalGeneration` (also inside DDP / `torch.compile` wrappers). For LoRA, give
            the stage to `apply_lora` instead.
        stage: "pretrain" (audio transformer + cross-attention), "finetune" (+ audio tower), "long-audio" (audio
            transformer + cross-attention), "full" (everything) or "none" (nothing, e.g. LoRA only).
        train_embeddings: True (the original's default): the input embedding matrix trains, its gradient masked to
            `embedding_token_ids` by the trainer given the returned summary (`AudioFlamingo2Trainer(trainable=...)`,
            or `mask_embedding_gradient` in a loop of your own); "all": the whole matrix trains; False: it stays frozen (the original's
            `freeze_lm_embeddings`). With tied embeddings the output head is the same matrix.
        embedding_token_ids: rows to train; defaults to `<audio>` and `<|endofchunk|>`, as in the original.

    Returns:
        a `TrainableSummary` (also logged): pass it to `AudioFlamingo2Trainer(trainable=...)`.
    """
    name = resolve_stage(stage)
    if hasattr(model, "peft_config") or any("lora_" in n for n, _ in model.named_parameters()):
        raise TypeError(
            "set_trainable_parameters takes a plain AF2 model; for LoRA, pass the stage to apply_lora(model, ..., "
            "stage=...), which trains the stage's modules beside the adapters and saves them with it."
        )
    base = unwrap_model(model)
    components = component_modules(base)

    base.requires_grad_(False)
    for component in STAGES[name]:
        for param in _parameters(components[component]):
            param.requires_grad_(True)

    embeddings = base.get_input_embeddings().weight
    rows = None
    if train_embeddings and name != "full":
        embeddings.requires_grad_(True)
        if train_embeddings != "all":
            rows = tuple(sorted(set(embedding_token_ids or default_embedding_token_ids(base))))
            if any(not 0 <= row < embeddings.shape[0] for row in rows):
                raise ValueError(
                    f"embedding rows {list(rows)} out of range for a matrix of {embeddings.shape[0]} rows."
                )
    elif name == "full" and train_embeddings not in (True, "all"):
        embeddings.requires_grad_(False)

    per_component = {
        component: sum(p.numel() for p in _parameters(mods) if p.requires_grad)
        for component, mods in components.items()
    }
    if embeddings.requires_grad:
        per_component["embeddings"] = embeddings.numel() if rows is None else len(rows) * embeddings.shape[1]
        per_component["language_model"] -= embeddings.numel()
    trainable_params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in trainable_params)
    if rows is not None:
        trainable -= embeddings.numel() - len(rows) * embeddings.shape[1]
    summary = TrainableSummary(
        stage=name,
        components=STAGES[name],
        trainable=trainable,
        total=sum(p.numel() for p in model.parameters()),
        per_component=per_component,
        embedding_rows=rows,
    )
    logger.info(str(summary))
    return summary


__all__ = [
    "COMPONENTS",
    "STAGES",
    "TrainableSummary",
    "component_modules",
    "default_embedding_token_ids",
    "eval_frozen_modules",
    "frozen_eval_module_names",
    "mask_embedding_gradient",
    "resolve_stage",
    "set_trainable_parameters",
    "unwrap_model",
]
