"""The memory-bandwidth bound of batch-1 decode: every step reads every weight once, so
tokens/s can be at most bandwidth / weight bytes.

The bandwidth is measured, not looked up: the best of several sums over a float32 array far
larger than the caches, on the bench's threads (a plain streaming read, as the issue asks).
"""

from __future__ import annotations

import time

import torch

ARRAY_BYTES = 1 << 30  # 1 GiB: well past any last-level cache


def read_bandwidth(repeats: int = 5) -> float:
    """Bytes per second one streaming read of a large array achieves (best of `repeats`)."""
    data = torch.ones(ARRAY_BYTES // 4, dtype=torch.float32)
    data.sum()  # fault the pages in before timing
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - start)
    return ARRAY_BYTES / best


def decode_bound(weight_bytes: int, tokens_per_s: float, bandwidth: float) -> dict[str, float]:
    """Batch-1 decode as a fraction of what the bandwidth allows: weight bytes x tokens/s / bandwidth."""
    return {
        "read_gb_s": bandwidth / 1e9,
        "weight_bytes": weight_bytes,
        "bound_tok_s": bandwidth / weight_bytes,
        "fraction_of_bound": weight_bytes * tokens_per_s / bandwidth,
    }
