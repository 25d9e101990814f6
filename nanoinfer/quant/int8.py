"""Weight-only int8: per-output-channel symmetric quantization and the Linear that runs on it.

Mapping: scale[n] = max_k |w[n, k]| / 127, zero point 0, q = round(w / scale) in [-127, 127],
w ~= q * scale. With a group size G, each run of G weights in a row gets its own scale instead
(GGUF's Q8_0 is this with G = 32): the quantized models' LM head uses it, because a Q8_0
embedding then round-trips exactly.

On CPU the matmul is our C kernel (nanoinfer/kernels) when it could be built and K is a whole
number of groups of 32: the weight in its panel layout (`pack_panels`), activations rounded to
int16 per group of 32 (an error of at most 2^-16 of the group's largest value, far below the
weights' own rounding), integer dot products, float32 results. It beats float32 F.linear on the
dequantized weights at every batch size (`python -m nanoinfer.bench.kernels`), so no float copy is
kept. Else (per-channel only) torch's `_weight_int8pack_mm(x [M, K], q int8 [N, K], scales [N])`,
which wants x and scales in the same dtype (f32, f16 or bf16); elsewhere we dequantize and call
F.linear.

torch's float32 path of that kernel is scalar code on AVX2, far slower than an fp32 nn.Linear
(docs/performance.md, "Kernels"), while its bf16 path is vectorized. So float32 activations
are rounded to bf16 for the kernel and the result cast back, unless `exact_fp32` is set, which
dequantizes to float32 and calls F.linear instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoinfer.kernels import Q8_CHUNK, Q8_COLS, Q8_GROUP, Q8_PAIRS_BYTES, Q8_RECORD, chunk_spans, kernels

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# A zero row would give scale 0 and 0/0 on quantize; any tiny positive scale maps it to q = 0.
_MIN_SCALE = 1e-12


def quantize_int8(weight: torch.Tensor, group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8: (q int8 [N, K], scales float32 [N], or [N, K / group_size] given a group size)."""
    w = weight.detach().float()
    N, K = w.shape
    if group_size is not None and K % group_size:
        raise ValueError(f"in_features {K} is not a multiple of the int8 group size {group_size}")
    groups = w.reshape(N, -1, group_size or K)
    scales = (groups.abs().amax(dim=2) / 127.0).clamp_min(_MIN_SCALE)
    q = torch.round(groups / scales[..., None]).clamp_(-127, 127).to(torch.int8).reshape(N, K)
    return q, (scales if group_size else scales[:, 0])


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q * scale per row (scales [N]) or per group (scales [N, groups]), in `dtype`."""
    N, K = q.shape
    groups = 1 if scales.dim() == 1 else scales.shape[1]
    w = q.to(dtype).reshape(N, groups, K // groups) * scales.to(dtype).reshape(N, groups, 1)
    return w.reshape(N, K).to(dtype)


def pack_panels(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """q int8 [N, K], scales [N] or [N, K/32] -> the C kernel's layout as one uint8 tensor.

    Per panel of 16 output columns and group g of 32 k: 16 rows of 32 bytes, row j holding
    q[16p + c, 32g + 2j + i] at byte 2c + i, then the 16 float scales (a per-channel scale is
    repeated in every group). Panels are chunked by Q8_CHUNK (the last chunk may be short), and
    a chunk stores its panels' records group by group; zero columns pad the last panel.
    """
    n, k = q.shape
    panels, groups = -(-n // Q8_COLS), k // Q8_GROUP
    scales = scales.float().reshape(n, -1).expand(n, groups) if scales.dim() == 1 else scales.float()
    pad = panels * Q8_COLS - n
    q, scales = F.pad(q, (0, 0, 0, pad)), F.pad(scales, (0, 0, 0, pad))
    weight = q.view(panels, Q8_COLS, groups, 16, 2).permute(0, 2, 3, 1, 4).reshape(panels, groups, Q8_PAIRS_BYTES)
    scale_bytes = scales.view(panels, Q8_COLS, groups).transpose(1, 2).contiguous().view(torch.uint8)
    records = torch.cat([weight.view(torch.uint8), scale_bytes], dim=-1)  # [P, G, record]
    return torch.cat(
        [
            records[p0:p1].view(-1, c, groups, Q8_RECORD).transpose(1, 2).reshape(-1)
            for p0, p1, c in chunk_spans(panels, Q8_CHUNK)
        ]
    )


def unpack_panels(packed: torch.Tensor, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of pack_panels: (q int8 [N, K], scales [N, K/32])."""
    panels, groups = -(-n // Q8_COLS), k // Q8_GROUP
    chunks = [
        packed[p0 * groups * Q8_RECORD : p1 * groups * Q8_RECORD].view(-1, groups, c, Q8_RECORD)
        for p0, p1, c in chunk_spans(panels, Q8_CHUNK)
    ]
    records = torch.cat([chunk.transpose(1, 2).reshape(-1, groups, Q8_RECORD) for chunk in chunks])
    q = records[..., :Q8_PAIRS_BYTES].view(torch.int8).reshape(-1, groups, 16, Q8_COLS, 2).permute(0, 3, 1, 2, 4)
    scales = records[..., Q8_PAIRS_BYTES:].contiguous().view(torch.float32).transpose(1, 2)
    return q.reshape(-1, k)[:n], scales.reshape(-1, groups)[:n]


def int8_kernel_supported(device: torch.device, dtype: torch.dtype, in_features: int) -> bool:
    """Whether torch's CPU int8 kernel can run activations of this device and dtype."""
    if device.type != "cpu" or dtype not in _KERNEL_DTYPES:
        return False
    # The bf16 path reads K in vectors of 8: other K gives garbage or a segfault (torch 2.13, AVX2).
    return dtype != torch.bfloat16 or in_features % 8 == 0


class Int8Linear(nn.Module):
    """Drop-in for nn.Linear with int8 weights and per-output-channel (or per-group) scales."""

    # Buffers. Exactly one of panels (our kernel's layout) and q_rows holds the weight.
    scales: torch.Tensor
    bias: torch.Tensor | None
    panels: torch.Tensor | None
    q_rows: torch.Tensor | None

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        self.out_features, self.in_features = q.shape
        # Stored in the model's dtype because the kernel wants scales in the activation dtype;
        # casting per call would add an op to every matmul.
        self.register_buffer("scales", scales.to(dtype).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype).clone())
        # Our kernel's panels hold the weight; the row-major q is kept only for the other paths.
        ours = kernels() is not None and q.device.type == "cpu" and self.in_features % Q8_GROUP == 0
        self.register_buffer("panels", pack_panels(q, scales) if ours else None, persistent=False)
        self.register_buffer("q_rows", None if ours else q.contiguous())
        self.use_kernel = True  # False forces dequantize-then-matmul (tests compare the two paths)
        self.exact_fp32 = False  # True: fp32 activations are not rounded (dequantize and F.linear)
        self._scales_cast: dict[torch.dtype, torch.Tensor] = {}  # scales in other activation dtypes

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int | None = None) -> Int8Linear:
        """Quantize an existing nn.Linear (its dtype becomes the compute dtype)."""
        q, scales = quantize_int8(linear.weight, group_size)
        return cls(q, scales, linear.bias, linear.weight.dtype)

    @property
    def q(self) -> torch.Tensor:
        """The int8 weight [N, K] (read back from the kernel's panels where they hold it)."""
        if self.panels is None:
            assert self.q_rows is not None
            return self.q_rows
        return unpack_panels(self.panels, self.out_features, self.in_features)[0]

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float weight [N, K] this layer multiplies by."""
        return dequantize_int8(self.q, self.scales, dtype or self.scales.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        exact = x.dtype == torch.float32 and self.exact_fp32
        if self.panels is not None and self.use_kernel and not exact and x.device.type == "cpu" and x2.shape[0] > 0:
            bias = None if self.bias is None else self.bias.float()
            ours = kernels()
            assert ours is not None  # panels are packed only where the kernels loaded
            out = ours.q8_matmul(x2.float().contiguous(), self.panels, self.out_features, bias).to(x.dtype)
            return out.reshape(*lead, self.out_features)
        # fp32 goes through the bf16 kernel (fast) unless asked to stay exact (then: dequantize).
        cdtype = torch.bfloat16 if x.dtype == torch.float32 else x.dtype
        kernel = self.use_kernel and self.scales.dim() == 1  # torch's kernel has no group-wise form
        kernel = kernel and not exact
        if kernel and x2.shape[0] > 0 and int8_kernel_supported(x.device, cdtype, self.in_features):
            scales = self.scales
            if scales.dtype != cdtype:  # cast once: fp32 models run the bf16 kernel on every call
                if cdtype not in self._scales_cast:
                    self._scales_cast[cdtype] = self.scales.to(cdtype)
                scales = self._scales_cast[cdtype]
            out = torch._weight_int8pack_mm(x2.to(cdtype).contiguous(), self.q, scales).to(x.dtype)
            if self.bias is not None:
                out = out + self.bias.to(x.dtype)
        else:
            bias = None if self.bias is None else self.bias.to(x.dtype)
            out = F.linear(x2, self.dequantize(x.dtype), bias)
        return out.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
