"""
Weight-only quantized AF2 through transformers' own quantizers: one name per scheme, the audio side kept unquantized.

`quantization_config(name)` gives the transformers config for `AudioFlamingo2ForConditionalGeneration.from_pretrained(
..., quantization_config=...)`; every command that loads a model takes the name as `--quantization`
(`commands.options.add_speed_arguments`, `loading.load_model_and_processor`).

| name | library | weights | kernel on CPU |
|---|---|---|---|
| `int8` | torchao `Int8WeightOnlyConfig` (per output channel) | 1 byte | bfloat16 decoding steps: `aten._weight_int8pack_mm` (`use_int8_cpu_kernel`); else torchao's, which converts the weight per call |
| `int4` | torchao: on CPU its CPU layout (`PrototypeInt4WeightOnlyConfig`), on GPU `Int4WeightOnlyConfig` (tinygemm layout); groups of `group_size` | 0.5 byte | `aten._weight_int4pack_mm_for_cpu` |
| `bnb-8bit` | bitsandbytes LLM.int8 | 1 byte | bitsandbytes' CPU backend |
| `bnb-4bit` | bitsandbytes NF4, compute in the model's dtype | 0.5 byte | bitsandbytes' CPU backend |

What stays unquantized, and why (`UNQUANTIZED_MODULES`): the HTSAT tower and the audio transformer (a few hundred
GEMMs of many rows per 10 s window, compute-bound: weight-only quantization saves no time there and costs accuracy),
the cross-attention's `kv_proj` (runs once per `generate`, over the audio tokens) and, by transformers' default, the
head tied to the embedding. What is quantized is what every decoding step reads: the language model's linears and the
gated cross-attention's q/o projections and feed-forward.

A model loaded with `int8`, `bnb-8bit` or `bnb-4bit` saves quantized (`save_pretrained`) and reloads quantized
without a `quantization_config` (transformers flattens torchao's tensor subclasses into safetensors). torchao's CPU
int4 layout has no serialization: `save_pretrained` raises, so `int4` quantizes at every load (`SAVE_SUPPORTED`).
"""

from __future__ import annotations

import importlib.util
import logging
import sys

QUANTIZATION_NAMES = ("int8", "int4", "bnb-8bit", "bnb-4bit")

# Module name patterns in transformers' `modules_to_not_convert` syntax (a prefix or regex up to a module boundary, or
# a suffix; torchao's quantizer matches parameter names, so a bare suffix like "kv_proj" would miss "...kv_proj.weight").
UNQUANTIZED_MODULES = ("model.audio_tower", "model.audio_transformer", r".*\.kv_proj", "lm_head")

# Schemes whose quantized weights `save_pretrained` writes and `from_pretrained` reads back (measured in
# tests/test_quantization.py).
SAVE_SUPPORTED = ("int8", "bnb-8bit", "bnb-4bit")

_LIBRARY = {"int8": "torchao", "int4": "torchao", "bnb-8bit": "bitsandbytes", "bnb-4bit": "bitsandbytes"}


class _OncePerMessage(logging.Filter):
    """Lets each distinct message through once."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


def quiet_repeated_bitsandbytes_notices() -> None:
    """
    bitsandbytes' 8-bit matmul computes in float16 by design and says "inputs will be cast from torch.float32 to
    float16" at every call of every 8-bit layer: thousands of identical lines in a short run or a caption job. The
    first says it all: each distinct message of that logger passes once (its other messages are untouched).
    Installed once per process; used by every command that loads a bitsandbytes model and by the trainer.
    """
    cast_logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _OncePerMessage) for f in cast_logger.filters):
        cast_logger.addFilter(_OncePerMessage())


# torchao's Linux wheels ship CUDA-only extensions (MX fp8 and CUTLASS sm90a kernels). On a CPU-only PyTorch each one
# fails to load when torchao is imported -- which transformers does for every model once torchao is installed -- and
# torchao logs "Failed to load <library>: ..." at warning level: expected there, and nothing a user can act on.
TORCHAO_CUDA_ONLY_EXTENSIONS = ("_C_mxfp8", "_C_cutlass_90a")


class _ExpectedTorchaoExtensionFailures(logging.Filter):
    """Drops torchao's "Failed to load" warning for its CUDA-only extensions when PyTorch has no CUDA (or ROCm);
    every other record passes: another extension's failure, any failure on a GPU build of PyTorch."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.startswith("Failed to load "):
            return True
        library = message[len("Failed to load ") :].split(": ", 1)[0]
        if library.rsplit("/", 1)[-1].split(".", 1)[0] not in TORCHAO_CUDA_ONLY_EXTENSIONS:
            return True
        import torch  # imported by torchao before it loads its extensions

        return torch.version.cuda is not None or torch.version.hip is not None


