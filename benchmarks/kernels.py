"""Our C kernels against what they replace, on SmolLM2-135M's shapes (random weights).

    python -m benchmarks.kernels

- int4 matmul vs float32 F.linear at 1-512 rows: why int4 layers keep no float copy for large
  batches (nanoinfer/quant/__init__.py).
- one decode step's 120 int4 matmuls, every weight distinct, so they stream from memory as in a
  real step.
- paged decode attention for 64 sequences x 450 tokens over 30 layers.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from nanoinfer.kernels import kernels
from nanoinfer.quant.int4 import _pack_panels, quantize_int4

SHAPES = ((960, 576), (576, 576), (3072, 576), (576, 1536))  # qkv, o, gate_up, down: (N, K)


def _seconds(fn, repeats: int = 20) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def _int4(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.randn(n, k) * 0.05
    q, scales, zero_points = quantize_int4(w, 32)
    return w, _pack_panels(q, scales, -zero_points * scales)


def matmul_vs_fp32(ours) -> None:
    print("| rows | N x K | int4 kernel GFLOP/s | fp32 F.linear GFLOP/s | ratio |\n|---:|---|---:|---:|---:|")
    for rows in (1, 16, 64, 512):
        for n, k in SHAPES:
            w, packed = _int4(n, k)
            x = torch.randn(rows, k)
            t_int4 = _seconds(lambda: ours.q4_matmul(x, packed, n))
            t_fp32 = _seconds(lambda: F.linear(x, w))
            flops = 2 * rows * n * k / 1e9
            print(f"| {rows} | {n} x {k} | {flops / t_int4:.0f} | {flops / t_fp32:.0f} | {t_fp32 / t_int4:.2f}x |")


def decode_step_matmuls(ours, layers: int = 30) -> None:
    weights = [(n, _int4(n, k)[1]) for _ in range(layers) for n, k in SHAPES]
    xs = {k: torch.randn(1, k) for _, k in SHAPES}
    ks = [k for _ in range(layers) for _, k in SHAPES]
    t = _seconds(lambda: [ours.q4_matmul(xs[k], packed, n) for (n, packed), k in zip(weights, ks)])
    print(f"\n{len(weights)} int4 matmuls of one decode step at batch 1: {t * 1e3:.2f} ms")


def decode_attention(ours, seqs: int = 64, ctx: int = 450, layers: int = 30) -> None:
    heads, kv_heads, d, block = 9, 3, 64, 16
    blocks = -(-ctx // block)
    caches = [torch.randn(2, seqs * blocks * block, kv_heads, d).unbind(0) for _ in range(layers)]
    tables = torch.randperm(seqs * blocks).view(seqs, blocks)  # scattered blocks, as a served pool
    lens = torch.full((seqs,), ctx, dtype=torch.long)
    q = torch.randn(seqs, (heads + 2 * kv_heads) * d)
    t = _seconds(lambda: [ours.paged_attention(q, heads, k, v, tables, lens, block, 0, d**-0.5)
                          for k, v in caches], repeats=3)
    print(f"decode attention, {seqs} sequences x {ctx} tokens x {layers} layers: {t * 1e3:.1f} ms a step")


def main() -> int:
    ours = kernels()
    if ours is None:
        print("the C kernels are not built (no compiler, or NANOINFER_KERNELS=0)")
        return 1
    torch.manual_seed(0)
    matmul_vs_fp32(ours)
    decode_step_matmuls(ours)
    decode_attention(ours)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
