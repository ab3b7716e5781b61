"""
Opt-in CPU kernels for the linear layers of an AF2 model used for inference.

A model is always built from plain `nn.Linear`s: quantizers (bitsandbytes, fine-grained FP8,
`torch.ao.quantization.quantize_dynamic`), PEFT and tensor-parallel plans check that exact type. For float32 CPU
inference, `enable_fast_cpu_linears(model)` turns them into `FastCPULinear` (same parameters and state-dict names,
same results up to float32 rounding) and `disable_fast_cpu_linears(model)` turns them back.

Nothing enables it by default. `benchmarks/benchmark.py` compares plain `nn.Linear`, `FastCPULinear` and
`torch.compile` with weight freezing on the same weights (item `linears`). On the machine the kernels were written
for (AMD EPYC, AVX-512) they made the HTSAT tower ~25% faster; on the Intel Xeon (AMX) CI machine of the latest
measurement they gave the tower 1.06x and made decoding steps slower (0.93x for 1 sequence, 0.89x for 4), while
`torch.compile(freezing)` gave the tower 1.24x after a 61 s compile. So the default is the standard `nn.Linear`.
"""

import torch
from torch import nn

# oneDNN's matmul, the CPU kernel torch.compile emits for linear layers; exposed as a private op, hence the probe.
_ONEDNN_LINEAR_AVAILABLE = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class FastCPULinear(nn.Linear):
    """
    `nn.Linear` that takes a faster CPU kernel for two kinds of input where PyTorch's default, MKL's sgemm, runs
    well below this hardware's speed:

    - 2 to 16 rows (decoding steps of a batch, short prompts): MKL packs the large weight for every call; the
      same product taken as `weight @ input^T` streams it once. Measured on 2 cores for AF2-0.5B's language
      model: its linears for 4 rows 318 ms -> 199 ms (16 rows 280 -> 239 ms, 1 row unchanged), the 151669 x 896
      head 101 -> 40 ms.
    - more rows in float32 when no gradient is needed (HTSAT tower, audio transformer, K/V projections): oneDNN's
      matmul, 25% faster on the tower's shapes (a window's linears 780 -> 590 ms). It has no backward, so
      training takes the default path; `torch.backends.mkldnn.flags(enabled=False)` turns it off.

    On other devices, for one row and for other dtypes this is `nn.Linear.forward`.
    """

    few_rows = 16

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        rows = input.shape[:-1].numel()
        if input.device.type != "cpu" or rows <= 1:
            return super().forward(input)
        flat = input.reshape(rows, self.in_features)
        if rows <= self.few_rows:
            output = torch.mm(self.weight, flat.t()).t()
            if self.bias is not None:
                output = output + self.bias
        elif (
            _ONEDNN_LINEAR_AVAILABLE
            and torch.backends.mkldnn.enabled
            and input.dtype == self.weight.dtype == torch.float32
            and not (torch.is_grad_enabled() and (input.requires_grad or self.weight.requires_grad))
            and not torch.compiler.is_compiling()
        ):
            weight = self.weight.contiguous()
            output = torch.ops.mkldnn._linear_pointwise(flat.contiguous(), weight, self.bias, "none", [], "")
        else:
            return super().forward(input)
        return output.reshape(*input.shape[:-1], self.out_features)


def enable_fast_cpu_linears(model: nn.Module) -> int:
    """Turns every plain `nn.Linear` under `model` into a `FastCPULinear` (parameters and names unchanged).
    For inference only: quantize, wrap with PEFT or shard the model before, never after. Returns how many."""
    count = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = FastCPULinear
            count += 1
    return count


def disable_fast_cpu_linears(model: nn.Module) -> int:
    """Undoes `enable_fast_cpu_linears`: every `FastCPULinear` under `model` is a plain `nn.Linear` again."""
    count = 0
    for module in model.modules():
        if type(module) is FastCPULinear:
            module.__class__ = nn.Linear
            count += 1
    return count


__all__ = ["FastCPULinear", "disable_fast_cpu_linears", "enable_fast_cpu_linears"]