class _TorchaoEnumRegistrationNotices(logging.Filter):
    """Drops torch's deprecation notice "<enum ...> is an Enum subclass and is now natively supported by
    torch.compile" when the enum is torchao's (torchao registers its enums as pytree constants at import; torch >= 2.13
    logs one warning per enum, on every import). The same notice about any other package's enum passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        subject = record.args[0] if isinstance(record.args, tuple) and record.args else None
        is_enum_notice = isinstance(subject, type) and "is an Enum subclass" in str(record.msg)
        return not (is_enum_notice and subject.__module__.split(".", 1)[0] == "torchao")


def quiet_expected_torchao_extension_failures() -> None:
    """Installs `_ExpectedTorchaoExtensionFailures` on torchao's logger and `_TorchaoEnumRegistrationNotices` on torch's
    pytree logger (once per process). Called when this module is imported, which the package does before it imports
    transformers (and so, transitively, torchao)."""
    for logger_name, quiet in (
        ("torchao", _ExpectedTorchaoExtensionFailures),
        ("torch.utils._pytree", _TorchaoEnumRegistrationNotices),
    ):
        logger = logging.getLogger(logger_name)
        if not any(isinstance(f, quiet) for f in logger.filters):
            logger.addFilter(quiet())


quiet_expected_torchao_extension_failures()


class QuantizationUnavailableError(RuntimeError):
    """The requested `--quantization` cannot run here (library missing, no kernel for this device)."""


def _require(name: str) -> None:
    library = _LIBRARY[name]
    if importlib.util.find_spec(library) is None:
        raise QuantizationUnavailableError(
            f"--quantization {name} needs {library}, which is not installed: pip install 'transformers-af2[quantization]'."
        )


def int4_cpu_kernel_available() -> bool:
    """Whether this PyTorch has the CPU int4 weight-only matmul that torchao's CPU layout calls."""
    import torch

    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


# torchao's int8 weight-only product in eager mode converts the whole int8 weight to the activations' dtype at every call
# and multiplies that copy: a decoding step writes and reads each weight again at 2-4 bytes per value. PyTorch's own
# CPU kernel `aten._weight_int8pack_mm` reads the int8 weight once. Measured on a 2-core AMD EPYC (bfloat16
# activations; af2-3b's 11008 x 2048 and 8192 x 2048 matrices): 12-24x faster for 1 row, 3x for 16, even at 64 and
# 2x slower at 256 rows. With float32 or float16 activations its kernel is faster for 1-2 rows only, and then still
# slower than unquantized float32. Hence: bfloat16 activations and up to `INT8_KERNEL_MAX_ROWS` rows (decoding steps,
# short prompts) take it; everything else stays on torchao's path (`benchmarks/README.md`, "int8 on CPU").
INT8_KERNEL_MAX_ROWS = 16
# The kernel reads the input and weight rows with aligned vector loads (x86: 16 bfloat16 values / 16 int8 values at a
# time, on 32- and 16-byte boundaries) and checks neither: a row that does not start on such a boundary crashes the
# process (segmentation fault, torch 2.13). Every row does when the tensor starts on a 64-byte boundary (PyTorch's CPU
# allocator's) and the width is a multiple of 16: inputs that do not start there are copied (at most 16 rows), int8
# weights once when the layer is routed (a reloaded checkpoint's are mapped from the file at any offset), and layers
# whose width is not a multiple of `INT8_KERNEL_WIDTH_MULTIPLE` keep torchao's path.
INT8_KERNEL_WIDTH_MULTIPLE = 64
INT8_KERNEL_ALIGNMENT = 64


