"""PEFT LoRA on AF2's language model and/or its gated cross-attention blocks.

    model = apply_lora(model, targets=("language_model",), r=16, alpha=32)   # a peft.PeftModel
    ... Trainer(model=model, ...).train(); model.save_pretrained("adapter")
    model = load_lora(AudioFlamingo2ForConditionalGeneration.from_pretrained(base), "adapter")
    merged = merge_lora(model)                                               # a plain AF2 model again

Targets are matched by regular expressions over the model's module names, so the audio transformer's own
`q_proj`/`k_proj`/... are never touched unless asked for. A training stage's modules (see `stages.py`) can be trained
fully next to the adapters through PEFT's `modules_to_save`, and AF2's new token rows through PEFT's
`trainable_token_indices`, so that `save_pretrained` writes everything that was trained.

The cross-attention gates (`attn_gate`, `ff_gate`) are scalars, which LoRA does not adapt: with `cross_attention`
as a LoRA target they keep their values (trained and non-zero in the released checkpoints; zero in a freshly
initialised block, where the block's output, and so its LoRA gradient, is zero: train such a model with a stage).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence

from torch import nn
from transformers.utils import logging

from .stages import STAGES, default_embedding_token_ids, resolve_stage, unwrap_model

logger = logging.get_logger(__name__)

LORA_TARGETS: dict[str, str] = {
    # Qwen2 self-attention and MLP projections of every decoder layer.
    "language_model": (
        r"model\.language_model\.layers\.\d+\.(?:self_attn\.(?:q|k|v|o)_proj|mlp\.(?:gate|up|down)_proj)"
    ),
    # Projections of the gated cross-attention blocks (attention and gated feed-forward).
    "cross_attention": r"model\.language_model\.layers\.\d+\.cross_attn\.(?:q_proj|kv_proj|o_proj|ff_up|ff_down)",
    # The audio transformer over the window tokens.
    "audio_transformer": r"model\.audio_transformer\.layers\.\d+\.(?:self_attn\.(?:q|k|v|o)_proj|fc1|fc2)",
}
LORA_TARGET_ALIASES = {
    "lm": "language_model",
    "llm": "language_model",
    "xattn": "cross_attention",
    "cross-attention": "cross_attention",
    "audio": "audio_transformer",
}

# A stage's components as PEFT `modules_to_save` names (matched as suffixes of module names).
_MODULES_TO_SAVE = {
    "audio_tower": ["audio_tower"],
    "audio_transformer": ["audio_transformer"],
    "cross_attention": ["cross_attn"],
}


def resolve_lora_targets(targets: str | Iterable[str]) -> list[str]:
    """ "language_model", "cross_attention", "audio_transformer" (or "both" = LM + cross-attention), as a list or a
    comma-separated string."""
    if isinstance(targets, str):
        targets = [t for t in targets.replace("+", ",").split(",") if t.strip()]
    resolved = []
    for target in targets:
        key = target.strip().lower().replace("-", "_")
        key = LORA_TARGET_ALIASES.get(key, LORA_TARGET_ALIASES.get(target.strip().lower(), key))
        if key in ("both", "all"):
            resolved.extend(["language_model", "cross_attention"])
        elif key in LORA_TARGETS:
            resolved.append(key)
        else:
            raise ValueError(f"unknown LoRA target {target!r}; choose from {sorted(LORA_TARGETS)} or 'both'.")
    return list(dict.fromkeys(resolved))


def lora_target_regex(targets: str | Iterable[str]) -> str:
    """One regular expression (PEFT `target_modules`) matching the Linear layers of the chosen targets."""
    return "(?:" + "|".join(LORA_TARGETS[t] for t in resolve_lora_targets(targets)) + ")"


def lora_config(
    targets: str | Iterable[str] = ("language_model",),
    r: int = 8,
    alpha: int | None = None,
    dropout: float = 0.0,
    stage: str | None = None,
    train_embeddings: bool = False,
    embedding_token_ids: Sequence[int] | None = None,
    model: nn.Module | None = None,
    **kwargs,
):
    """
    A `peft.LoraConfig` for AF2.

    Args:
        targets: what gets LoRA adapters (see `resolve_lora_targets`).
        r, alpha, dropout: LoRA rank, scaling numerator (default `2 * r`) and dropout.
        stage: a training stage whose components train fully beside the adapters (as PEFT `modules_to_save`);
            components that also carry LoRA adapters are left to LoRA.
        train_embeddings: train the embedding rows `embedding_token_ids` (default `<audio>`, `<|endofchunk|>`; needs
            `model` for the default) as PEFT trainable tokens, saved with the adapter.
        kwargs: any other `LoraConfig` field.
    """
    from peft import LoraConfig

    resolved = resolve_lora_targets(targets)
    modules_to_save = list(kwargs.pop("modules_to_save", None) or [])
    if stage is not None:
        for component in STAGES[resolve_stage(stage)]:
            if component == "language_model":
                raise ValueError("stage 'full' trains the whole language model; it does not combine with LoRA.")
            if component in resolved:
                continue
            modules_to_save.extend(_MODULES_TO_SAVE[component])
    if train_embeddings:
        if embedding_token_ids is None:
            if model is None:
                raise ValueError(
                    "train_embeddings needs embedding_token_ids or the model (for <audio>/<|endofchunk|>)."
                )
            embedding_token_ids = default_embedding_token_ids(model)
        kwargs["trainable_token_indices"] = {"embed_tokens": sorted({int(t) for t in embedding_token_ids})}
    return LoraConfig(
        r=r,
        lora_alpha=2 * r if alpha is None else alpha,
        lora_dropout=dropout,
        target_modules=lora_target_regex(resolved),
        modules_to_save=modules_to_save or None,
        bias="none",
        **kwargs,
    )


def apply_lora(
    model: nn.Module,
    targets: str | Iterable[str] = ("language_model",),
    config=None,
    **lora_options,
):
    """
    Wraps an AF2 model with LoRA adapters: `lora_config(targets, model=model, **lora_options)` (see `lora_config`
    for the options: `r`, `alpha`, `dropout`, `stage`, `train_embeddings`, ...), or a ready `peft.LoraConfig`
    passed as `config`. Everything else is frozen; returns the `peft.PeftModel`. The adapter weights are drawn from
    torch's global generator: seed it first (`transformers.set_seed`, as `af2 train --seed` does) for reproducible
    adapters. The adapter records its base model as `base_model_reference(model)`: a hub id, or an absolute path.
    """
    from peft import get_peft_model

    if config is None:
        config = lora_config(targets, model=model, **lora_options)
    elif lora_options:
        raise ValueError(
            f"apply_lora got both a ready config and LoRA options {sorted(lora_options)}: put the options in the "
            "config, or pass them without one."
        )
    peft_model = get_peft_model(model, config)
    peft_model.peft_config["default"].base_model_name_or_path = base_model_reference(model)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    logger.info(f"LoRA on {config.target_modules}: {trainable:,} of {total:,} parameters train.")
    return peft_model


def base_model_reference(model: nn.Module) -> str | None:
    """Where the model was loaded from, in a form that loads from any working directory: a local folder as an
    absolute path, anything else (a hub id) as it is."""
    reference = getattr(unwrap_model(model), "name_or_path", None) or None
    if reference is not None and os.path.isdir(reference):
        reference = os.path.abspath(reference)
    return reference


def adapter_config_of(path: str | os.PathLike) -> dict | None:
    """The `adapter_config.json` of a saved PEFT adapter (a local folder or a hub id), or None when `path` holds
    none (a full model)."""
    from transformers.utils import find_adapter_config_file

    config_file = find_adapter_config_file(str(path))
    if config_file is None:
        return None
    with open(config_file) as handle:
        return json.load(handle)


def continue_lora(adapter: str | os.PathLike, **model_kwargs):
    """
    Loads a saved adapter to train it further: its base model of any family (from the adapter's
    `base_model_name_or_path`) with the same adapter on top, trainable, together with the modules and token rows it saves. Returns the
    `peft.PeftModel`; `model_kwargs` go to the base model's `from_pretrained` (e.g. `dtype`).
    """
    from ..families import detect_family

    config = adapter_config_of(adapter)
    if config is None:
        raise ValueError(f"{adapter}: not a PEFT adapter (no adapter_config.json).")
    base = config.get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{adapter}: adapter_config.json names no base model (base_model_name_or_path).")
    try:
        model = detect_family(base).load(base, **model_kwargs)[0]
    except OSError as error:
        raise ValueError(
            f"{adapter}: cannot load its base model {base!r} ({error}). A relative path (written by older versions) "
            "only loads from the folder it was typed in: set base_model_name_or_path in its adapter_config.json to "
            "an absolute path or a hub id."
        ) from error
    peft_model = load_lora(model, str(adapter), is_trainable=True)
    peft_model.peft_config["default"].base_model_name_or_path = base_model_reference(model)
    return peft_model


def load_lora(model: nn.Module, adapter: str, is_trainable: bool = False, **kwargs):
    """Loads a saved AF2 LoRA adapter onto a (fresh) base model; returns the `peft.PeftModel`."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, adapter, is_trainable=is_trainable, **kwargs)


def merge_lora(model: nn.Module) -> nn.Module:
    """Folds the adapters into the base weights and returns the plain AF2 model (save it with `save_pretrained`)."""
    if not hasattr(model, "merge_and_unload"):
        raise TypeError(f"merge_lora expects a PEFT model, got {type(model).__name__}.")
    merged = model.merge_and_unload()
    return unwrap_model(merged)


__all__ = [
    "LORA_TARGETS",
    "adapter_config_of",
    "apply_lora",
    "base_model_reference",
    "continue_lora",
    "load_lora",
    "lora_config",
    "lora_target_regex",
    "merge_lora",
    "resolve_lora_targets",
]
