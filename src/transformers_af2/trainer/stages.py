"""Which parameters train in each of AF2's training stages.

The original (`src/factory.py`, `train/train.py`) freezes the whole model and then unfreezes:

- pre-training: the audio transformer and the gated cross-attention blocks;
- fine-tuning (SFT): the same plus the AF-CLAP audio tower (`clap_config.finetune: true`);
- long-audio fine-tuning: the audio transformer and the cross-attention blocks (the tower frozen again);
- in every stage, unless `freeze_lm_embeddings`, the input embedding matrix, whose gradient is then masked so that
  only the rows of `<audio>` and `<|endofchunk|>` change (the tokens AF2 added and conditions on);
- `unfreeze_full_lm` (off for the released models) trains the whole language model as well ("full" here).

The policy lives here, not in the model or its config: call `set_trainable_parameters` on a loaded model before
building the `Trainer` (with LoRA, `lora.apply_lora(..., stage=...)` applies the same recipe through PEFT).
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

_HOOK_ATTRIBUTE = "_af2_embedding_row_hook"


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


def _remove_row_hook(weight: torch.Tensor) -> None:
    handle = getattr(weight, _HOOK_ATTRIBUTE, None)
    if handle is not None:
        handle.remove()
        delattr(weight, _HOOK_ATTRIBUTE)


def restrict_embedding_gradient(weight: nn.Parameter, token_ids: Iterable[int]) -> None:
    """Masks the gradient of an embedding matrix to the given rows (the original's `zero_mask`), so the other rows get
    zero gradient. With an optimizer that applies no weight decay to this matrix (see `AudioFlamingo2Trainer`), the
    other rows then stay exactly as they are. A tied output head shares the matrix, so it is restricted too."""
    _remove_row_hook(weight)
    rows = sorted({int(t) for t in token_ids})
    if any(not 0 <= row < weight.shape[0] for row in rows):
        raise ValueError(f"embedding rows {rows} out of range for a matrix of {weight.shape[0]} rows.")
    mask = torch.zeros(weight.shape[0], 1, dtype=torch.bool)
    mask[rows] = True

    def hook(grad: torch.Tensor) -> torch.Tensor:
        return grad * mask.to(device=grad.device, dtype=grad.dtype)

    setattr(weight, _HOOK_ATTRIBUTE, weight.register_hook(hook))
    weight._af2_trainable_rows = tuple(rows)


def embedding_rows_restricted(weight: torch.Tensor) -> tuple[int, ...] | None:
    """The rows an embedding matrix is restricted to by `restrict_embedding_gradient`, or None."""
    return getattr(weight, "_af2_trainable_rows", None) if hasattr(weight, _HOOK_ATTRIBUTE) else None


def _eval_when_frozen(module: nn.Module, args) -> None:
    """Forward pre-hook: a module without trainable parameters runs in eval mode even inside `model.train()`."""
    if module.training and not any(p.requires_grad for p in module.parameters()):
        module.eval()


def keep_frozen_audio_tower_in_eval(model: nn.Module) -> None:
    """
    Makes the audio tower run in eval mode whenever none of its parameters train, also after `model.train()` (which
    the Trainer calls every step): its BatchNorm keeps its running statistics and its stochastic depth stays off, so a
    frozen tower computes exactly what it computes at inference. A tower that trains (stage "finetune") follows
    `model.train()` as usual. Idempotent.
    """
    tower = unwrap_model(model).model.audio_tower
    if not getattr(tower, "_af2_eval_when_frozen", False):
        tower.register_forward_pre_hook(_eval_when_frozen)
        tower._af2_eval_when_frozen = True


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
            `embedding_token_ids`; "all": the whole matrix trains; False: it stays frozen (the original's
            `freeze_lm_embeddings`). With tied embeddings the output head is the same matrix.
        embedding_token_ids: rows to train; defaults to `<audio>` and `<|endofchunk|>`, as in the original.

    Returns:
        a `TrainableSummary` (also logged).
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
    _remove_row_hook(embeddings)
    rows = None
    if train_embeddings and name != "full":
        embeddings.requires_grad_(True)
        if train_embeddings != "all":
            rows = tuple(sorted(set(embedding_token_ids or default_embedding_token_ids(base))))
            restrict_embedding_gradient(embeddings, rows)
    elif name == "full" and train_embeddings not in (True, "all"):
        embeddings.requires_grad_(False)

    keep_frozen_audio_tower_in_eval(base)
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
    "keep_frozen_audio_tower_in_eval",
    "resolve_stage",
    "restrict_embedding_gradient",
    "set_trainable_parameters",
    "unwrap_model",
]
