"""The state dict: the original precedence of sources, strictly checked against the model."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from transformers.utils import logging

from ..modeling import AudioFlamingo2Config
from ..utils import non_finite_tensors
from .errors import ConversionError
from .renames import rename_clap_ckpt_key, rename_safe_key
from .source import OriginalCheckpoint

logger = logging.get_logger(__name__)


def _load_base_lm_weights(
    lm_source: str | os.PathLike, needed: Iterable[str], **hub_kwargs
) -> dict[str, torch.Tensor]:
    """Reads the base LM's safetensors (local dir or hub id) for the keys safe_ckpt does not provide."""
    path = Path(lm_source)
    if not path.is_dir():
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(str(lm_source), allow_patterns=["*.safetensors", "*.json"], **hub_kwargs))
    files = sorted(path.glob("model*.safetensors"))
    if not files:
        raise ConversionError(f"the base LM {lm_source} has no safetensors weights to fill {sorted(needed)[:5]}...")
    out = {}
    for file in files:
        with safe_open(file, framework="pt") as reader:
            for key in reader.keys():
                new_key = (
                    "lm_head.weight" if key == "lm_head.weight" else f"model.language_model.{key[len('model.') :]}"
                )
                if new_key in needed:
                    out[new_key] = reader.get_tensor(key)
    return out


def assemble_state_dict(
    checkpoint: OriginalCheckpoint,
    expected: dict[str, torch.Tensor],
    lm_weights_source: str | os.PathLike | None,
    tie_word_embeddings: bool,
    hub_kwargs: dict | None = None,
) -> dict[str, torch.Tensor]:
    """
    Applies the original precedence (clap_ckpt < base LM < safe_ckpt, and aliases after canonical names) and checks
    the result against the model's expected parameters: every mismatch in names, shapes or dtypes is reported at once.
    """
    state: dict[str, torch.Tensor] = {}
    for key, tensor in checkpoint.clap_ckpt.items():
        for new_key, transform in rename_clap_ckpt_key(key) or []:
            state[new_key] = transform(tensor)

    from_safe: dict[str, tuple[int, torch.Tensor, str]] = {}
    for key, tensor in checkpoint.safe_ckpt.items():
        renamed = rename_safe_key(key)
        if renamed is None:
            continue
        priority, targets = renamed
        for new_key, transform in targets:
            value = transform(tensor)
            previous = from_safe.get(new_key)
            if previous is not None and not torch.equal(previous[1], value):
                logger.warning(
                    f"{key} differs from its alias {previous[2]}; using the one loaded last by the original."
                )
            if previous is None or priority >= previous[0]:
                from_safe[new_key] = (priority, value, key)

    if tie_word_embeddings and "lm_head.weight" in from_safe:
        # One shared tensor in the original: lm_head.weight is loaded after embed_tokens, so it wins for both.
        head = from_safe.pop("lm_head.weight")
        from_safe["model.language_model.embed_tokens.weight"] = head

    unfilled = [k for k in expected if k not in from_safe and k not in state]
    missing_lm = [k for k in unfilled if k.startswith("model.language_model.") or k == "lm_head.weight"]
    # A config.json path names no weights; a directory or hub id may hold the base LM's safetensors.
    if missing_lm and lm_weights_source is not None and not Path(lm_weights_source).is_file():
        base = _load_base_lm_weights(lm_weights_source, set(missing_lm), **(hub_kwargs or {}))
        vocab = expected["model.language_model.embed_tokens.weight"].shape[0]
        for key in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
            if key in base:  # resize_token_embeddings in the original keeps the first rows
                base[key] = base[key][:vocab]
        state.update(base)
    state.update({k: v for k, (_, v, _) in from_safe.items()})

    if tie_word_embeddings:
        state.pop("lm_head.weight", None)
    problems = []
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        problems.append(f"{len(missing)} parameters filled by no source: {missing[:20]}")
    if unexpected:
        problems.append(f"{len(unexpected)} source keys not used by the model: {unexpected[:20]}")
    for key in sorted(set(state) & set(expected)):
        want, got = expected[key], state[key]
        if tuple(want.shape) != tuple(got.shape):
            problems.append(f"{key}: shape {tuple(got.shape)} in the checkpoint, {tuple(want.shape)} in the model")
        elif want.dtype.is_floating_point != got.dtype.is_floating_point:
            problems.append(f"{key}: dtype {got.dtype} in the checkpoint, {want.dtype} in the model")
    if problems:
        raise ConversionError("the checkpoint does not fit the model:\n  " + "\n  ".join(problems))
    return state


def check_finite(state: dict[str, torch.Tensor], label: str) -> None:
    """Raises ConversionError naming every tensor holding NaN or infinity: such weights make greedy decoding answer
    token 0 forever instead of failing."""
    bad = non_finite_tensors(state.items())
    if bad:
        raise ConversionError(f"{label}: {len(bad)} tensors hold NaN or infinite values: {sorted(bad)[:20]}")


def _materialise_buffers(model: torch.nn.Module, config: AudioFlamingo2Config) -> None:
    """Buffers left on the meta device by construction are rebuilt on CPU by re-running the init of their module."""
    from ..modeling.modeling_audioflamingo2 import AudioFlamingo2AudioRotaryEmbedding

    for module in model.modules():
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer.device.type != "meta":
                continue
            if isinstance(module, AudioFlamingo2AudioRotaryEmbedding) and name == "inv_freq":
                module.inv_freq = module.compute_inv_freq()
            elif hasattr(module, "config") and next(module.parameters(recurse=False), None) is None:
                # Parameter-free modules built from a config (the LM's rotary embedding): build a CPU twin.
                setattr(module, name, getattr(type(module)(module.config), name))
            else:
                raise ConversionError(f"buffer {name} of {type(module).__name__} was not filled by the checkpoint.")
