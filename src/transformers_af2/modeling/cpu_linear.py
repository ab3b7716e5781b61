"""
CPU kernels for the linear layers of an AF2 model used for inference, chosen per machine.

A model is always built from plain `nn.Linear`s: quantizers (bitsandbytes, torchao, fine-grained FP8), PEFT and
tensor-parallel plans check that exact type. Which CPU kernel is fastest depends on the CPU and the shape: on an AMD
EPYC (AVX-512) oneDNN's matmul made the HTSAT tower ~25% faster and `weight @ input^T` a 4-sequence decoding step
~1.6x faster; on an Intel Xeon (AMX) the tower gained 6% and decoding steps were slower (0.93x for 1 sequence, 0.89x
for 4). So the kernels are a choice per shape class (`LinearKernels`), made for the machine:

- `use_linear_kernels(model, kernels)` routes every plain `nn.Linear`'s forward through `cpu_linear(kernels, ...)`
  without changing its class, parameters or state-dict names (same results up to float32 rounding), with
  `route_forward`, which `quantization.use_int8_cpu_kernel` uses too; `routed_forward(layer)` says which product a
  layer takes;
- `choose_linear_kernels(model)` reads `$AF2_LINEAR_KERNELS`: unset or `"default"` keeps `nn.Linear`'s own path;
  `"auto"` times the alternatives with the model's own weights at first use (~1 s) and caches the choice per CPU model,
  PyTorch version, thread count, dtype and layer shapes; an explicit choice overrides. `af2 generate --fast` and
  `loading.load_model_and_processor` apply it.

`FastCPULinear` is the earlier form of the same kernels as a layer class of its own, kept for code that builds it;
`enable_fast_cpu_linears` changes no layer's class (it is `use_linear_kernels(model, FAST_KERNELS)`).
`benchmarks/kernel_choice.py` measures the choice; `benchmarks/benchmark.py` (item `linears`) also compares
`torch.compile` with weight freezing (tower 1.24x on the Xeon, after a 61 s compile).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# oneDNN's matmul, the CPU kernel torch.compile emits for linear layers; exposed as a private op, hence the probe.
_ONEDNN_LINEAR_AVAILABLE = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


@dataclasses.dataclass(frozen=True)
class LinearKernels:
    """
    Which CPU kernel takes a linear layer's product, per class of input shape (one row always takes `nn.Linear`'s
    own path, as do other devices, dtypes a kernel does not take, and anything that needs gradients):

    - `few_rows` (2 to `FEW_ROWS` rows: decoding steps of a batch, short prompts): `"default"` (`F.linear`, MKL's
      sgemm, which packs the weight at every call) or `"weight_major"` (`weight @ input^T`, which streams it once);
    - `many_rows` (more rows, float32, no autograd: the HTSAT tower, the audio transformer, prefill):
      `"default"` or `"onednn"` (oneDNN's matmul, the kernel `torch.compile` emits).
    """

    few_rows: str = "default"
    many_rows: str = "default"

    def __post_init__(self):
        for field, allowed in (("few_rows", ("default", "weight_major")), ("many_rows", ("default", "onednn"))):
            if getattr(self, field) not in allowed:
                raise ValueError(f"linear kernel {field}={getattr(self, field)!r} is not one of {', '.join(allowed)}.")

    @classmethod
    def parse(cls, text: str) -> LinearKernels:
        """`"default"`, `"fast"` (every alternative kernel) or `"few_rows=weight_major,many_rows=default"`."""
        if text == "default":
            return cls()
        if text == "fast":
            return cls(few_rows="weight_major", many_rows="onednn")
        try:
            return cls(**dict(item.split("=", 1) for item in text.split(",") if item))
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"linear kernels {text!r}: write default, fast, or few_rows=default|weight_major,"
                f"many_rows=default|onednn ({error})"
            ) from None

    def __str__(self) -> str:
        return f"few_rows={self.few_rows},many_rows={self.many_rows}"


FEW_ROWS = 16
DEFAULT_KERNELS = LinearKernels()
FAST_KERNELS = LinearKernels(few_rows="weight_major", many_rows="onednn")


def cpu_linear(kernels: LinearKernels, module: nn.Linear, input: torch.Tensor) -> torch.Tensor:
    """`module(input)` (an `nn.Linear`'s product) through the kernel `kernels` names for this input's shape class."""
    rows = input.shape[:-1].numel()
    if input.device.type != "cpu" or rows <= 1:
        return F.linear(input, module.weight, module.bias)
    flat = input.reshape(rows, module.in_features)
    if rows <= FEW_ROWS:
        if kernels.few_rows != "weight_major":
            return F.linear(input, module.weight, module.bias)
        output = torch.mm(module.weight, flat.t()).t()
        if module.bias is not None:
            output = output + module.bias
    elif (
        kernels.many_rows == "onednn"
        and _ONEDNN_LINEAR_AVAILABLE
        and torch.backends.mkldnn.enabled
        and input.dtype == module.weight.dtype == torch.float32
        and not (torch.is_grad_enabled() and (input.requires_grad or module.weight.requires_grad))
        and not torch.compiler.is_compiling()
    ):
        weight = module.weight.contiguous()
        output = torch.ops.mkldnn._linear_pointwise(flat.contiguous(), weight, module.bias, "none", [], "")
    else:
        return F.linear(input, module.weight, module.bias)
    return output.reshape(*input.shape[:-1], module.out_features)


class FastCPULinear(nn.Linear):
    """
    `nn.Linear` that takes a faster CPU kernel for two kinds of input where PyTorch's default, MKL's sgemm, runs
    well below this hardware's speed (`FAST_KERNELS`; prefer `use_linear_kernels`, which keeps the class):

    - 2 to 16 rows (decoding steps of a batch, short prompts): MKL packs the large weight for every call; the
      same product taken as `weight @ input^T` streams it once. Measured on 2 cores for AF2-0.5B's language
      model: its linears for 4 rows 318 ms -> 199 ms (16 rows 280 -> 239 ms, 1 row unchanged), the 151669 x 896
      head 101 -> 40 ms.
    - more rows in float32 when no gradient is needed (HTSAT tower, audio transformer, K/V projections): oneDNN's
      matmul, 25% faster on the tower's shapes (a window's linears 780 -> 590 ms). It has no backward, so
      training takes the default path; `torch.backends.mkldnn.flags(enabled=False)` turns it off.

    On other devices, for one row and for other dtypes this is `nn.Linear.forward`.
    """

    few_rows = FEW_ROWS

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return cpu_linear(FAST_KERNELS, self, input)


def route_forward(module: nn.Linear, product, *leading_args) -> None:
    """
    Makes `module(input)` return `product(*leading_args, module, input)`, for this instance only: the routed forward is
    an instance attribute that shadows `nn.Linear.forward`, so the layer keeps its class, parameters and state-dict
    names, which quantizers, PEFT and tensor-parallel plans check. `product=None` restores `nn.Linear.forward`.

    Every per-layer kernel choice goes through here (`use_linear_kernels` for plain weights,
    `quantization.use_int8_cpu_kernel` for torchao's int8 ones), and `routed_forward` reads it back.
    """
    module.__dict__.pop("forward", None)
    if product is not None:
        module.forward = functools.partial(product, *leading_args, module)


def routed_forward(module: nn.Module) -> functools.partial | None:
    """The forward `route_forward` gave `module` (`.func` is the product, `.args` its leading arguments and the
    layer), or None when the layer takes its class's own forward."""
    routed = module.__dict__.get("forward")
    return routed if isinstance(routed, functools.partial) else None


def use_linear_kernels(model: nn.Module, kernels: LinearKernels) -> int:
    """
    Routes the forward of every plain `nn.Linear` under `model` (unquantized: its weight a plain `Parameter`)
    through `cpu_linear(kernels, ...)`, keeping its class (`type(m) is nn.Linear` still holds for quantizers, PEFT
    and tensor-parallel plans) and its parameters; `DEFAULT_KERNELS` restores `nn.Linear.forward`. For inference:
    quantize or wrap with PEFT before. Returns how many layers it routed.
    """
    count = 0
    for module in model.modules():
        if type(module) is not nn.Linear or type(module.weight) is not nn.Parameter:
            continue
        if kernels == DEFAULT_KERNELS:
            route_forward(module, None)
        else:
            route_forward(module, cpu_linear, kernels)
            count += 1
    return count


def linear_kernels_of(module: nn.Linear) -> LinearKernels:
    """The kernels `use_linear_kernels` routed `module` through (`DEFAULT_KERNELS` if none)."""
    routed = routed_forward(module)
    return routed.args[0] if routed is not None and routed.func is cpu_linear else DEFAULT_KERNELS


KERNELS_ENV = "AF2_LINEAR_KERNELS"
# An alternative kernel must beat the default by this much to be chosen: one measurement on a shared machine is
# noisy, and a choice that flips between runs would change results in the last float bits from run to run.
_MARGIN = 0.95


def _shape_groups(modules) -> dict[tuple, list[nn.Linear]]:
    groups: dict[tuple, list[nn.Linear]] = {}
    for module in modules:
        if type(module) is nn.Linear and type(module.weight) is nn.Parameter:
            groups.setdefault((module.out_features, module.in_features, module.bias is not None), []).append(module)
    return groups


def _estimate(groups, rows: int, candidates: dict[str, LinearKernels], repeats: int) -> dict[str, float]:
    """Seconds for one product of `rows` rows through every layer of `groups`, per candidate: each distinct weight
    shape timed once per repeat (candidates alternating), its median times the number of layers of that shape. For
    compute-bound products, where a weight already in cache changes little."""
    totals = dict.fromkeys(candidates, 0.0)
    with torch.inference_mode():
        for layers in groups.values():
            module = layers[0]
            x = torch.randn(rows, module.in_features, dtype=module.weight.dtype)
            runs = {name: [] for name in candidates}
            for repeat in range(repeats + 1):
                for name, kernels in candidates.items():
                    start = time.perf_counter()
                    cpu_linear(kernels, module, x)
                    if repeat:  # the first round warms up
                        runs[name].append(time.perf_counter() - start)
            for name in candidates:
                totals[name] += statistics.median(runs[name]) * len(layers)
    return totals


def _time_passes(layers, rows: int, candidates: dict[str, LinearKernels], repeats: int) -> dict[str, float]:
    """Seconds for one product of `rows` rows through each of `layers` in turn, as a decoding step reads them: every
    weight once, from memory rather than cache (a weight timed repeatedly stays in cache and flatters the kernel
    that reads it twice). Median of `repeats` passes per candidate, candidates alternating, after one warm-up pass."""
    inputs = {}
    for module in layers:
        inputs.setdefault(module.in_features, torch.randn(rows, module.in_features, dtype=module.weight.dtype))
    runs = {name: [] for name in candidates}
    with torch.inference_mode():
        for repeat in range(repeats + 1):
            for name, kernels in candidates.items():
                start = time.perf_counter()
                for module in layers:
                    cpu_linear(kernels, module, inputs[module.in_features])
                if repeat:
                    runs[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in runs.items()}


def measure_linear_kernels(model, repeats: int = 3) -> tuple[LinearKernels, dict]:
    """
    Times, on this machine and with `model`'s own weights, each shape class's kernels: `few_rows` as passes of 4 rows
    (a batch's decoding step) through all the language model's linears and the head, `many_rows` on each distinct
    shape of the audio tower's linears with 256 rows (float32 only: oneDNN's path takes nothing else). Returns the
    faster choice (an alternative only when it is at least 5% faster) and the seconds per candidate. For af2-0.5b in
    float32 it took 32 s on one core of a heavily loaded 2-core VM; it runs once per machine (the choice is cached).
    """
    inner = model.model
    text_layers = [
        m for m in [*inner.language_model.modules(), model.lm_head]
        if type(m) is nn.Linear and type(m.weight) is nn.Parameter
    ]  # fmt: skip
    few = _time_passes(text_layers, 4, {"default": DEFAULT_KERNELS, "weight_major": FAST_KERNELS}, repeats)
    timings = {"few_rows_4": few}
    many_rows = "default"
    if next(inner.audio_tower.parameters()).dtype == torch.float32 and _ONEDNN_LINEAR_AVAILABLE:
        candidates = {"default": DEFAULT_KERNELS, "onednn": LinearKernels(many_rows="onednn")}
        many = _estimate(_shape_groups(inner.audio_tower.modules()), 256, candidates, repeats)
        timings["many_rows_256"] = many
        many_rows = "onednn" if many["onednn"] < _MARGIN * many["default"] else "default"
    few_rows = "weight_major" if few["weight_major"] < _MARGIN * few["default"] else "default"
    return LinearKernels(few_rows=few_rows, many_rows=many_rows), timings


def cpu_model_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo; else what `platform` knows)."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def choose_linear_kernels(model, setting: str | None = None, cache_dir: str | os.PathLike | None = None):
    """
    The CPU linear kernels for `model` on this machine. `setting` (default: the `AF2_LINEAR_KERNELS` environment
    variable, else `"default"`): `"default"` (`nn.Linear`'s own path), `"fast"`, an explicit
    `"few_rows=...,many_rows=..."` (see `LinearKernels`), or `"auto"`: measured by `measure_linear_kernels` at the
    first use and cached per CPU model, PyTorch version, thread count, dtype and layer shapes in
    `<cache_dir>/linear-kernels.json` (default: the conversion cache, `$AF2_CACHE` or `$HF_HOME/transformers_af2`);
    `"auto:remeasure"` measures again and replaces the cached choice.
    """
    setting = setting or os.environ.get(KERNELS_ENV) or "default"
    if not setting.startswith("auto"):
        return LinearKernels.parse(setting)
    if setting not in ("auto", "auto:remeasure"):
        raise ValueError(f"{KERNELS_ENV}={setting!r}: write auto, auto:remeasure, default, fast or few_rows=...")
    if cache_dir is None:
        from ..utils import default_cache_dir

        cache_dir = default_cache_dir()
    path = Path(cache_dir) / "linear-kernels.json"
    shapes = sorted({(m.out_features, m.in_features) for m in model.modules() if type(m) is nn.Linear})
    dtype = model.dtype
    key = "|".join(
        [cpu_model_name(), f"torch {torch.__version__}", f"{torch.get_num_threads()} threads", str(dtype),
         hashlib.sha256(repr(shapes).encode()).hexdigest()[:16]]
    )  # fmt: skip
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    if setting == "auto" and key in cached:
        return LinearKernels.parse(cached[key]["kernels"])
    kernels, timings = measure_linear_kernels(model)
    cached[key] = {"kernels": str(kernels), "seconds": timings, "measured": time.strftime("%Y-%m-%dT%H:%M:%S")}
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_suffix(f".{os.getpid()}.tmp")
    scratch.write_text(json.dumps(cached, indent=1))
    os.replace(scratch, path)  # atomic: concurrent first uses each write a whole file
    return kernels


def enable_fast_cpu_linears(model: nn.Module) -> int:
    """Routes every plain `nn.Linear` under `model` through the kernels `FastCPULinear` takes (`FAST_KERNELS`), with
    `use_linear_kernels`: the layers keep their class. For inference only: quantize, wrap with PEFT or shard the
    model before, never after. Returns how many layers it routed."""
    return use_linear_kernels(model, FAST_KERNELS)


def disable_fast_cpu_linears(model: nn.Module) -> int:
    """Undoes `enable_fast_cpu_linears` (every layer under `model` takes `nn.Linear`'s own path again); returns how
    many layers had been routed through `FAST_KERNELS`."""
    routed = sum(1 for m in model.modules() if type(m) is nn.Linear and linear_kernels_of(m) == FAST_KERNELS)
    use_linear_kernels(model, DEFAULT_KERNELS)
    return routed


__all__ = [
    "DEFAULT_KERNELS",
    "FAST_KERNELS",
    "FastCPULinear",
    "LinearKernels",
    "choose_linear_kernels",
    "cpu_linear",
    "cpu_model_name",
    "disable_fast_cpu_linears",
    "enable_fast_cpu_linears",
    "linear_kernels_of",
    "measure_linear_kernels",
    "route_forward",
    "routed_forward",
    "use_linear_kernels",
]
