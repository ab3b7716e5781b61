"""Conversion of Audio Flamingo 2 checkpoints from NVIDIA's original hub layout into a transformers repository.

Original layout (nvidia/audio-flamingo-2, -1.5B, -0.5B, -SoundCoT):

    safe_ckpt/metadata.json            chunk name -> list of keys
    safe_ckpt/<chunk>.safetensors      the AF2 model (tower, audio transformer, LM with cross-attention)
    clap_ckpt/epoch_16.pt              a torch pickle with the CLAP tower before AF2 fine-tuning
    configs/inference.yaml             (when present) the original config, naming the base Qwen2.5 LM and tokenizer

The original code builds the model from three sources, in this order, each later one overriding the earlier:
the CLAP tower from `clap_ckpt`, the base Qwen2.5 LM, then every key of `safe_ckpt`. This package does the same,
strictly: a parameter that no source fills, or a source key that is neither used nor deliberately dropped, is an
error listing them.

One module per concern: `source` (finding and reading the checkpoint), `renames` (original -> our parameter names),
`config` (the AudioFlamingo2Config), `weights` (the state dict and its checks), `checkpoint` (the entry points),
`output` (writing a conversion without ever destroying anything else), `cache` (converted once per content).
"""

from .cache import CONVERSION_FORMAT, cached_conversion, converted_cache_path, default_cache_dir
from .checkpoint import convert_checkpoint, convert_model
from .config import build_config, build_tokenizer, load_original_config
from .errors import ConversionError
from .output import (
    CONVERSION_MARKER,
    check_output,
    is_af2_conversion,
    remove_stale_staging,
    save_atomically,
    staging_name,
)
from .source import (
    HUB_ID,
    KNOWN_CHECKPOINTS,
    OriginalCheckpoint,
    is_original_layout,
    load_clap_pickle,
    read_original_checkpoint,
    read_safe_ckpt,
    resolve_source,
    source_revision,
)
from .weights import assemble_state_dict, check_finite

__all__ = [
    "CONVERSION_FORMAT",
    "CONVERSION_MARKER",
    "HUB_ID",
    "KNOWN_CHECKPOINTS",
    "ConversionError",
    "OriginalCheckpoint",
    "assemble_state_dict",
    "build_config",
    "build_tokenizer",
    "cached_conversion",
    "check_finite",
    "check_output",
    "convert_checkpoint",
    "convert_model",
    "converted_cache_path",
    "default_cache_dir",
    "is_af2_conversion",
    "is_original_layout",
    "load_clap_pickle",
    "load_original_config",
    "read_original_checkpoint",
    "read_safe_ckpt",
    "remove_stale_staging",
    "resolve_source",
    "save_atomically",
    "source_revision",
    "staging_name",
]