def _int8_tensor_class():
    """torchao's `Int8Tensor` if torchao has been imported (transformers imports it for a torchao quantized model),
    else None: nothing to route, and no import of torchao for that."""
    torchao = sys.modules.get("torchao.quantization")
    return getattr(torchao, "Int8Tensor", None)


def _aligned(tensor) -> bool:
    return tensor.data_ptr() % INT8_KERNEL_ALIGNMENT == 0


def _takes_int8_kernel(module) -> bool:
    """Whether `module` is a plain `nn.Linear` whose weight is torchao's int8 weight-only, per-output-row `Int8Tensor`
    of a width the kernel takes."""
    int8_tensor = _int8_tensor_class()
    if int8_tensor is None:
        return False
    from torch import nn

    weight = getattr(module, "weight", None)
    return (
        type(module) is nn.Linear
        and isinstance(weight, int8_tensor)
        and weight.qdata.dim() == 2
        and weight.qdata.is_contiguous()
        and list(weight.block_size) == [1, module.in_features]
        and weight.scale.numel() == module.out_features
        and module.in_features % INT8_KERNEL_WIDTH_MULTIPLE == 0
        # Weight-only and symmetric: no activation quantization or pre-scaling, zero points absent or all zero (read
        # once here; weights offloaded to the meta device have no values to read and keep torchao's path).
        and all(getattr(weight, name, None) is None for name in ("act_quant_kwargs", "act_pre_scale"))
        and weight.qdata.device.type != "meta"
        and (weight.zero_point is None or not bool(weight.zero_point.any()))
    )


def int8_weight_only_product(module, input):
    """
    `module(input)` for an `nn.Linear` whose weight is torchao's int8 weight-only tensor (`_takes_int8_kernel`): on CPU,
    1 to `INT8_KERNEL_MAX_ROWS` rows of bfloat16 activations without autograd take `aten._weight_int8pack_mm`
    (float32 accumulation, the row scales applied once: within bfloat16 rounding of torchao's result, which rounds the
    product before scaling); anything else takes torchao's own path. The output has the input's dtype, as torchao's.

    Under reentrant activation checkpointing (`use_reentrant=True`) the forward runs without autograd and takes the
    kernel while the recomputation takes torchao's path: the two differ by bfloat16 rounding.
    """
    import torch
    import torch.nn.functional as F

    weight = module.weight
    rows = input.shape[:-1].numel()
    if (
        input.device.type == "cpu"
        and input.dtype == torch.bfloat16
        and 1 <= rows <= INT8_KERNEL_MAX_ROWS
        and not (torch.is_grad_enabled() and input.requires_grad)
        and not torch.compiler.is_compiling()  # inductor rewrites torchao's pattern into this kernel by itself
        and isinstance(weight, _int8_tensor_class() or ())  # still the weight that was routed
        and _aligned(weight.qdata)
    ):
        flat = input.reshape(rows, module.in_features).contiguous()
        if not _aligned(flat):  # a view into a larger tensor, e.g. a slice along the features
            flat = flat.clone()
        output = torch.ops.aten._weight_int8pack_mm(flat, weight.qdata, weight.scale.reshape(-1).to(input.dtype))
        if module.bias is not None:
            output.add_(module.bias)  # in the input's dtype, as torchao's `y += bias`
        return output.reshape(*input.shape[:-1], module.out_features)
    return F.linear(input, weight, module.bias)


