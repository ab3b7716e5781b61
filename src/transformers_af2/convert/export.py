"""This package's parameter names -> the original hub layout (the inverse of `renames`), and writing that layout.

Used to run NVIDIA's original code on the very weights of a model of this package (benchmarks/
original_side_by_side.py). The original's `strict=False` load fills everything it needs from what is written here:

- keys that `renames` drops on purpose (the tower's torchlibrosa front end, its classification head, the fusion
  branch, attention masks) are not written; the original builds the fixed ones itself and never uses the rest at
  inference;
- each decoder layer and cross-attention block is written once, under its `lang_encoder.model.layers.i.*` name: the
  hub also repeats them under `old_decoder_blocks` / `gated_cross_attn_layers_sound`, which are the same modules;
- with tied word embeddings only `lang_encoder.model.embed_tokens.weight` is written (the head is the same tensor).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from .errors import ConversionError
from .renames import _AUDIO_TRANSFORMER_RENAMES, _CROSS_ATTENTION_RENAMES, _rename_by_table

# Checked in this order: the attention output's `output.dense` before the MLP's.
_TOWER_EXPORTS = [
    (r"^batch_norm\.", "bn0."),
    (r"\.attention\.output\.dense\.", ".attn.proj."),
    (r"\.attention\.self\.relative_position_", ".attn.relative_position_"),
    (r"\.layernorm_before\.", ".norm1."),
    (r"\.layernorm_after\.", ".norm2."),
    (r"\.intermediate\.dense\.", ".mlp.fc1."),
    (r"(\.blocks\.\d+)\.output\.dense\.", r"\1.mlp.fc2."),
]
_QKV = re.compile(r"^(layers\.\d+\.blocks\.\d+)\.attention\.self\.(query|key|value)\.(weight|bias)$")
_AUDIO_TRANSFORMER_EXPORTS = {new: old for old, new in _AUDIO_TRANSFORMER_RENAMES.items()}
_CROSS_ATTENTION_EXPORTS = {new: old for old, new in _CROSS_ATTENTION_RENAMES.items()}
_LM_TOP_LEVEL = {
    "model.language_model.embed_tokens.weight": "lang_encoder.model.embed_tokens.weight",
    "model.language_model.norm.weight": "lang_encoder.model.norm.weight",
    "lm_head.weight": "lang_encoder.lm_head.weight",
}


def export_tower_state_dict(tower: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ClapAudioEncoder keys (without prefix) -> the original HTSAT keys (without prefix); q/k/v merged into qkv."""
    out: dict[str, torch.Tensor] = {}
    parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tower.items():
        qkv = _QKV.match(key)
        if qkv:
            block, name, kind = qkv.groups()
            parts.setdefault((block, kind), {})[name] = tensor
            continue
        for pattern, replacement in _TOWER_EXPORTS:
            key = re.sub(pattern, replacement, key)
        out[key] = tensor
    for (block, kind), pieces in parts.items():
        if set(pieces) != {"query", "key", "value"}:
            raise ConversionError(f"{block}: the attention has {sorted(pieces)} {kind}s, not query, key and value.")
        out[f"{block}.attn.qkv.{kind}"] = torch.cat([pieces["query"], pieces["key"], pieces["value"]], dim=0)
    return out


def export_state_dict(state: dict[str, torch.Tensor], tie_word_embeddings: bool) -> dict[str, torch.Tensor]:
    """
    A state dict of `AudioFlamingo2ForConditionalGeneration` -> the `safe_ckpt` keys of the original layout (see
    the module docstring for what is left out). Buffers the original recomputes from its config (rotary inverse
    frequencies) are not written. Raises ConversionError for a key it does not know.
    """
    out: dict[str, torch.Tensor] = {}
    tower = {k[len("model.audio_tower.") :]: v for k, v in state.items() if k.startswith("model.audio_tower.")}
    out.update({f"clap.nvclap.{k}": v for k, v in export_tower_state_dict(tower).items()})
    unknown = []
    for key, tensor in state.items():
        if key.startswith("model.audio_tower."):
            continue
        if key.endswith("rotary_emb.inv_freq") or key.endswith("rotary_emb.original_inv_freq"):
            continue
        if key in _LM_TOP_LEVEL:
            if not (key == "lm_head.weight" and tie_word_embeddings):
                out[_LM_TOP_LEVEL[key]] = tensor
            continue
        if key.startswith("model.audio_transformer."):
            rest = key[len("model.audio_transformer.") :]
            if rest.startswith("layer_norm."):
                out[f"audio_transformer_clap.{rest}"] = tensor
                continue
            match = re.match(r"^layers\.(\d+)\.(.+)$", rest)
            if match and (old := _rename_by_table(match.group(2), _AUDIO_TRANSFORMER_EXPORTS)):
                out[f"audio_transformer_clap.layer_stack.{match.group(1)}.{old}"] = tensor
                continue
        match = re.match(r"^model\.language_model\.layers\.(\d+)\.(.+)$", key)
        if match:
            layer, rest = match.groups()
            if not rest.startswith("cross_attn."):
                out[f"lang_encoder.model.layers.{layer}.decoder_layer.{rest}"] = tensor
                continue
            if old := _rename_by_table(rest[len("cross_attn.") :], _CROSS_ATTENTION_EXPORTS):
                out[f"lang_encoder.model.layers.{layer}.gated_cross_attn_layer_sound.{old}"] = tensor
                continue
        unknown.append(key)
    if unknown:
        raise ConversionError(f"{len(unknown)} keys have no place in the original layout: {unknown[:20]}")
    return out


def write_original_layout(
    state: dict[str, torch.Tensor],
    tie_word_embeddings: bool,
    directory: str | Path,
    max_chunk_bytes: int = 2 * 1024**3,
) -> Path:
    """
    Writes `state` (this package's names) in the hub's original layout under `directory`:
    `safe_ckpt/metadata.json` + `safe_ckpt/model_chunk_<i>.safetensors` (chunks of at most `max_chunk_bytes`, or one
    tensor) and `clap_ckpt/epoch_16.pt` ({"epoch", "state_dict": {"module.audio_branch.*"}, "best_metric"}) holding
    the same tower. Returns the directory.
    """
    directory = Path(directory)
    safe = export_state_dict(state, tie_word_embeddings)
    (directory / "safe_ckpt").mkdir(parents=True, exist_ok=True)
    (directory / "clap_ckpt").mkdir(parents=True, exist_ok=True)
    chunks: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in safe.items():
        nbytes = tensor.numel() * tensor.element_size()
        if chunks[-1] and size + nbytes > max_chunk_bytes:
            chunks.append({})
            size = 0
        chunks[-1][key] = tensor.contiguous()
        size += nbytes
    metadata = {}
    for index, chunk in enumerate(chunks):
        name = f"model_chunk_{index}"
        save_file(chunk, str(directory / "safe_ckpt" / f"{name}.safetensors"))
        metadata[name] = list(chunk)
    (directory / "safe_ckpt" / "metadata.json").write_text(json.dumps(metadata, indent=1))
    tower = {k[len("clap.nvclap.") :]: v for k, v in safe.items() if k.startswith("clap.nvclap.")}
    pickle = {"epoch": 16, "state_dict": {f"module.audio_branch.{k}": v for k, v in tower.items()}, "best_metric": 0.0}
    torch.save(pickle, directory / "clap_ckpt" / "epoch_16.pt")
    return directory
