"""16-bit weight storage with float32 activations: what `--dtype bfloat16` means on CPU.

AVX2 CPUs have no bfloat16 arithmetic: a bf16 matmul widens both operands to float32 anyway, so
rounding the activations (and the residual stream) to bf16 only adds error, several times what
bf16 weights alone cost (docs/performance.md, "Quantization quality"). So, like llama.cpp, we
keep the weights in 16 bits (half the memory and bandwidth) and everything else in float32.

bfloat16 is the top half of a float32, so the C kernel widens each weight exactly with a shift.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoinfer.kernels import kernels

# Above this many rows, widening the whole weight once and calling fp32 GEMM takes over from the
# row-tiled C kernel, which wins on small batches only (docs/performance.md, "bf16 matmul").
KERNEL_MAX_ROWS = 32


class HalfLinear(nn.Module):
    """Drop-in for nn.Linear holding a bfloat16 or float16 weight; computes in the input's dtype."""

    weight: torch.Tensor  # buffers
    bias: torch.Tensor | None

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight.detach().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear, dtype: torch.dtype) -> HalfLinear:
        return cls(linear.weight.detach().to(dtype), linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        ours = kernels() if self.weight.dtype == torch.bfloat16 and x.device.type == "cpu" else None
        if ours is not None and x.dtype == torch.float32 and 0 < x2.shape[0] <= KERNEL_MAX_ROWS:
            out = ours.bf16_matmul(x2.contiguous(), self.weight, self.bias)
        else:
            bias = None if self.bias is None else self.bias.to(x.dtype)
            out = F.linear(x2, self.weight.to(x.dtype), bias)
        return out.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, dtype={self.weight.dtype}"
        )