def use_int8_cpu_kernel(model) -> int:
    """
    Routes the forward of every layer of `model` that holds torchao int8 weight-only weights (`--quantization int8`,
    `quantization_config("int8")`, or a saved int8 checkpoint) through `int8_weight_only_product`, per instance: the
    layers keep their class, weights and state-dict names (`modeling.cpu_linear.route_forward`, which also routes the
    plain layers' kernels). `AudioFlamingo2ForConditionalGeneration.from_pretrained` calls it; call it after
    quantizing a model yourself (`torchao.quantize_`). Returns how many layers it routed.
    """
    from .modeling.cpu_linear import route_forward

    count = 0
    for module in model.modules():
        if _takes_int8_kernel(module):
            weight = module.weight
            if not _aligned(weight.qdata):
                weight.qdata = weight.qdata.clone()  # same values, in memory from PyTorch's aligned allocator
            route_forward(module, int8_weight_only_product)
            count += 1
    return count


def quantization_config(name: str, device=None, dtype=None, group_size: int = 128):
    """
    The transformers quantization config of scheme `name` (one of `QUANTIZATION_NAMES`) for a model that will run on
    `device` (a `torch.device` or string; None is CPU) in `dtype` (the compute dtype of the bitsandbytes 4-bit
    layers; None keeps the model's). `group_size`: weights per scale of the int4 schemes (torchao's default 128;
    a layer whose input width it does not divide stays unquantized).

    Raises `ValueError` for an unknown name and `QuantizationUnavailableError` when the library or the kernel is
    missing, each naming the option.
    """
    if name not in QUANTIZATION_NAMES:
        raise ValueError(f"--quantization {name!r} is not supported; use one of {', '.join(QUANTIZATION_NAMES)}.")
    _require(name)
    import torch

    device_type = torch.device(device).type if device is not None else "cpu"
    skip = list(UNQUANTIZED_MODULES)
    if name.startswith("bnb-"):
        from transformers import BitsAndBytesConfig

        quiet_repeated_bitsandbytes_notices()

        if name == "bnb-8bit":
            return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=dtype or torch.float32,
            llm_int8_skip_modules=skip,
        )

    from transformers import TorchAoConfig

    if name == "int8":
        from torchao.quantization import Int8WeightOnlyConfig

        if device_type == "cpu" and dtype != torch.bfloat16:
            logging.getLogger(__name__).warning(
                "--quantization int8 on CPU without --dtype bfloat16 saves memory, not time: torchao converts each "
                "int8 weight at every call, so for weights larger than the CPU's cache decoding is slower than "
                "float32 (benchmarks/README.md). With --dtype bfloat16, decoding steps take PyTorch's int8 kernel, "
                "which reads each weight once."
            )
        return TorchAoConfig(Int8WeightOnlyConfig(), modules_to_not_convert=skip)
    if device_type == "cpu":
        if not int4_cpu_kernel_available():
            raise QuantizationUnavailableError(
                f"--quantization int4: this PyTorch ({torch.__version__}) has no CPU int4 matmul "
                "(aten._weight_int4pack_mm_for_cpu); use --quantization int8 or bnb-4bit on this machine."
            )
        try:
            from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
        except ImportError:  # torchao 0.17 has the CPU layout under another name, and older ones not at all
            import torchao

            raise QuantizationUnavailableError(
                f"--quantization int4 on CPU needs torchao >= 0.18 (installed: {torchao.__version__}): "
                "pip install -U 'torchao>=0.18', or use --quantization int8 or bnb-4bit."
            ) from None

        return TorchAoConfig(PrototypeInt4WeightOnlyConfig(group_size=group_size), modules_to_not_convert=skip)
    from torchao.quantization import Int4WeightOnlyConfig

    # tinygemm's layout (bfloat16 activations): torchao's plain int4 format needs the separate `mslk` package.
    config = Int4WeightOnlyConfig(group_size=group_size, int4_packing_format="tile_packed_to_4d")
    return TorchAoConfig(config, modules_to_not_convert=skip)


__all__ = [
    "QUANTIZATION_NAMES",
    "SAVE_SUPPORTED",
    "UNQUANTIZED_MODULES",
    "QuantizationUnavailableError",
    "int4_cpu_kernel_available",
    "int8_weight_only_product",
    "quantization_config",
    "quiet_expected_torchao_extension_failures",
    "quiet_repeated_bitsandbytes_notices",
    "use_int8_cpu_kernel",
]
