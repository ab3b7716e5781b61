"""
The model families the shared commands run: Audio Flamingo 2, Audio Flamingo 3 and Music Flamingo, each one
`ModelFamily` subclass (see `base`), registered under its `config.json` `model_type`.

    model, processor = load_model_and_processor("nvidia/audio-flamingo-3-hf")
    family = family_for(model, processor)
    answers = family.answer(model, ["What is this sound?"], ["clip.wav"], {"max_new_tokens": 64})

A checkpoint's family is read from its `config.json` alone (no weights loaded); original-layout AF2 checkpoints,
which have none, are AF2. Adding a family is one subclass with `model_types`, passed to `register`.
"""

from __future__ import annotations

import os

from .af2 import AudioFlamingo2Family
from .audioflamingo3 import AudioFlamingo3Family, MusicFlamingoFamily, split_thinking
from .base import EncodedAudio, EvalPrompt, ModelFamily, UnreadableAudio, decode_mono, source_seconds

FAMILIES: dict[str, type[ModelFamily]] = {}


def register(family: type[ModelFamily]) -> type[ModelFamily]:
    """Makes `family` the one for each of its `model_types`."""
    for model_type in family.model_types:
        FAMILIES[model_type] = family
    return family


for _family in (AudioFlamingo2Family, AudioFlamingo3Family, MusicFlamingoFamily):
    register(_family)


def family_class(model_type: str, where: str = "the model") -> type[ModelFamily]:
    if model_type not in FAMILIES:
        raise ValueError(
            f"{where} is a {model_type!r} model; the supported families are "
            f"{', '.join(f'{cls.display_name} ({t})' for t, cls in FAMILIES.items())}."
        )
    return FAMILIES[model_type]


def detect_family(model_id: str | os.PathLike) -> type[ModelFamily]:
    """The family of a checkpoint (hub id or folder), from its `config.json`'s `model_type` without loading weights;
    original-layout AF2 checkpoints (no `config.json`) are AF2."""
    from transformers import PretrainedConfig

    from ..convert import KNOWN_CHECKPOINTS, is_original_layout

    model_id = str(model_id)
    if model_id in KNOWN_CHECKPOINTS or (os.path.isdir(model_id) and is_original_layout(model_id)):
        return AudioFlamingo2Family
    try:
        config, _ = PretrainedConfig.get_config_dict(model_id)
    except OSError:
        # No config.json where transformers looks: an original-layout hub checkpoint (AF2's loader resolves it,
        # or raises transformers' own error).
        return AudioFlamingo2Family
    return family_class(config.get("model_type"), f"model {model_id}")


def family_for(model, processor) -> ModelFamily:
    """The family adapter of a loaded model, bound to its processor."""
    return family_class(model.config.model_type, f"model {model.name_or_path or type(model).__name__}")(processor)


def load_model_and_processor(
    model_id: str, device=None, dtype=None, original_config: str | None = None, **from_pretrained_options
):
    """
    `(model, processor)` of any supported checkpoint: AF2 (converted, or original-layout hub id or directory,
    converted on first use and cached), Audio Flamingo 3, Music Flamingo; the family comes from `config.json`.
    The model is in eval mode on `device`; `from_pretrained_options` go to `from_pretrained` (a `device_map` there
    places the weights while loading, as quantized weights must be).
    """
    looks_local = os.path.isabs(model_id) or model_id.startswith((".", "~")) or os.path.exists(model_id)
    if looks_local and not os.path.isdir(os.path.expanduser(model_id)):
        raise FileNotFoundError(f"model {model_id}: no such directory.")
    model_id = os.path.expanduser(model_id)
    family = detect_family(model_id)
    model, processor = family.load(model_id, dtype=dtype, original_config=original_config, **from_pretrained_options)
    if device is not None and "device_map" not in from_pretrained_options:
        model.to(device)
    return model, processor


__all__ = [
    "FAMILIES",
    "AudioFlamingo2Family",
    "AudioFlamingo3Family",
    "EncodedAudio",
    "EvalPrompt",
    "ModelFamily",
    "MusicFlamingoFamily",
    "UnreadableAudio",
    "decode_mono",
    "detect_family",
    "family_class",
    "family_for",
    "load_model_and_processor",
    "register",
    "source_seconds",
    "split_thinking",
]
