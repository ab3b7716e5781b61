"""The entry points: convert a checkpoint into a model and processor, and write it."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import GenerationConfig

from ..modeling import AudioFlamingo2ForConditionalGeneration
from ..utils import parse_dtype
from .config import _RELEASED_CLAP_CONFIG, build_config, build_tokenizer, load_lm_config, load_original_config
from .errors import ConversionError
from .output import check_output, save_atomically
from .source import read_original_checkpoint, resolve_source, source_revision
from .weights import _materialise_buffers, assemble_state_dict, check_finite


def convert_model(
    source: str | os.PathLike,
    config: str | os.PathLike | None = None,
    tokenizer: str | os.PathLike | None = None,
    lm_config: str | os.PathLike | None = None,
    lm_weights: str | os.PathLike | None = None,
    dtype: str | torch.dtype | None = "float32",
    revision: str | None = None,
    *,
    directory: str | os.PathLike | None = None,
    hub_kwargs: dict | None = None,
):
    """The model half of `convert_checkpoint` (see there for the arguments): returns `(model, tokenizer,
    original_config)`."""
    directory = resolve_source(source, revision) if directory is None else Path(directory)
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
    target_dtype = parse_dtype(dtype)
    cast = {k: v.to(target_dtype) for k, v in state.items() if v.is_floating_point() and v.dtype != target_dtype}
    # Only a cast can overflow finite values; the tensors already in the target dtype were scanned just above.
    check_finite(cast, f"the checkpoint {source} cast to {target_dtype} (values beyond its range)")
    state.update(cast)
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
    from ..processing import AudioFlamingo2FeatureExtractor, AudioFlamingo2Processor

    directory = resolve_source(source, revision) if directory is None else Path(directory)
    if output is not None:
        check_output(output, directory, overwrite)  # before the minutes of conversion, not after
    options = {"config": config, "tokenizer": tokenizer, "lm_config": lm_config, "lm_weights": lm_weights}
    model, text_tokenizer, original_config = convert_model(
        source, dtype=dtype, directory=directory, hub_kwargs=hub_kwargs, **options
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
            "dtype": str(parse_dtype(dtype)).removeprefix("torch."),
        }
        save_atomically(model, processor, output, directory, overwrite, provenance)
    return model, processor
