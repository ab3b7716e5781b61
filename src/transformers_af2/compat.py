"""The differences between the transformers releases this package supports, decided once at import.

transformers 5.24 renamed the self-attention cache from `past_key_values` to `cache`: the models' forward argument,
the field of every `ModelOutput` and the key `generate()` keeps in its model kwargs. The language model AF2 is built
on (Qwen2) says which name the installed release uses, so this package follows it instead of pinning one spelling.
When the supported range no longer includes a release before 5.24, `CACHE_KWARG` is simply `"cache"`.

transformers 5.25 turned hub kernels on by default in `from_pretrained` (with the `kernels` package, which it requires,
layers are replaced by code downloaded from the Hugging Face Hub at load). AF2 loads with `LOADING_DEFAULTS` on every
release, so loading a checkpoint fetches and runs no code from elsewhere; `use_kernels=True` still opts in.
"""

import inspect

from transformers.models.qwen2.modeling_qwen2 import Qwen2Model
from transformers.utils import logging

logger = logging.get_logger(__name__)

#: The name of the self-attention cache argument and output field in the installed transformers.
CACHE_KWARG = "cache" if "cache" in inspect.signature(Qwen2Model.forward).parameters else "past_key_values"
_OLD_CACHE_KWARG = "past_key_values"

#: `from_pretrained` keyword arguments AF2's model classes default to (a caller's own value wins).
LOADING_DEFAULTS = {"use_kernels": False}


def pop_cache(kwargs: dict):
    """
    Removes and returns the cache from a forward's keyword arguments, under this release's name. On releases that
    renamed it, the old name `past_key_values` is still accepted (as transformers' own models accept it), with a
    one-time deprecation notice, so code written for earlier releases keeps working.
    """
    cache = kwargs.pop(CACHE_KWARG, None)
    if CACHE_KWARG != _OLD_CACHE_KWARG and _OLD_CACHE_KWARG in kwargs:
        old = kwargs.pop(_OLD_CACHE_KWARG)
        if cache is not None and old is not None:
            raise ValueError(
                f"Pass the cache once, as `{CACHE_KWARG}=`; got both `{CACHE_KWARG}` and `past_key_values`."
            )
        if old is not None:
            logger.warning_once(f"`past_key_values` is named `{CACHE_KWARG}` in this transformers release; use that.")
            cache = old
    return cache


__all__ = ["CACHE_KWARG", "LOADING_DEFAULTS", "pop_cache"]
