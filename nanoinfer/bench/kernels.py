"""Our C kernels against what they replace, on SmolLM2-135M's shapes (random weights).

    python -m nanoinfer.bench.kernels

- int4 matmul vs float32 F.linear at 1-512 rows: why int4 layers keep no float copy for large
  batches (nanoinfer/quant/__init__.py).
- one decode step's 120 int4 matmuls, every weight distinct, so they stream from memory as in a
  real step.
- paged decode attention for 64 sequences x 450 tokens over 30 layers, float32 and float16 caches.
- paged attention over a prompt's rows vs torch's SDPA (what the prompt path ran before).
- int8 matmul vs float32 F.linear, on the 49k x 576 LM head (group-wise, as the quantized
  models' head) and per-channel on the layers' shapes: why int8 layers and the head keep no
  float copy for large batches either.
- one whole decode step of the built-in SmolLM2 (int4, fused C stack) at 1-9 rows of one
  sequence: what a speculative verify chunk of 1 + k tokens costs the target.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from nanoinfer.kernels import CpuKernels, kernels
from nanoinfer.quant.int4 import _pack_panels, quantize_int4
from nanoinfer.quant.int8 import dequantize_int8, pack_panels, quantize_int8

SHAPES = ((960, 576), (576, 576), (3072, 576), (576, 1536))  # qkv, o, gate_up, down: (N, K)


def _seconds(fn: Callable[[], Any], repeats: int = 20) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def _int4(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.randn(n, k) * 0.05
    q, scales, zero_points = quantize_int4(w, 32)
    return w, _pack_panels(q, scales, -zero_points * scales)


def matmul_vs_fp32(ours: CpuKernels) -> None:
    print("| rows | N x K | int4 kernel GFLOP/s | fp32 F.linear GFLOP/s | ratio |\n|---:|---|---:|---:|---:|")
    for rows in (1, 16, 64, 512):
        for n, k in SHAPES:
            w, packed = _int4(n, k)
            x = torch.randn(rows, k)
            t_int4 = _seconds(partial(ours.q4_matmul, x, packed, n))
            t_fp32 = _seconds(partial(F.linear, x, w))
            flops = 2 * rows * n * k / 1e9
            print(f"| {rows} | {n} x {k} | {flops / t_int4:.0f} | {flops / t_fp32:.0f} | {t_fp32 / t_int4:.2f}x |")


def decode_step_matmuls(ours: CpuKernels, layers: int = 30) -> None:
    weights = [(n, _int4(n, k)[1]) for _ in range(layers) for n, k in SHAPES]
    xs = {k: torch.randn(1, k) for _, k in SHAPES}
    ks = [k for _ in range(layers) for _, k in SHAPES]
    t = _seconds(lambda: [ours.q4_matmul(xs[k], packed, n) for (n, packed), k in zip(weights, ks)])
    print(f"\n{len(weights)} int4 matmuls of one decode step at batch 1: {t * 1e3:.2f} ms")


def _attention_step(
    ours: CpuKernels,
    q: torch.Tensor,
    heads: int,
    caches: list[tuple[torch.Tensor, ...]],
    tables: torch.Tensor,
    lens: torch.Tensor,
    scale: float,
) -> list[torch.Tensor]:
    """One decode step's attention: every layer's cache in turn."""
    return [ours.paged_attention(q, heads, k, v, tables, lens, 0, scale) for k, v in caches]


def decode_attention(ours: CpuKernels, seqs: int = 64, ctx: int = 450, layers: int = 30) -> None:
    """Per KV cache dtype: the whole cache streams from memory every step, so half the bytes pay."""
    # 16-token blocks, as the history in docs/performance.md was timed; the engine's default is
    # 128 ("Block size"), whose longer runs read faster.
    heads, kv_heads, d, block = 9, 3, 64, 16
    blocks = -(-ctx // block)
    tables = torch.randperm(seqs * blocks).view(seqs, blocks)  # scattered blocks, as a served pool
    lens = torch.full((seqs,), ctx, dtype=torch.long)
    q = torch.randn(seqs, (heads + 2 * kv_heads) * d)
    times: dict[torch.dtype, float] = {}
    for dtype in (torch.float32, torch.float16):
        caches = [torch.randn(2, seqs * blocks, kv_heads, block, d).to(dtype).unbind(0) for _ in range(layers)]
        step = partial(_attention_step, ours, q, heads, caches, tables, lens, d**-0.5)
        times[dtype] = _seconds(step, repeats=3)
        del step, caches  # this dtype's caches are freed before the next dtype's are made
    print(
        f"decode attention, {seqs} sequences x {ctx} tokens x {layers} layers, ms a step: "
        f"float32 cache {times[torch.float32] * 1e3:.1f}, float16 cache {times[torch.float16] * 1e3:.1f} "
        f"({times[torch.float32] / times[torch.float16]:.2f}x)"
    )


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: int, scale: float) -> torch.Tensor:
    """4-D with K/V heads repeated: torch's CPU flash kernel, as the torch path runs it."""
    keys, values = (t.transpose(0, 1).repeat_interleave(group, 0)[None] for t in (k, v))
    return F.scaled_dot_product_attention(q, keys, values, is_causal=True, scale=scale)


