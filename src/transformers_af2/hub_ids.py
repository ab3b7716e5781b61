"""
Original-layout Audio Flamingo 2 checkpoints wherever transformers takes a model id.

NVIDIA's AF2 repositories (and fine-tunes saved by the original training code) have no `config.json`, only
`safe_ckpt/` and `clap_ckpt/`, so transformers cannot load them. After `import transformers_af2`, the `from_pretrained`
of `AutoConfig`, every `AutoModel...` class, `AutoProcessor`, `AutoTokenizer`, `AutoFeatureExtractor` and the AF2
model classes take such an id: it is converted once into the conversion cache (see `transformers_af2.convert`) and
the call goes on with the converted folder. `pipeline()` needs nothing of its own: it loads through these classes.

An id is taken for an original-layout one, without any network request, when it is

- one of the four released ids (`KNOWN_CHECKPOINTS`),
- a local directory with `safe_ckpt/metadata.json` and no `config.json`,
- a hub repository whose snapshot in the hub cache has `safe_ckpt/metadata.json` and no `config.json`.

Any other id goes to transformers unchanged. Only if transformers then fails on a hub id is the hub asked whether the
repository has `safe_ckpt/metadata.json` (a fine-tune never downloaded before); if so it is converted and the call
retried, otherwise transformers' own error is raised.

`uninstall()` restores transformers' methods; should transformers ever load these repositories itself, this module
and its `install()` call in `transformers_af2/__init__.py` can be deleted with nothing else changing.
"""

from __future__ import annotations

import contextvars
import functools
import os
from pathlib import Path

from transformers import AutoConfig, AutoFeatureExtractor, AutoProcessor, AutoTokenizer
from transformers.models.auto.auto_factory import _BaseAutoModelClass

from .modeling import AudioFlamingo2PreTrainedModel

# The classes whose `from_pretrained` takes a model id. `pipeline()` loads through them; every `AutoModel...` class
# has its own copy of `_BaseAutoModelClass.from_pretrained` (transformers' `auto_class_update`), so each is wrapped.
_WRAPPED_CLASSES = (
    AutoConfig,
    AutoProcessor,
    AutoTokenizer,
    AutoFeatureExtractor,
    AudioFlamingo2PreTrainedModel,  # AudioFlamingo2ForConditionalGeneration.from_pretrained("nvidia/...")
)
_originals: dict[type, object] = {}

# True inside a wrapped call: the nested loads it makes (AutoModel -> AutoConfig, the converter's tokenizer) pass
# straight through, so one user call resolves and, on failure, asks the hub once.
_resolving = contextvars.ContextVar("transformers_af2_resolving", default=False)


def original_layout_location(
    model_id, revision: str | None = None, cache_dir=None, token=None, local_files_only=False, ask_hub: bool = False
) -> Path | None:
    """
    The converted folder of an original-layout `model_id` (converting it on first use), or None when `model_id` is
    anything else. Without `ask_hub`, only local files decide (the released ids, local directories, the hub cache).
    """
    from .convert import ConversionError, cached_conversion

    if not _is_original_layout(model_id, revision, cache_dir, token, ask_hub):
        return None
    try:
        return cached_conversion(
            model_id, revision=revision, hub_cache_dir=cache_dir, token=token, local_files_only=bool(local_files_only)
        )
    except ConversionError as error:
        raise ConversionError(
            f"{model_id} is an AF2 checkpoint in the original layout, but it cannot be converted: {error} "
            f"(convert it yourself with `af2 convert {model_id} OUT --config inference.yaml` and load OUT)."
        ) from error


def _is_original_layout(model_id, revision, cache_dir, token, ask_hub: bool) -> bool:
    from .convert import HUB_ID, KNOWN_CHECKPOINTS

    if not isinstance(model_id, (str, os.PathLike)):
        return False
    path = Path(model_id)
    if path.is_dir():
        return (path / "safe_ckpt" / "metadata.json").is_file() and not (path / "config.json").is_file()
    if not HUB_ID.fullmatch(str(model_id)) or str(model_id).startswith((".", "/", "~")):
        return False
    if str(model_id) in KNOWN_CHECKPOINTS or _original_layout_in_hub_cache(model_id, revision, cache_dir):
        return True
    return ask_hub and _original_layout_on_hub(model_id, revision, token)


def _original_layout_in_hub_cache(repo_id, revision, cache_dir) -> bool:
    from huggingface_hub import try_to_load_from_cache

    metadata = try_to_load_from_cache(str(repo_id), "safe_ckpt/metadata.json", cache_dir=cache_dir, revision=revision)
    config = try_to_load_from_cache(str(repo_id), "config.json", cache_dir=cache_dir, revision=revision)
    return isinstance(metadata, str) and not isinstance(config, str)


def _original_layout_on_hub(repo_id, revision, token) -> bool:
    from huggingface_hub import file_exists, is_offline_mode

    if is_offline_mode():
        return False
    try:
        return file_exists(str(repo_id), "safe_ckpt/metadata.json", revision=revision, token=token) and not (
            file_exists(str(repo_id), "config.json", revision=revision, token=token)
        )
    except Exception:  # unreachable hub, unknown or gated repository: transformers' own error is the better one
        return False


def _wrap(function):
    @functools.wraps(function)
    def from_pretrained(cls, *args, **kwargs):
        if _resolving.get():
            return function(cls, *args, **kwargs)
        if args:
            model_id, rest = args[0], args[1:]
        elif "pretrained_model_name_or_path" in kwargs:
            model_id, rest = kwargs.pop("pretrained_model_name_or_path"), ()
        else:
            return function(cls, *args, **kwargs)
        hub = {k: kwargs.get(k) for k in ("revision", "cache_dir", "token", "local_files_only")}
        outermost = _resolving.set(True)
        try:
            converted = original_layout_location(model_id, **hub)
            if converted is not None:
                return function(cls, str(converted), *rest, **kwargs)
            try:
                return function(cls, model_id, *rest, **kwargs)
            except (OSError, ValueError):
                converted = original_layout_location(model_id, ask_hub=not kwargs.get("local_files_only"), **hub)
                if converted is None:
                    raise
            return function(cls, str(converted), *rest, **kwargs)
        finally:
            _resolving.reset(outermost)

    return classmethod(from_pretrained)


def install() -> None:
    """Wraps the `from_pretrained` of `_WRAPPED_CLASSES` and of every `AutoModel...` class (idempotent)."""
    for owner in (*_WRAPPED_CLASSES, *_auto_model_classes()):
        if owner in _originals:
            continue
        # The function the class resolves today (its own or inherited), called by the wrapper with `cls` bound.
        current = owner.from_pretrained.__func__
        _originals[owner] = owner.__dict__.get("from_pretrained")
        owner.from_pretrained = _wrap(current)


def _auto_model_classes() -> list[type]:
    classes, pending = [], [_BaseAutoModelClass]
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if "from_pretrained" in cls.__dict__:
            classes.append(cls)
    return classes


def uninstall() -> None:
    """Restores transformers' own `from_pretrained` methods."""
    for owner, original in list(_originals.items()):
        if original is None:
            delattr(owner, "from_pretrained")
        else:
            owner.from_pretrained = original
        del _originals[owner]


__all__ = ["install", "original_layout_location", "uninstall"]
