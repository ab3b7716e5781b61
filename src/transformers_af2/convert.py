"""Conversion of Audio Flamingo 2 checkpoints from NVIDIA's original hub layout into a transformers repository.

Original layout (nvidia/audio-flamingo-2, -1.5B, -0.5B, -SoundCoT):

    safe_ckpt/metadata.json            chunk name -> list of keys
    safe_ckpt/<chunk>.safetensors      the AF2 model (tower, audio transformer, LM with cross-attention)
    clap_ckpt/epoch_16.pt              a torch pickle with the CLAP tower before AF2 fine-tuning

The original code builds the model from three sources, in this order, each later one overriding the earlier:
the CLAP tower from `clap_ckpt`, the base Qwen2.5 LM, then every key of `safe_ckpt`. This module does the same,
strictly: a parameter that no source fills, or a source key that is neither used nor deliberately dropped, is an
error listing them.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import secrets
import shutil
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors import safe_open
from transformers import AutoTokenizer, GenerationConfig, Qwen2Config
from transformers.utils import logging

from .modeling import AudioFlamingo2Config, AudioFlamingo2ForConditionalGeneration

logger = logging.get_logger(__name__)

AF2_SPECIAL_TOKENS = ["<audio>", "<|endofchunk|>", "<|PAD_TOKEN|>"]
AF2_SEP_TOKEN = "<SEP>"

# What the released checkpoints were built with (configs/inference*.yaml of the original code). Used only for these
# hub ids; any other checkpoint must bring its own --config or be unambiguous from its weights.
_RELEASED_MODEL_CONFIG = {
    "cross_attn_every_n_layers": 1,
    "audio_transformer_kwargs": {"n_head": 8, "n_layers": 3, "d_inner": 2048},
}
_RELEASED_CLAP_CONFIG = {"window_length": 10.0, "window_overlap": 0.0, "max_num_window": 12}
KNOWN_CHECKPOINTS = {
    "nvidia/audio-flamingo-2": "Qwen/Qwen2.5-3B",
    "nvidia/audio-flamingo-2-1.5B": "Qwen/Qwen2.5-1.5B",
    "nvidia/audio-flamingo-2-0.5B": "Qwen/Qwen2.5-0.5B",
    "nvidia/audio-flamingo-2-SoundCoT": "Qwen/Qwen2.5-3B",
}

# Keys of the original that AF2 never uses at inference or in training, dropped on purpose.
_DROPPED_TOWER_KEYS = re.compile(
    r"^(spectrogram_extractor\.|logmel_extractor\.|tscam_conv\.|head\.|.*\.attn_mask$"
    # The "fusion" branch only runs for audio longer than one window; AF2 always feeds exactly one window.
    r"|patch_embed\.mel_conv2d\.|patch_embed\.fusion_model\.)"
)


class ConversionError(ValueError):
    """The checkpoint cannot be converted as asked; the message says what is wrong and what to do."""


@dataclass
class OriginalCheckpoint:
    """Tensors of an original-layout checkpoint, by source, with the keys in their original names."""

    safe_ckpt: dict[str, torch.Tensor]
    clap_ckpt: dict[str, torch.Tensor] = field(default_factory=dict)


def is_original_layout(source: str | os.PathLike) -> bool:
    """True for a local directory in the original layout or one of the released hub ids."""
    if str(source) in KNOWN_CHECKPOINTS:
        return True
    return (Path(source) / "safe_ckpt" / "metadata.json").is_file()


HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
_ORIGINAL_FILES = ["safe_ckpt/*", "clap_ckpt/*", "configs/*"]


def resolve_source(
    source: str | os.PathLike, revision: str | None = None, cache_dir=None, token=None, local_files_only=False
) -> Path:
    """Local directory as is; a hub id is downloaded (only the files conversion needs) or, offline, taken from the
    hub cache. The directory of a hub id is its snapshot, named by the commit."""
    path = Path(source)
    if path.is_dir():
        return path
    if path.exists():
        raise ConversionError(f"SOURCE {source} is a file; expected a checkpoint directory or a hub id.")
    if str(source) not in KNOWN_CHECKPOINTS and not HUB_ID.fullmatch(str(source)):
        raise ConversionError(f"SOURCE {source!r} is neither a local directory nor a hub id.")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(
            snapshot_download(
                str(source),
                revision=revision,
                allow_patterns=_ORIGINAL_FILES,
                cache_dir=cache_dir,
                token=token,
                local_files_only=local_files_only,
            )
        )
    except (HfHubHTTPError, LocalEntryNotFoundError) as error:
        raise ConversionError(
            f"{source}{'@' + revision if revision else ''}: cannot fetch the checkpoint ({_one_line(error)})."
        ) from error


def source_revision(directory: Path) -> str | None:
    """The commit of a hub snapshot (`.../snapshots/<commit>`), None for any other directory."""
    return directory.name if directory.parent.name == "snapshots" else None


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:300] or type(error).__name__


def load_clap_pickle(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """
    Reads `clap_ckpt/*.pt` without executing code from it: `weights_only=True`, with only the numpy scalar types the
    released file needs (its `best_metric` is a numpy float64) added to torch's allow-list.
    """
    _require_file(path, "a CLAP checkpoint (.pt)")
    allowed = [np.dtype, type(np.dtype(np.float64)), _numpy_scalar_reconstructor()]
    try:
        with torch.serialization.safe_globals(allowed):
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        detail = str(error)
        # torch's weights-only unpickler says "Unsupported global: GLOBAL module.name" for a refused callable and
        # "Unsupported operand" for pickle opcodes it does not run; anything else is a damaged file.
        if "Unsupported" in detail:
            raise ConversionError(
                f"{path}: refused to load: the pickle needs something outside the allow-list of tensors and numpy "
                f"scalars, so it may execute code ({_first_line_naming(detail, 'Unsupported')}). Only load "
                "checkpoints you trust, and convert them from the official files."
            ) from error
        raise ConversionError(f"{path}: not a readable checkpoint, the file is truncated or corrupt.") from error
    except (RuntimeError, EOFError, ValueError) as error:  # a cut zip archive, a cut legacy pickle
        raise ConversionError(
            f"{path}: not a readable checkpoint, the file is truncated or corrupt ({str(error).splitlines()[0][:200]}); "
            "download it again."
        ) from error
    if not isinstance(payload, dict) or not isinstance(payload.get("state_dict"), dict):
        raise ConversionError(f"{path}: expected a dict with a 'state_dict' entry, as CLAP checkpoints have.")
    return payload["state_dict"]


def _first_line_naming(text: str, word: str) -> str:
    return next((line.strip() for line in text.splitlines() if word in line), text.splitlines()[0])[:300]


def _require_file(path: str | os.PathLike, what: str) -> None:
    """A clear error for a directory or a missing path where `what` (a file) is expected."""
    if os.path.isdir(path):
        raise ConversionError(f"{path} is a directory; expected {what}.")
    if not os.path.isfile(path):
        raise ConversionError(f"{path}: no such file; expected {what}.")


def _numpy_scalar_reconstructor():
    core = getattr(np, "_core", None) or np.core
    return core.multiarray.scalar


def read_safe_ckpt(directory: Path) -> dict[str, torch.Tensor]:
    metadata_path = directory / "safe_ckpt" / "metadata.json"
    _require_file(metadata_path, "safe_ckpt/metadata.json (chunk name -> list of keys)")
    try:
        with open(metadata_path) as handle:
            metadata = json.load(handle)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConversionError(f"{metadata_path}: not valid JSON ({error}); the download may be truncated.") from None
    if not isinstance(metadata, dict) or not all(isinstance(keys, list) for keys in metadata.values()):
        raise ConversionError(f"{metadata_path}: expected a JSON object mapping chunk names to lists of keys.")
    tensors: dict[str, torch.Tensor] = {}
    chunk_of: dict[str, str] = {}
    duplicates: list[str] = []
    for chunk, keys in metadata.items():
        # A chunk is a file name inside safe_ckpt/; anything that could reach outside it is refused, not read.
        if not chunk or chunk in (".", "..") or "/" in chunk or "\\" in chunk or os.path.isabs(chunk):
            raise ConversionError(
                f"{metadata_path} names chunk {chunk!r}; chunk names must be plain file names inside safe_ckpt/."
            )
        chunk_path = directory / "safe_ckpt" / f"{chunk}.safetensors"
        if chunk_path.is_dir():
            raise ConversionError(f"{chunk_path} is a directory; expected a safetensors file.")
        if not chunk_path.is_file():
            raise ConversionError(f"{metadata_path} lists chunk {chunk!r} but {chunk_path} does not exist.")
        try:
            with safe_open(chunk_path, framework="pt") as reader:
                missing = sorted(set(keys) - set(reader.keys()))
                if missing:
                    raise ConversionError(f"{chunk_path} lacks keys that metadata.json lists: {missing[:10]}")
                for key in reader.keys():
                    if key in chunk_of:
                        duplicates.append(f"{key} (in {chunk_of[key]} and {chunk})")
                        continue
                    chunk_of[key] = chunk
                    tensors[key] = reader.get_tensor(key)
        except ConversionError:
            raise
        except Exception as error:
            raise ConversionError(
                f"{chunk_path}: not a readable safetensors file ({error}); the download may be truncated."
            ) from error
    if duplicates:
        # Which copy the original ends up with depends on dict order; guessing could silently pick the wrong one.
        raise ConversionError(f"{len(duplicates)} keys appear in several safe_ckpt chunks: {duplicates[:10]}")
    return tensors


def read_original_checkpoint(directory: Path) -> OriginalCheckpoint:
    safe = read_safe_ckpt(directory)
    clap_files = sorted((directory / "clap_ckpt").glob("*.pt"))
    clap: dict[str, torch.Tensor] = {}
    if len(clap_files) > 1:
        raise ConversionError(f"{directory / 'clap_ckpt'} holds several .pt files {clap_files}; keep the one to use.")
    if clap_files:
        clap = load_clap_pickle(clap_files[0])
    return OriginalCheckpoint(safe_ckpt=safe, clap_ckpt=clap)


# ----------------------------------------------------------------------------------------------------------------
# Key renaming: original name -> this project's parameter name (None = deliberately dropped)
# ----------------------------------------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------------


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
    tokenizer.add_special_tokens({"additional_special_tokens": AF2_SPECIAL_TOKENS})
    tokenizer.pad_token = "<|PAD_TOKEN|>"
    if tokenizer.sep_token is None:
        tokenizer.add_special_tokens({"sep_token": AF2_SEP_TOKEN})
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
        audio_token_id=tokenizer.convert_tokens_to_ids("<audio>"),
        end_of_chunk_token_id=tokenizer.convert_tokens_to_ids("<|endofchunk|>"),
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


# ----------------------------------------------------------------------------------------------------------------
# State dict assembly
# ----------------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------------------------------


def check_finite(state: dict[str, torch.Tensor], label: str) -> None:
    """Raises ConversionError naming every tensor holding NaN or infinity: such weights make greedy decoding answer
    token 0 forever instead of failing."""
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ConversionError(f"{label}: {len(bad)} tensors hold NaN or infinite values: {sorted(bad)[:20]}")


def _dtype(name: str | torch.dtype | None) -> torch.dtype:
    if name is None or isinstance(name, torch.dtype):
        return name or torch.float32
    table = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if name not in table:
        raise ConversionError(f"--dtype {name!r} is not one of {sorted(table)}.")
    return table[name]


def convert_model(
    source: str | os.PathLike,
    config: str | os.PathLike | None = None,
    tokenizer: str | os.PathLike | None = None,
    lm_config: str | os.PathLike | None = None,
    lm_weights: str | os.PathLike | None = None,
    dtype: str | torch.dtype | None = "float32",
    revision: str | None = None,
):
    """The model half of `convert_checkpoint`: returns `(model, tokenizer, original_config)`."""
    return _convert_model(source, resolve_source(source, revision), config, tokenizer, lm_config, lm_weights, dtype)


def _convert_model(source, directory: Path, config, tokenizer, lm_config, lm_weights, dtype, hub_kwargs=None):
    hub_kwargs = hub_kwargs or {}
    original_config = load_original_config(config, str(source), directory)
    model_config = original_config.get("model_config", {}) or {}
    tokenizer_source = tokenizer or model_config.get("tokenizer_path")
    lm_config_source = lm_config or model_config.get("lang_encoder_path")
    if tokenizer_source is None or lm_config_source is None:
        raise ConversionError(
            f"{source}: which Qwen2.5 base model is this? Its configs/inference.yaml is missing or names no base "
            "model: pass --tokenizer and --lm-config (paths or hub ids), or --config with "
            "model_config.tokenizer_path and lang_encoder_path."
        )
    checkpoint = read_original_checkpoint(directory)
    text_tokenizer = build_tokenizer(tokenizer_source, **hub_kwargs)
    config_obj = build_config(
        checkpoint, original_config, load_lm_config(lm_config_source, **hub_kwargs), text_tokenizer, str(source)
    )

    with torch.device("meta"):
        model = AudioFlamingo2ForConditionalGeneration(config_obj)
    expected = model.state_dict()
    if config_obj.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    non_persistent = {name for name, _ in model.named_buffers() if name not in expected}
    expected = {k: v for k, v in expected.items() if k not in non_persistent}
    state = assemble_state_dict(
        checkpoint, expected, lm_weights or lm_config_source, config_obj.tie_word_embeddings, hub_kwargs
    )
    check_finite(state, f"the checkpoint {source}")
    target_dtype = _dtype(dtype)
    state = {k: (v.to(target_dtype) if v.is_floating_point() else v) for k, v in state.items()}
    check_finite(state, f"the checkpoint {source} cast to {target_dtype} (values beyond its range)")
    del checkpoint
    model.load_state_dict(state, strict=False, assign=True)
    # Non-persistent buffers (rotary frequencies, Swin's relative indices) are computed, not stored.
    _materialise_buffers(model, config_obj)
    model.tie_weights()
    model.eval()
    model.config.dtype = target_dtype

    return model, text_tokenizer, original_config


def convert_checkpoint(
    source: str | os.PathLike,
    output: str | os.PathLike | None = None,
    config: str | os.PathLike | None = None,
    tokenizer: str | os.PathLike | None = None,
    lm_config: str | os.PathLike | None = None,
    lm_weights: str | os.PathLike | None = None,
    dtype: str | torch.dtype | None = "float32",
    revision: str | None = None,
    overwrite: bool = False,
    directory: str | os.PathLike | None = None,
    hub_kwargs: dict | None = None,
):
    """
    Converts an original-layout AF2 checkpoint. Returns `(model, processor)`; when `output` is given, also writes a
    complete transformers repository there (atomically: a failed conversion leaves no partial directory). An
    existing `output` is replaced only when it is an earlier conversion, or with `overwrite`; an `output` that is,
    holds or lies inside the source is always refused (see `save_atomically`).

    Args:
        source: local directory or hub id in the original layout.
        output: directory to write.
        config: the original `configs/inference.yaml` (clap_config + model_config).
        tokenizer: base Qwen2.5 tokenizer (path or id); defaults to model_config.tokenizer_path.
        lm_config: base Qwen2.5 config (config.json path, directory or id); defaults to model_config.lang_encoder_path.
        lm_weights: base LM weights, only read for LM parameters that safe_ckpt lacks; defaults to lm_config.
        dtype: dtype of the written weights.
        revision: branch, tag or commit of a hub id.
        overwrite: replace an existing `output` even when it is not an earlier conversion.
        directory: the files of `source` when already fetched (`resolve_source`).
        hub_kwargs: `cache_dir`, `token`, `local_files_only` for fetching the base model from the hub.
    """
    from .processing import AudioFlamingo2FeatureExtractor, AudioFlamingo2Processor

    directory = resolve_source(source, revision) if directory is None else Path(directory)
    if output is not None:
        check_output(output, directory, overwrite)  # before the minutes of conversion, not after
    options = {"config": config, "tokenizer": tokenizer, "lm_config": lm_config, "lm_weights": lm_weights}
    model, text_tokenizer, original_config = _convert_model(
        source, directory, dtype=dtype, hub_kwargs=hub_kwargs, **options
    )
    config_obj = model.config
    clap_config = original_config.get("clap_config", {}) or {}
    feature_extractor = AudioFlamingo2FeatureExtractor(
        feature_size=config_obj.audio_config.num_mel_bins,
        window_length=float(clap_config.get("window_length", _RELEASED_CLAP_CONFIG["window_length"])),
        window_overlap=float(clap_config.get("window_overlap", _RELEASED_CLAP_CONFIG["window_overlap"])),
        max_num_window=int(clap_config.get("max_num_window", _RELEASED_CLAP_CONFIG["max_num_window"])),
    )
    processor = AudioFlamingo2Processor(feature_extractor=feature_extractor, tokenizer=text_tokenizer)
    model.generation_config = GenerationConfig(
        eos_token_id=config_obj.eos_token_id,
        pad_token_id=config_obj.pad_token_id,
        max_new_tokens=256,
        do_sample=False,
    )
    if output is not None:
        provenance = {
            "source": str(source),
            "revision": source_revision(directory),
            "options": {k: str(v) for k, v in options.items() if v is not None},
            "dtype": str(_dtype(dtype)).removeprefix("torch."),
        }
        save_atomically(model, processor, output, directory, overwrite, provenance)
    return model, processor


def _materialise_buffers(model: torch.nn.Module, config: AudioFlamingo2Config) -> None:
    """Buffers left on the meta device by construction are rebuilt on CPU by re-running the init of their module."""
    from .modeling.modeling_audioflamingo2 import AudioFlamingo2AudioRotaryEmbedding

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


# ----------------------------------------------------------------------------------------------------------------
# Writing the output: only ever replaces an earlier conversion
# ----------------------------------------------------------------------------------------------------------------

# Written into every converted repository. Its presence is what lets a later conversion replace the folder: a folder
# without it (user files, a fine-tune saved with save_pretrained, the source itself) is never deleted unasked.
CONVERSION_MARKER = "af2_conversion.json"
_STAGING_TAG = "af2-staging"
_BACKUP_TAG = "af2-replaced"


def is_af2_conversion(path: str | os.PathLike) -> bool:
    """True for a directory this converter wrote: it holds the marker file and an AF2 config.json."""
    path = Path(path)
    try:
        marker = json.loads((path / CONVERSION_MARKER).read_text())
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and isinstance(config, dict) and config.get("model_type") == "audioflamingo2"


def check_output(output: str | os.PathLike, source_dir: str | os.PathLike | None = None, overwrite: bool = False):
    """
    Raises ConversionError when writing `output` could destroy something that is not an earlier conversion: the
    source checkpoint (output equal to it, inside it or containing it, symlinks resolved), the current or home
    directory (or a parent of them), or an existing path that is not an AF2 conversion (allowed with `overwrite`).
    """
    output = Path(output)
    resolved = output.resolve()
    if source_dir is not None:
        source = Path(source_dir).resolve()
        if resolved == source or resolved in source.parents or source in resolved.parents:
            relation = "is" if resolved == source else ("contains" if resolved in source.parents else "is inside")
            raise ConversionError(
                f"output {output} {relation} the source checkpoint {source_dir}; choose an output folder elsewhere."
            )
    for place, what in ((Path.cwd().resolve(), "the current directory"), (Path.home().resolve(), "your home")):
        if resolved == place or resolved in place.parents:
            raise ConversionError(f"output {output} is or contains {what}; choose a new folder for the conversion.")
    if (output.exists() or output.is_symlink()) and not overwrite and not is_af2_conversion(output):
        raise ConversionError(
            f"output {output} exists and is not an earlier AF2 conversion (no {CONVERSION_MARKER}); refusing to "
            "replace it. Choose another folder, or pass --overwrite (overwrite=True) to replace it."
        )


def save_atomically(
    model,
    processor,
    output: str | os.PathLike,
    source_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    provenance: dict | None = None,
) -> Path:
    """
    Writes the repository into a staging sibling, then renames it into place, so `output` is at every moment either
    absent, the previous conversion or the complete new one. An existing `output` is replaced only when it is an
    earlier conversion (or `overwrite`); see `check_output`. The staging and backup names carry this process's
    host and pid, so a later run can remove what a killed one left (`remove_stale_staging`).
    """
    output = Path(output)
    check_output(output, source_dir, overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(output)
    staging = _unique_sibling(output, _STAGING_TAG)
    try:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        (staging / CONVERSION_MARKER).write_text(json.dumps(provenance or {}, indent=2, sort_keys=True) + "\n")
        _apply_umask(staging)
        check_output(output, source_dir, overwrite)  # the folder may have changed during the conversion
        if output.exists() or output.is_symlink():
            backup = _unique_sibling(output, _BACKUP_TAG, create=False)
            output.rename(backup)
            try:
                staging.rename(output)
            except BaseException:
                backup.rename(output)
                raise
            _remove(backup)
        else:
            staging.rename(output)
    except BaseException:
        _remove(staging)
        raise
    return output


def _unique_sibling(output: Path, tag: str, create: bool = True) -> Path:
    """`.NAME.TAG.HOST.PID.RANDOM` beside `output`; created with the usual permissions (mkdtemp would give 0700)."""
    path = output.with_name(staging_name(output, tag, os.getpid()))
    if create:
        path.mkdir()
    return path


def staging_name(output: Path, tag: str, pid: int | str) -> str:
    return f".{output.name}.{tag}.{_host()}.{pid}.{secrets.token_hex(4)}"


def _apply_umask(directory: Path) -> None:
    """Gives the files the permissions the user's umask asks for: safetensors writes weights as 0600, which would make
    a converted repository (or a shared conversion cache) unreadable to the user's group."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for path in directory.rglob("*"):
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "host"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def remove_stale_staging(output: str | os.PathLike) -> list[Path]:
    """
    Removes the staging folders beside `output` left by conversions on this host whose process is gone (killed with
    SIGKILL, or the machine lost power). A backup of an earlier conversion whose replacement never landed is put back
    in place. Returns what was removed.
    """
    output = Path(output)
    pattern = re.compile(
        rf"^\.{re.escape(output.name)}\.({_STAGING_TAG}|{_BACKUP_TAG})\.{re.escape(_host())}\.(\d+)\.[0-9a-f]+$"
    )
    removed = []
    if not output.parent.is_dir():
        return removed
    for candidate in output.parent.iterdir():
        match = pattern.match(candidate.name)
        if not match or _process_alive(int(match.group(2))):
            continue
        if match.group(1) == _BACKUP_TAG and not (output.exists() or output.is_symlink()):
            candidate.rename(output)
            continue
        _remove(candidate)
        removed.append(candidate)
    return removed