def prompt_attention(ours: CpuKernels) -> None:
    heads, kv_heads, d, block = 9, 3, 64, 16
    print("\n| prompt tokens | paged_attention ms | SDPA ms | ratio |\n|---:|---:|---:|---:|")
    for n in (128, 320, 512):
        qkv = torch.randn(n, (heads + 2 * kv_heads) * d)
        k, v = torch.randn(2, n, kv_heads, d).unbind(0)
        blocks = -(-n // block)
        # [n, kv_heads, d] -> the cache's [blocks, kv_heads, block, d]
        k_cache, v_cache = (
            F.pad(t, (0, 0, 0, 0, 0, blocks * block - n)).view(blocks, block, kv_heads, d).transpose(1, 2).contiguous()
            for t in (k, v)
        )
        tables, rows, lens = torch.arange(blocks)[None], torch.zeros(n, dtype=torch.long), torch.arange(1, n + 1)
        q = qkv[:, : heads * d].view(n, heads, d).transpose(0, 1)[None]
        t_ours = _seconds(partial(ours.paged_attention, qkv, heads, k_cache, v_cache, tables, lens, 0, d**-0.5, rows))
        t_sdpa = _seconds(partial(_sdpa, q, k, v, heads // kv_heads, d**-0.5))
        print(f"| {n} | {t_ours * 1e3:.2f} | {t_sdpa * 1e3:.2f} | {t_sdpa / t_ours:.2f}x |")


def int8_vs_fp32(ours: CpuKernels, vocab: int = 49152, hidden: int = 576) -> None:
    """The int8 kernel against float32 F.linear on the same (dequantized) weights: the 49k x 576
    head (Q8_0, groups of 32), and per-channel int8 on a layer's shapes."""
    print("\n| rows | N x K | int8 kernel ms | fp32 F.linear ms | ratio |\n|---:|---|---:|---:|---:|")
    shapes = [((vocab, hidden), 32), *((shape, None) for shape in SHAPES)]
    for rows in (1, 4, 16, 64, 512):
        for (n, k), group in shapes:
            if rows == 512 and n == vocab:
                continue  # prompts need the head's last row only
            q, scales = quantize_int8(torch.randn(n, k) * 0.05, group)
            w, packed = dequantize_int8(q, scales), pack_panels(q, scales)
            x = torch.randn(rows, k)
            repeats = 5 if n == vocab else 20
            t_int8 = _seconds(partial(ours.q8_matmul, x, packed, n), repeats)
            t_fp32 = _seconds(partial(F.linear, x, w), repeats)
            print(f"| {rows} | {n} x {k} | {t_int8 * 1e3:.2f} | {t_fp32 * 1e3:.2f} | {t_fp32 / t_int8:.2f}x |")


def verify_rows(model: str = "smollm2-135m-instruct", context: int = 200) -> None:
    """One target step over one sequence's 1 + k verify rows (decode rows of the fused stack)."""
    from nanoinfer import LLM
    from nanoinfer.model.forward_batch import ForwardBatch, SequenceChunk

    engine = LLM(model, max_num_seqs=1, max_model_len=512).engine
    kv = engine.runner.kv_cache
    table = list(range(-(-(context + 16) // kv.block_size)))
    print(f"\n{model}: one decode step of 1 + k rows at context {context} (median of 30)")
    print("| rows | ms |\n|---:|---:|")
    for rows in (1, 2, 3, 5, 9):
        chunk = SequenceChunk(list(range(100, 100 + rows)), context, table, True, rows)
        batch = ForwardBatch.build([chunk], kv.block_size, None, engine.model.device)
        for _ in range(5):
            engine.model(batch, kv)
        times = []
        for _ in range(30):
            start = time.perf_counter()
            engine.model(batch, kv)
            times.append(time.perf_counter() - start)
        print(f"| {rows} | {sorted(times)[len(times) // 2] * 1e3:.2f} |")


def main() -> int:
    ours = kernels()
    if ours is None:
        print("the C kernels are not built (no compiler, or NANOINFER_KERNELS=0)")
        return 1
    torch.manual_seed(0)
    matmul_vs_fp32(ours)
    decode_step_matmuls(ours)
    decode_attention(ours)
    prompt_attention(ours)
    int8_vs_fp32(ours)
    verify_rows()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
