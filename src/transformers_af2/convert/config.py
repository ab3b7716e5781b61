"""The AudioFlamingo2Config of a checkpoint: from the original inference YAML, the base LM config and the weights."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
import yaml
from transformers import AutoTokenizer, Qwen2Config

from ..modeling import AudioFlamingo2Config
from ..processing.processing_audioflamingo2 import (
    ADDED_SPECIAL_TOKENS,
    AUDIO_TOKEN,
    END_OF_CHUNK_TOKEN,
    PAD_TOKEN,
    SEP_TOKEN,
)
from .errors import ConversionError
from .source import KNOWN_CHECKPOINTS, OriginalCheckpoint

# What the released checkpoints were built with (configs/inference*.yaml of the original code). Used only for these
# hub ids; any other checkpoint must bring its own --config or be unambiguous from its weights.
_RELEASED_MODEL_CONFIG = {
    "cross_attn_every_n_layers": 1,
    "audio_transformer_kwargs": {"n_head": 8, "n_layers": 3, "d_inner": 2048},
}
_RELEASED_CLAP_CONFIG = {"window_length": 10.0, "window_overlap": 0.0, "max_num_window": 12}


def load_original_config(config_path: str | os.PathLike | None, source: str, directory: Path) -> dict:
    """The original `configs/inference.yaml` content: from --config, else the checkpoint's own configs/, else the
    released values for the known hub ids, else empty (everything must then come from the weights)."""
    if config_path and os.path.isdir(config_path):
        raise ConversionError(f"--config {config_path} is a directory; expected the inference YAML file.")
    candidates = [Path(config_path)] if config_path else [directory / "configs" / "inference.yaml"]
    for candidate in candidates:
        if candidate.is_file():
            with open(candidate) as handle:
                loaded = yaml.safe_load(handle) or {}
            if not isinstance(loaded, dict):
                raise ConversionError(f"{candidate}: expected a YAML mapping with clap_config and model_config.")
            return loaded
        if config_path:
            raise ConversionError(f"--config {config_path}: file not found.")
    if source in KNOWN_CHECKPOINTS:
        return {
            "clap_config": dict(_RELEASED_CLAP_CONFIG),
            "model_config": {
                **_RELEASED_MODEL_CONFIG,
                "lang_encoder_path": KNOWN_CHECKPOINTS[source],
                "tokenizer_path": KNOWN_CHECKPOINTS[source],
            },
        }
    return {}


def infer_tower_config(tower: dict[str, torch.Tensor]) -> dict:
    """HTSAT hyper-parameters read off the tower's weights (keys without prefix, original names)."""
    try:
        proj = tower["patch_embed.proj.weight"]
        depths = []
        heads = []
        stage = 0
        while f"layers.{stage}.blocks.0.norm1.weight" in tower:
            blocks = 0
            while f"layers.{stage}.blocks.{blocks}.norm1.weight" in tower:
                blocks += 1
            depths.append(blocks)
            heads.append(tower[f"layers.{stage}.blocks.0.attn.relative_position_bias_table"].shape[1])
            stage += 1
        table_rows = tower["layers.0.blocks.0.attn.relative_position_bias_table"].shape[0]
        num_mel_bins = tower["bn0.weight"].shape[0]
        mlp_hidden = tower["layers.0.blocks.0.mlp.fc1.weight"].shape[0]
    except KeyError as error:
        raise ConversionError(f"the CLAP tower weights lack {error}; is this an HTSAT (AF-CLAP) checkpoint?") from None
    window = (int(round(table_rows**0.5)) + 1) // 2
    if (2 * window - 1) ** 2 != table_rows:
        raise ConversionError(f"relative_position_bias_table has {table_rows} rows, not (2*window-1)^2.")
    embed_dim, in_channels, patch_h, patch_w = proj.shape
    return {
        "patch_embeds_hidden_size": embed_dim,
        "patch_embed_input_channels": in_channels,
        "patch_size": patch_h if patch_h == patch_w else [patch_h, patch_w],
        # HTSAT's patch stride equals its patch size in every released shape (non-overlapping patches).
        "patch_stride": [patch_h, patch_w],
        "depths": depths,
        "num_attention_heads": heads,
        "window_size": window,
        "num_mel_bins": num_mel_bins,
        "mlp_ratio": mlp_hidden / embed_dim,
        "qkv_bias": "layers.0.blocks.0.attn.qkv.bias" in tower,
        "enable_patch_layer_norm": "patch_embed.norm.weight" in tower,
        # The original HTSAT is always built with spec_size 256 (the mel is resized into a 256x256 image).
        "spec_size": 256,
        "enable_fusion": False,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "drop_path_rate": 0.0,
        "layer_norm_eps": 1e-5,
    }