# ----------------------------------------------------------------------------------------------------------------
# The conversion cache: original-layout checkpoints loaded by id are converted once per content
# ----------------------------------------------------------------------------------------------------------------

# Part of every cache key: raise it when a converter change alters what a conversion writes.
CONVERSION_FORMAT = 2


def default_cache_dir() -> Path:
    from huggingface_hub.constants import HF_HOME

    return Path(os.environ.get("AF2_CACHE", Path(HF_HOME) / "transformers_af2"))


def _content_stamp(value) -> str:
    """What a source or option *is*, not what it is called: a hub snapshot's commit, a file's bytes, a directory's
    files (path, size, mtime); any other value (a hub id of the base model, a dtype) as written."""
    if value is None:
        return "-"
    path = Path(value)
    if path.is_file():
        return "file:" + hashlib.sha256(path.read_bytes()).hexdigest()
    if path.is_dir():
        commit = source_revision(path.resolve()) or source_revision(path)
        if commit is not None:
            return f"snapshot:{commit}"
        files = sorted(p for p in path.rglob("*") if p.is_file())
        return f"dir:{path.resolve()}" + "".join(
            f"|{p.relative_to(path)}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files
        )
    return f"value:{value}"


def converted_cache_path(source: str | os.PathLike, directory: Path | None = None, **options) -> Path:
    """
    Where the conversion of `source` with `options` (convert_checkpoint's keyword arguments) is cached. The key
    covers the content: the hub commit (or the local files), the bytes of the `config` YAML and of local base-model
    files, the other options, and the converter's format. `directory` is the resolved source when known.
    """
    directory = resolve_source(source) if directory is None else directory
    stamp = {
        "format": CONVERSION_FORMAT,
        "source": str(source),
        "content": _content_stamp(directory),
        "options": {k: _content_stamp(v) for k, v in sorted(options.items()) if v is not None},
    }
    digest = hashlib.sha256(json.dumps(stamp, sort_keys=True).encode()).hexdigest()[:16]
    name = re.sub(
        r"[^A-Za-z0-9._-]",
        "_",
        str(source).strip("/").replace("/", "--") if not Path(source).is_dir() else Path(source).resolve().name,
    )
    return default_cache_dir() / f"{name}-{digest}"


