"""Small helpers shared by the command line, the converter, the model, the demo and the benchmarks: dtype names, the
sampling defaults, the package's cache folder, finite weights, one-line errors. Importing it does not import torch (the command line reads the
dtype names before it needs torch)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# The dtypes AF2 runs and stores in, by the names the command line and the configs use: name -> `torch` attribute.
DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
}
# The canonical names, for argparse choices.
DTYPE_NAMES = ("float32", "bfloat16", "float16")

# The original demo's sampling settings (inference_HF_pretrained/inference.py): what `--sample` (af2 generate,
# af2 caption) and the demo's "sample" use unless told otherwise.
DEFAULT_TOP_K = 30
DEFAULT_TOP_P = 0.95


def default_cache_dir():
    """Where this package keeps what it computes once per machine: converted checkpoints, the CPU linear kernels and
    the `--fast` settings measured here (`$AF2_CACHE`, else `$HF_HOME/transformers_af2`)."""
    import os
    from pathlib import Path

    from huggingface_hub.constants import HF_HOME

    return Path(os.environ.get("AF2_CACHE", Path(HF_HOME) / "transformers_af2"))


def install_hint(extra: str) -> str:
    """How to install one of the package's extras (`demo`, `serve`, `eval`, ...), as error messages and help say it."""
    return f"pip install 'transformers-af2[{extra}]'"


def lazy_exports(package: str, homes: dict[str, str]):
    """
    `(__getattr__, __dir__)` for a package that re-exports names from its modules (`homes`: name -> module, relative
    to `package`), each module imported when one of its names is first used: so that importing the package for one
    light module (a command's parser) does not import its engines (torch).
    """
    import importlib

    def __getattr__(name: str):
        if name not in homes:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(homes[name], package), name)

    def __dir__():
        return sorted([*vars(importlib.import_module(package)), *homes])

    return __getattr__, __dir__


def one_line(error: BaseException) -> str:
    """An error's message on one line (the command line's and the demo's error text)."""
    return " ".join(str(error).split()) or type(error).__name__


def parse_dtype(name: str | torch.dtype | None, device: torch.device | str | None = None) -> torch.dtype:
    """
    A `torch.dtype` from a name in `DTYPES`, a `torch.dtype` (returned as is), `None` (float32), or `"auto"`:
    bfloat16 on a CUDA `device`, float32 elsewhere.
    """
    import torch

    if isinstance(name, torch.dtype):
        return name
    if name is None:
        return torch.float32
    if name == "auto":
        return torch.bfloat16 if device is not None and torch.device(device).type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not supported; use one of {', '.join(('auto', *DTYPES))}.")
    return getattr(torch, DTYPES[name])


def set_seed(seed: int) -> None:
    """
    Seeds Python's, numpy's and torch's (every device's) random generators, as `transformers.set_seed` does. That
    one lives in `transformers.trainer_utils`, which imports peft and, through it, bitsandbytes: seconds, and their
    import-time notices, in every command that samples.
    """
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


__all__ = [
    "DEFAULT_TOP_K",
    "DEFAULT_TOP_P",
    "DTYPES",
    "DTYPE_NAMES",
    "install_hint",
    "lazy_exports",
    "non_finite_tensors",
    "one_line",
    "parse_dtype",
    "set_seed",
]


def non_finite_tensors(named_tensors) -> list[str]:
    """
    The names of the floating-point tensors of `named_tensors` ((name, tensor) pairs) that hold NaN or infinity; meta
    and empty tensors are skipped. A tensor is finite when its minimum and maximum are (both propagate NaN): one
    reduction pass without the boolean copy of `isfinite(...).all()`, which took ~10x longer (3.4 s instead of 0.35 s
    for af2-0.5b's 4.3 GB of float32 weights). Quantized weights (torchao's tensor subclasses) are judged by their
    floating-point parts (scales, zero points).
    """
    import torch

    bad = []
    # Tied weights (the embedding and the head) appear under both names: scanned once, reported under each.
    verdicts: dict[tuple, bool] = {}
    with torch.no_grad():
        for name, whole in named_tensors:
            for tensor in _plain_parts(whole):
                if not tensor.is_floating_point() or tensor.device.type == "meta" or tensor.numel() == 0:
                    continue
                key = (tensor.device, tensor.data_ptr(), tensor.shape, tensor.stride(), tensor.dtype)
                if key not in verdicts:
                    flat = tensor.reshape(-1)
                    if flat.element_size() == 1:  # float8: reductions are not implemented for it everywhere
                        flat = flat.float()
                    verdicts[key] = bool(torch.isfinite(torch.stack(torch.aminmax(flat))).all())
                if not verdicts[key]:
                    bad.append(name)
                    break
    return bad


def _plain_parts(tensor: torch.Tensor) -> list[torch.Tensor]:
    """A wrapper tensor subclass (a quantized weight) as its inner plain tensors, through PyTorch's
    `__tensor_flatten__` protocol (its own ops, `reshape` included, may not be implemented); a plain tensor as
    itself."""
    import torch

    if type(tensor) in (torch.Tensor, torch.nn.Parameter) or not hasattr(tensor, "__tensor_flatten__"):
        return [tensor]
    names, _ = tensor.__tensor_flatten__()
    return [part for name in names for part in _plain_parts(getattr(tensor, name))]
