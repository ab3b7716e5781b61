"""Original parameter names -> this project's (None: dropped on purpose)."""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

from .errors import ConversionError

# Keys of the original that AF2 never uses at inference or in training, dropped on purpose.
_DROPPED_TOWER_KEYS = re.compile(
    r"^(spectrogram_extractor\.|logmel_extractor\.|tscam_conv\.|head\.|.*\.attn_mask$"
    # The "fusion" branch only runs for audio longer than one window; AF2 always feeds exactly one window.
    r"|patch_embed\.mel_conv2d\.|patch_embed\.fusion_model\.)"
)


_TOWER_RENAMES = [
    (r"^bn0\.", "batch_norm."),
    (r"\.attn\.proj\.", ".attention.output.dense."),
    (r"\.attn\.relative_position_", ".attention.self.relative_position_"),
    (r"\.norm1\.", ".layernorm_before."),
    (r"\.norm2\.", ".layernorm_after."),
    (r"\.mlp\.fc1\.", ".intermediate.dense."),
    (r"\.mlp\.fc2\.", ".output.dense."),
]


def rename_tower_key(key: str) -> list[tuple[str, Callable[[torch.Tensor], torch.Tensor]]] | None:
    """HTSAT key (without its prefix) -> [(ClapAudioEncoder key, transform)]; None when dropped on purpose."""
    if _DROPPED_TOWER_KEYS.match(key):
        return None
    qkv = re.match(r"^(layers\.\d+\.blocks\.\d+)\.attn\.qkv\.(weight|bias)$", key)
    if qkv:
        block, kind = qkv.groups()
        return [
            (f"{block}.attention.self.{name}.{kind}", lambda t, i=i: t.chunk(3, dim=0)[i].clone())
            for i, name in enumerate(("query", "key", "value"))
        ]
    for pattern, replacement in _TOWER_RENAMES:
        key = re.sub(pattern, replacement, key)
    return [(key, _identity)]


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


_AUDIO_TRANSFORMER_RENAMES = {
    "slf_attn.w_qs": "self_attn.q_proj",
    "slf_attn.w_ks": "self_attn.k_proj",
    "slf_attn.w_vs": "self_attn.v_proj",
    "slf_attn.fc": "self_attn.o_proj",
    "slf_attn.layer_norm": "self_attn_layer_norm",
    "pos_ffn.w_1": "fc1",
    "pos_ffn.w_2": "fc2",
    "pos_ffn.layer_norm": "final_layer_norm",
}

_CROSS_ATTENTION_RENAMES = {
    "attn.norm": "norm",
    "attn.to_q": "q_proj",
    "attn.to_kv": "kv_proj",
    "attn.to_out": "o_proj",
    "attn_gate": "attn_gate",
    "ff.0": "ff_norm",
    "ff.1": "ff_up",
    "ff.3": "ff_down",
    "ff_gate": "ff_gate",
}


def _rename_by_table(rest: str, table: dict[str, str]) -> str | None:
    for old, new in table.items():
        if rest == old or rest.startswith(old + "."):
            return new + rest[len(old) :]
    return None


def rename_safe_key(key: str) -> tuple[int, list[tuple[str, Callable]]] | None:
    """
    `safe_ckpt` key -> (priority, [(new key, transform)]); None when dropped on purpose. The original registers the
    decoder layers and cross-attention blocks twice (`old_decoder_blocks`, `gated_cross_attn_layers_sound`) and
    `load_state_dict` writes the aliases after the canonical names, so aliases get the higher priority.
    Raises ConversionError for a key this converter does not know.
    """
    if key.startswith("clap.nvclap."):
        renamed = rename_tower_key(key[len("clap.nvclap.") :])
        return None if renamed is None else (0, [(f"model.audio_tower.{k}", fn) for k, fn in renamed])
    if key.startswith("audio_transformer_clap."):
        rest = key[len("audio_transformer_clap.") :]
        if rest == "position_enc.inv_freq":
            return None  # recomputed from the config; checked against the config in build_config
        if rest.startswith("layer_norm."):
            return 0, [(f"model.audio_transformer.{rest}", _identity)]
        match = re.match(r"^layer_stack\.(\d+)\.(.+)$", rest)
        if match and (new := _rename_by_table(match.group(2), _AUDIO_TRANSFORMER_RENAMES)):
            return 0, [(f"model.audio_transformer.layers.{match.group(1)}.{new}", _identity)]
    if key.startswith("lang_encoder."):
        rest = key[len("lang_encoder.") :]
        simple = {
            "model.embed_tokens.weight": "model.language_model.embed_tokens.weight",
            "model.norm.weight": "model.language_model.norm.weight",
            "lm_head.weight": "lm_head.weight",
        }
        if rest in simple:
            return 0, [(simple[rest], _identity)]
        match = re.match(r"^model\.layers\.(\d+)\.decoder_layer\.(.+)$", rest) or re.match(
            r"^old_decoder_blocks\.(\d+)\.(.+)$", rest
        )
        if match:
            priority = 1 if rest.startswith("old_") else 0
            return priority, [(f"model.language_model.layers.{match.group(1)}.{match.group(2)}", _identity)]
        match = re.match(r"^model\.layers\.(\d+)\.gated_cross_attn_layer_sound\.(.+)$", rest) or re.match(
            r"^gated_cross_attn_layers_sound\.(\d+)\.(.+)$", rest
        )
        if match and (new := _rename_by_table(match.group(2), _CROSS_ATTENTION_RENAMES)):
            priority = 1 if rest.startswith("gated_") else 0
            return priority, [(f"model.language_model.layers.{match.group(1)}.cross_attn.{new}", _identity)]
    raise ConversionError(f"safe_ckpt key {key!r} is not part of the AF2 layout this converter knows.")


def rename_clap_ckpt_key(key: str) -> list[tuple[str, Callable]] | None:
    """`clap_ckpt` key -> [(new key, transform)]. Only `module.audio_branch.*` is the tower; the CLAP text branch
    and projections are not part of AF2 (the original dropped them through a non-strict load)."""
    prefix = "module.audio_branch."
    if not key.startswith(prefix):
        return None
    renamed = rename_tower_key(key[len(prefix) :])
    return None if renamed is None else [(f"model.audio_tower.{k}", fn) for k, fn in renamed]
