"""Weight-only int4: group-wise asymmetric quantization and the Linear that runs on it.

Our mapping (per group of `group_size` consecutive input features of one output row):
    scale = (max - min) / 15,  zero_point = -min / scale
    q = clamp(round(w / scale + zero_point), 0, 15),  w ~= (q - zero_point) * scale
so every element is within scale / 2 of its original. The zero point is not rounded to an
integer (the kernel stores it as a float offset anyway): then a group that was already 4-bit
with a float minimum, as GGUF's Q4_1 is, requantizes without loss (a rounded zero point cost
SmolLM2 a lot of perplexity: docs/performance.md, "Quantization quality").

torch's CPU kernel (`aten._weight_int4pack_mm_for_cpu`, torch 2.13) dequantizes as
    w = (q - 8) * scale + zero
with `scales_and_zeros` of shape [K / group, N, 2] ([..., 0] = scale, [..., 1] = zero) in the
activation dtype. The two agree with zero = (8 - zero_point) * scale, the form stored here for
both the kernel and the fallback layout. The zero point is folded into that float offset, so it
need not fit in 4 bits: a group of all-positive weights keeps its full 16 levels.

Kernel rules found by experiment (torch 2.13, AVX2): group size in {32, 64, 128, 256},
K % group_size == 0, N % 16 == 0, activations f32/f16/bf16 with scales_and_zeros in the same
dtype. Its float32 path is scalar code, far slower than an fp32 nn.Linear (docs/performance.md,
"Kernels"), so float32 activations are rounded to bf16 for the kernel unless `exact_fp32` is set;
that rounding is far below the int4 weight error.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoinfer.kernels import Q4_BLOCK_BYTES, Q4_CHUNK, Q4_COLS, Q4_GROUP, Q4_RECORD, chunk_spans, kernels

KERNEL_GROUP_SIZES = (32, 64, 128, 256)
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MIN_SCALE = 1e-12  # a constant group has range 0; any positive scale then maps it exactly
_KERNEL_OFFSET = 8  # the kernel's fixed integer offset: w = (q - 8) * scale + zero


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group-wise asymmetric int4: (q uint8 [N, K] in 0..15, scales [N, G], zero_points [N, G]), float32."""
    w = weight.detach().float()
    n, k = w.shape
    groups = -(-k // group_size)
    pad = groups * group_size - k
    if pad:  # repeat the last column so the padding cannot widen the last group's range
        w = torch.cat([w, w[:, -1:].expand(n, pad)], dim=1)
    wg = w.view(n, groups, group_size)
    wmin, wmax = wg.amin(dim=-1), wg.amax(dim=-1)
    scales = ((wmax - wmin) / 15.0).clamp_min(_MIN_SCALE)
    zero_points = -wmin / scales
    q = torch.round((wg - wmin[..., None]) / scales[..., None]).clamp_(0, 15)
    return q.view(n, -1)[:, :k].to(torch.uint8), scales, zero_points


def dequantize_int4(q: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor, group_size: int) -> torch.Tensor:
    """(q - zero_point) * scale, float32 [N, K]: the reference the kernels are checked against."""
    k = q.shape[1]
    s = scales.repeat_interleave(group_size, dim=1)[:, :k]
    z = zero_points.repeat_interleave(group_size, dim=1)[:, :k]
    return (q.float() - z) * s


def to_scales_and_zeros(scales: torch.Tensor, zero_points: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Our (scale, zero_point) [N, G] as torch's [G, N, 2] (scale, zero) with w = (q - 8) * scale + zero."""
    zeros = (_KERNEL_OFFSET - zero_points) * scales
    return torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous().to(dtype)


def int4_kernel_fits(out_features: int, in_features: int, group_size: int) -> bool:
    """Shape rules of torch's CPU int4 pack/mm ops (checked by experiment on torch 2.13)."""
    return group_size in KERNEL_GROUP_SIZES and in_features % group_size == 0 and out_features % 16 == 0


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """[N, K] values 0..15 -> [N, ceil(K/2)] uint8, even k in the low nibble (our portable layout)."""
    if q.shape[1] % 2:
        q = F.pad(q, (0, 1))
    return (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8)


def _unpack_nibbles(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of _pack_nibbles: [N, ceil(K/2)] uint8 -> [N, K] uint8."""
    q = torch.stack([packed & 0xF, packed >> 4], dim=-1)
    return q.view(packed.shape[0], -1)[:, :k]


def _pack_panels(q: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor) -> torch.Tensor:
    """q [N, K] in 0..15, scales/mins [N, K/32] -> the C kernel's layout as one uint8 tensor.

    Per block of 16 output columns and group g: 256 bytes whose byte 4c + i of 64-byte row jj is
    q[16b + c, 32g + 4jj + i] | q[16b + c, 32g + 16 + 4jj + i] << 4, and 16 float scales and mins.
    Blocks are chunked by Q4_CHUNK (the last chunk may be short); each chunk stores, group by
    group, its blocks' weight bytes, then their scales, then their mins (see cpu_kernels.c).
    """
    n, k = q.shape
    blocks, groups = -(-n // Q4_COLS), k // Q4_GROUP
    pad = blocks * Q4_COLS - n  # zero columns complete the last block
    q, scales, mins = (F.pad(t, (0, 0, 0, pad)) for t in (q.to(torch.uint8), scales.float(), mins.float()))
    v = q.view(blocks, Q4_COLS, groups, 2, 4, 4).permute(0, 2, 3, 4, 1, 5)  # b, g, half, jj, c, i
    weight = v[:, :, 0] | (v[:, :, 1] << 4)  # [B, G, 4, Q4_COLS, 4]
    parts = [weight.reshape(blocks, groups, Q4_BLOCK_BYTES)] + [
        t.view(blocks, Q4_COLS, groups).transpose(1, 2).contiguous().view(torch.uint8) for t in (scales, mins)
    ]
    spans = chunk_spans(blocks, Q4_CHUNK)
    return torch.cat([torch.cat([_chunked(t[b0:b1], c) for t in parts], dim=-1).reshape(-1) for b0, b1, c in spans])


def _chunked(t: torch.Tensor, c: int) -> torch.Tensor:
    """[chunks * c, G, X] -> [chunks, G, c * X]: each group's rows of c blocks side by side."""
    _, groups, x = t.shape
    return t.view(-1, c, groups, x).transpose(1, 2).reshape(-1, groups, c * x)


def _unpack_panels(packed: torch.Tensor, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of _pack_panels: (q [N, K] uint8, scales [N, K/32], mins [N, K/32])."""
    blocks, groups = -(-n // Q4_COLS), k // Q4_GROUP
    pieces, at = [], 0
    for b0, b1, c in chunk_spans(blocks, Q4_CHUNK):
        size = (b1 - b0) * groups * Q4_RECORD
        rec = packed[at : at + size].view(-1, groups, c * Q4_RECORD)
        at += size
        w = rec[..., : c * Q4_BLOCK_BYTES].reshape(-1, groups, c, Q4_BLOCK_BYTES)
        sm = rec[..., c * Q4_BLOCK_BYTES :].contiguous().view(torch.float32).view(-1, groups, 2, c, Q4_COLS)
        weights = w.transpose(1, 2).reshape(-1, groups, Q4_BLOCK_BYTES)
        pieces.append((weights, sm.permute(0, 3, 2, 1, 4).reshape(-1, 2, groups, Q4_COLS)))
    w = torch.cat([p[0] for p in pieces])  # [B, G, Q4_BLOCK_BYTES]
    sm = torch.cat([p[1] for p in pieces])  # [B, 2, G, Q4_COLS]
    v = w.view(blocks, groups, 4, Q4_COLS, 4)  # b, g, jj, c, i
    halves = torch.stack([v & 0xF, v >> 4], dim=2)  # b, g, half, jj, c, i
    q = halves.permute(0, 4, 1, 2, 3, 5).reshape(blocks * Q4_COLS, k)[:n]
    scales, mins = (sm[:, j].transpose(1, 2).reshape(-1, groups)[:n] for j in (0, 1))
    return q, scales, mins


def choose_int4_backend(out_features: int, in_features: int, group_size: int, device: torch.device) -> str:
    """'c' (our kernel), 'torch' (aten's int4pack kernel) or 'dequant' (dequantize, then F.linear)."""
    if device.type != "cpu":
        return "dequant"
    if group_size == Q4_GROUP and in_features % Q4_GROUP == 0 and kernels() is not None:
        return "c"
    return "torch" if int4_kernel_fits(out_features, in_features, group_size) else "dequant"


def _check_backend(backend: str, out_features: int, in_features: int, group_size: int, device: torch.device) -> None:
    """A clear error for a backend asked for by name that cannot run this layer."""
    if backend == "dequant":
        return
    if backend not in ("c", "torch"):
        raise ValueError(f"unknown int4 backend {backend!r}; expected 'c', 'torch' or 'dequant'")
    if device.type != "cpu":
        raise ValueError(f"the int4 backend {backend!r} runs on CPU only, not {device.type}")
    if backend == "c" and not (group_size == Q4_GROUP and in_features % Q4_GROUP == 0 and kernels() is not None):
        raise ValueError(
            f"the 'c' int4 backend needs group size {Q4_GROUP}, in_features a multiple of it and "
            f"built kernels (got group {group_size}, in_features {in_features})"
        )
    if backend == "torch" and not int4_kernel_fits(out_features, in_features, group_size):
        raise ValueError(
            f"torch's int4 kernel cannot run a {out_features}x{in_features} weight with group size {group_size}"
        )


class Int4Linear(nn.Module):
    """Drop-in for nn.Linear with group-wise int4 weights; three ways to run it (`backend`).

    - "c": our AVX2 kernel (nanoinfer/kernels): nibbles in its column-panel layout interleaved with
      float32 scale and min per group (w = q * scale + min; see _pack_panels). Activations are
      rounded to int8 per group of 32 inside the kernel, so one instruction does 32 multiply-adds;
      results are float32. Faster than fp32 GEMM at every batch size on AVX2.
    - "torch": `_weight_int4pack_mm_for_cpu` on torch's opaque packed layout, activations in bf16.
    - "dequant": plain nibbles; each call dequantizes, then runs F.linear (any device, any shape).
    """

    packed: torch.Tensor  # buffers; scales_and_zeros only off the "c" backend (its scales are in `packed`)
    scales_and_zeros: torch.Tensor
    bias: torch.Tensor | None

    def __init__(
        self,
        q: torch.Tensor,
        scales: torch.Tensor,
        zero_points: torch.Tensor,
        group_size: int,
        bias: torch.Tensor | None,
        dtype: torch.dtype,
        backend: str | None = None,
    ):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.group_size = group_size
        self.dtype = dtype
        if backend is not None:
            _check_backend(backend, self.out_features, self.in_features, group_size, q.device)
        self.backend = backend or choose_int4_backend(self.out_features, self.in_features, group_size, q.device)
        if self.backend == "c":
            # weight nibbles, scales and mins interleaved in one buffer (see _pack_panels)
            self.register_buffer("packed", _pack_panels(q, scales, -zero_points * scales))
        else:
            if self.backend == "torch":  # the kernel's packing is CPU-specific: quantize where it runs
                packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
            else:
                packed = _pack_nibbles(q)
            self.register_buffer("packed", packed)
            # In the model dtype: torch's kernel wants them in the activation dtype.
            self.register_buffer("scales_and_zeros", to_scales_and_zeros(scales, zero_points, dtype))
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype).clone())
        self.exact_fp32 = False  # True: no activation rounding (dequantize and F.linear in fp32)
        # scales_and_zeros cast to another activation dtype, kept: a per-call cast of the head's
        # [K/32, 49152, 2] table costs a noticeable share of the matmul itself.
        self._sz_cast: dict[torch.dtype, torch.Tensor] = {}

    @property
    def kernel(self) -> bool:
        """Whether a CPU kernel (ours or torch's) runs this layer rather than dequantize-and-matmul."""
        return self.backend != "dequant"

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 32, backend: str | None = None) -> Int4Linear:
        """Quantize an existing nn.Linear (its dtype becomes the compute dtype)."""
        q, scales, zero_points = quantize_int4(linear.weight, group_size)
        return cls(q, scales, zero_points, group_size, linear.bias, linear.weight.dtype, backend)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float weight [N, K] this layer multiplies by."""
        dtype = dtype or self.dtype
        n, k, gs = self.out_features, self.in_features, self.group_size
        if self.backend == "c":
            q, scales, mins = _unpack_panels(self.packed, n, k)
            return (q.view(n, -1, gs).float() * scales[..., None] + mins[..., None]).view(n, k).to(dtype)
        if self.backend == "torch":
            # The packed layout is the kernel's business: read it back through the kernel with x = I.
            eye = torch.eye(self.in_features, dtype=torch.float32, device=self.packed.device)
            sz = self.scales_and_zeros.float()
            w_t = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.packed, self.group_size, sz)
            return w_t.t().to(dtype)
        groups = self.scales_and_zeros.shape[0]
        q = _unpack_nibbles(self.packed, k)
        if groups * gs != k:  # a partial last group: pad so every group has gs columns
            q = F.pad(q, (0, groups * gs - k))
        sz = self.scales_and_zeros.to(dtype).transpose(0, 1)  # [N, G, 2]
        w = (q.view(n, groups, gs).to(dtype) - _KERNEL_OFFSET) * sz[..., :1] + sz[..., 1:]
        return w.view(n, -1)[:, :k]

    def _sz_for(self, dtype: torch.dtype) -> torch.Tensor:
        """scales_and_zeros in the kernel's activation dtype (cast once, then cached)."""
        if self.scales_and_zeros.dtype == dtype:
            return self.scales_and_zeros
        if dtype not in self._sz_cast:
            self._sz_cast[dtype] = self.scales_and_zeros.to(dtype)
        return self._sz_cast[dtype]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "c" and x.dtype == torch.float32 and x.dim() == 2 and not self.exact_fp32:
            # The decode hot path (~120 calls per token): straight to the kernel.
            ours = kernels()
            assert ours is not None  # the "c" backend is chosen only where the kernels loaded
            return ours.q4_matmul(x.contiguous(), self.packed, self.out_features, self.bias)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] == 0:
            return x.new_empty(*lead, self.out_features)
        if self.backend == "dequant" or (self.exact_fp32 and x.dtype == torch.float32):
            bias = None if self.bias is None else self.bias.to(x.dtype)
            out = F.linear(x2, self.dequantize(x.dtype), bias)
        elif self.backend == "c":
            bias = None if self.bias is None else self.bias.float()
            ours = kernels()
            assert ours is not None
            out = ours.q4_matmul(x2.float().contiguous(), self.packed, self.out_features, bias).to(x.dtype)
        else:
            out = self._torch_kernel(x2)
        return out.reshape(*lead, self.out_features)

    def _torch_kernel(self, x2: torch.Tensor) -> torch.Tensor:
        if x2.device.type != "cpu":
            raise RuntimeError("Int4Linear holds CPU-packed int4 weights; quantize on the device it runs on")
        # torch's fp32 path is scalar code: fp32 activations run in bf16 (see the module docstring);
        # the kernel takes f32/f16/bf16 only, anything else runs in the weight's dtype.
        if x2.dtype == torch.float32:
            cdtype = torch.bfloat16
        else:
            cdtype = x2.dtype if x2.dtype in _KERNEL_DTYPES else self.scales_and_zeros.dtype
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x2.to(cdtype).contiguous(), self.packed, self.group_size, self._sz_for(cdtype)
        ).to(x2.dtype)
        return out if self.bias is None else out + self.bias.to(x2.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
            f"bias={self.bias is not None}, backend={self.backend}"
        )