def cached_conversion(
    source: str | os.PathLike,
    revision: str | None = None,
    hub_cache_dir=None,
    token=None,
    local_files_only: bool = False,
    **options,
) -> Path:
    """
    The converted repository of `source` (`options`: convert_checkpoint's keyword arguments), converting it on first
    use into the cache (see `converted_cache_path`). A file lock makes concurrent callers, threads or processes,
    convert once: the others wait, then reuse it; nobody sees a half-written folder since a conversion lands by
    rename. `hub_cache_dir` and `token` are for fetching a hub id.
    """
    from filelock import FileLock

    directory = resolve_source(source, revision, hub_cache_dir, token, local_files_only)
    target = converted_cache_path(source, directory, **options)
    if is_af2_conversion(target):
        return target
    # Beside the cache rather than in it, so the cache holds conversions only.
    locks = target.parent.with_name(target.parent.name + ".locks")
    locks.mkdir(parents=True, exist_ok=True)
    with FileLock(locks / f"{target.name}.lock"):
        if not is_af2_conversion(target):
            logger.warning(f"Converting {source} from the original layout into {target} (once).")
            hub_kwargs = {"cache_dir": hub_cache_dir, "token": token, "local_files_only": local_files_only}
            hub_kwargs = {k: v for k, v in hub_kwargs.items() if v}
            convert_checkpoint(
                source, target, revision=revision, directory=directory, hub_kwargs=hub_kwargs, **options
            )
    return target
