"""
`--fast`: the settings measured fastest on a kind of device while keeping the answers of float32 greedy decoding
(token agreement >= 97% on the benchmarks' clips; `benchmarks/README.md`, "Precision, quantization and kernels").

| device | dtype | CPU linear kernels | why |
|---|---|---|---|
| CUDA | bfloat16 | - | the GPU's native precision |
| CPU with native bf16 dot products (`avx512_bf16` or AMX) | bfloat16 | measured on the machine (`"auto"`) | bf16 tower 1.6x (EPYC) to 2.35x (Xeon AMX) faster; 97.5-100% of fp32's tokens on af2-0.5b (on a random af2-3b, 75%: near-tied logits, every decisive position kept) |
| other CPUs | float32 | measured on the machine (`"auto"`) | bf16 is emulated there (slower than float32) |

Weight-only int4/int8 (`--quantization`) are not part of it: on the benchmarks' random-weight models their greedy
answers differ from float32's within the first tokens (their top logits are too close to judge, see the README), so
the >= 97% rule could not be shown; they remain the user's choice.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class FastSettings:
    dtype: str  # a name of utils.DTYPE_NAMES
    linear_kernels: str | None  # a setting of modeling.cpu_linear.choose_linear_kernels (None: not CPU)
    reason: str


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def fast_settings(device, flags: set[str] | None = None) -> FastSettings:
    """The `--fast` settings for `device` (a `torch.device` or string); `flags`: the CPU's (default: this one's)."""
    import torch

    if torch.device(device).type != "cpu":
        return FastSettings("bfloat16", None, "accelerator: bfloat16")
    flags = cpu_flags() if flags is None else flags
    native_bf16 = sorted(flags & {"avx512_bf16", "amx_bf16"})
    if native_bf16:
        return FastSettings("bfloat16", "auto", f"CPU with {' and '.join(native_bf16)}: bfloat16, measured kernels")
    return FastSettings("float32", "auto", "CPU without native bfloat16: float32, measured kernels")


__all__ = ["FastSettings", "cpu_flags", "fast_settings"]