def _tower_weights(checkpoint: OriginalCheckpoint) -> dict[str, torch.Tensor]:
    """The tower the model will end up with (safe_ckpt keys win over clap_ckpt), in original names."""
    tower = {k[len("module.audio_branch.") :]: v for k, v in checkpoint.clap_ckpt.items() if "audio_branch." in k}
    tower.update({k[len("clap.nvclap.") :]: v for k, v in checkpoint.safe_ckpt.items() if k.startswith("clap.")})
    return tower


def _infer_audio_transformer(
    checkpoint: OriginalCheckpoint, audio_dim: int, kwargs: dict, source_label: str
) -> tuple[int, int, int]:
    """(num_layers, num_heads, intermediate_size) from config where given, else from the weights."""
    safe = checkpoint.safe_ckpt
    layers = 0
    while f"audio_transformer_clap.layer_stack.{layers}.slf_attn.w_qs.weight" in safe:
        layers += 1
    if layers == 0:
        raise ConversionError("safe_ckpt has no audio_transformer_clap.layer_stack.* weights.")
    if kwargs.get("n_layers") not in (None, layers):
        raise ConversionError(f"config says n_layers={kwargs['n_layers']} but the weights have {layers} layers.")
    intermediate = safe["audio_transformer_clap.layer_stack.0.pos_ffn.w_1.weight"].shape[0]
    if kwargs.get("d_inner") not in (None, intermediate):
        raise ConversionError(f"config says d_inner={kwargs['d_inner']} but the weights have {intermediate}.")
    heads = kwargs.get("n_head")
    inv_freq = safe.get("audio_transformer_clap.position_enc.inv_freq")
    if heads is None:
        # The rotary width is max(head_dim // 2, 32): above 32 it pins the head width, hence the head count.
        rotary_dim = 2 * inv_freq.shape[0] if inv_freq is not None else None
        if rotary_dim is None or rotary_dim <= 32:
            raise ConversionError(
                f"the audio transformer's head count of {source_label} cannot be read off its weights; pass "
                "--config with model_config.audio_transformer_kwargs.n_head (8 for every released AF2)."
            )
        heads = audio_dim // (2 * rotary_dim)
    return layers, int(heads), int(intermediate)


def _cross_attention_layers(checkpoint: OriginalCheckpoint, num_layers: int) -> list[int]:
    pattern = re.compile(
        r"^lang_encoder\.(?:model\.layers\.(\d+)\.gated_cross_attn_layer_sound|"
        r"gated_cross_attn_layers_sound\.(\d+))\."
    )
    found = set()
    for key in checkpoint.safe_ckpt:
        match = pattern.match(key)
        if match:
            found.add(int(match.group(1) or match.group(2)))
    if any(i >= num_layers for i in found):
        raise ConversionError(f"cross-attention weights for layers {sorted(found)} but the LM has {num_layers}.")
    return sorted(found)


def build_tokenizer(tokenizer_source: str | os.PathLike, **hub_kwargs):
    """The base Qwen2.5 tokenizer plus AF2's tokens, added exactly as the original does."""
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_source), **hub_kwargs)
    tokenizer.add_special_tokens({"additional_special_tokens": list(ADDED_SPECIAL_TOKENS)})
    tokenizer.pad_token = PAD_TOKEN
    if tokenizer.sep_token is None:
        tokenizer.add_special_tokens({"sep_token": SEP_TOKEN})
    tokenizer.padding_side = "left"
    return tokenizer


def load_lm_config(lm_config_source: str | os.PathLike, **hub_kwargs) -> Qwen2Config:
    path = Path(lm_config_source)
    if path.is_file():
        with open(path) as handle:
            config_dict = json.load(handle)
        config_dict.pop("_attn_implementation_autoset", None)
        config_dict.pop("transformers_version", None)
        return Qwen2Config(**config_dict)
    return Qwen2Config.from_pretrained(str(lm_config_source), **hub_kwargs)


def build_config(
    checkpoint: OriginalCheckpoint,
    original_config: dict,
    lm_config: Qwen2Config,
    tokenizer,
    source_label: str,
) -> AudioFlamingo2Config:
    model_config = original_config.get("model_config", {}) or {}
    at_kwargs = model_config.get("audio_transformer_kwargs", {}) or {}
    tower_config = infer_tower_config(_tower_weights(checkpoint))
    audio_dim = int(tower_config["patch_embeds_hidden_size"] * 2 ** (len(tower_config["depths"]) - 1))
    layers, heads, intermediate = _infer_audio_transformer(checkpoint, audio_dim, at_kwargs, source_label)

    text_config = lm_config.to_dict()
    text_config["vocab_size"] = len(tokenizer)
    text_config.pop("model_type", None)
    text_config["pad_token_id"] = tokenizer.pad_token_id
    text_config["eos_token_id"] = tokenizer.eos_token_id
    num_lm_layers = text_config["num_hidden_layers"]

    cross_layers = _cross_attention_layers(checkpoint, num_lm_layers)
    every = model_config.get("cross_attn_every_n_layers")
    if every is not None:
        expected = [i for i in range(num_lm_layers) if (i + 1) % int(every) == 0]
        if expected != cross_layers:
            raise ConversionError(
                f"cross_attn_every_n_layers={every} means cross-attention before layers {expected}, but the weights "
                f"have it before {cross_layers}."
            )
    sample_block = next(k for k in checkpoint.safe_ckpt if k.endswith("gated_cross_attn_layer_sound.attn.to_q.weight"))
    inner_dim = checkpoint.safe_ckpt[sample_block].shape[0]
    ff_hidden = checkpoint.safe_ckpt[sample_block.replace("attn.to_q.weight", "ff.1.weight")].shape[0]
    # The original fixes 64-dim heads (MaskedCrossAttention's default); the count follows from the inner width.
    head_dim = int(model_config.get("cross_attention_head_dim", 64))
    if inner_dim % head_dim:
        raise ConversionError(f"cross-attention inner width {inner_dim} is not a multiple of head dim {head_dim}.")

    config = AudioFlamingo2Config(
        audio_config=tower_config,
        text_config={**text_config, "model_type": "qwen2"},
        audio_transformer_num_layers=layers,
        audio_transformer_num_heads=heads,
        audio_transformer_intermediate_size=intermediate,
        cross_attention_layers=cross_layers,
        cross_attention_every_n_layers=int(every) if every is not None else 1,
        cross_attention_num_heads=inner_dim // head_dim,
        cross_attention_head_dim=head_dim,
        cross_attention_ff_mult=ff_hidden // text_config["hidden_size"],
        audio_token_id=tokenizer.convert_tokens_to_ids(AUDIO_TOKEN),
        end_of_chunk_token_id=tokenizer.convert_tokens_to_ids(END_OF_CHUNK_TOKEN),
        pad_token_id=tokenizer.pad_token_id,
        sep_token_id=tokenizer.sep_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=bool(text_config.get("tie_word_embeddings", False)),
    )
    inv_freq = checkpoint.safe_ckpt.get("audio_transformer_clap.position_enc.inv_freq")
    if inv_freq is not None:
        rotary_dim = config.audio_transformer_rotary_dim
        expected = 1.0 / (config.audio_transformer_rope_theta ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))
        # Compared at the precision the checkpoint stored them in: a float16/bfloat16 save rounds every value.
        stored = inv_freq.dtype if inv_freq.is_floating_point() else torch.float32
        rtol = max(1e-5, 2 * torch.finfo(stored).eps)
        if inv_freq.shape != expected.shape or not torch.allclose(inv_freq.float(), expected, rtol=rtol):
            raise ConversionError(
                f"the audio transformer's stored rotary frequencies ({inv_freq.shape[0]} values) do not match "
                f"{heads} heads (rotary width {rotary_dim}, base {config.audio_transformer_rope_theta}); check "
                "audio_transformer_kwargs.n_head in --config."
            )
    return config
