"""Paged KV cache: sizing helpers, a reference-counted block allocator, and the KV tensors.

The KV pool holds one *slot* per cached token, grouped into fixed-size *blocks* of
``block_size`` slots: ``slot = block * block_size + offset`` (how a block lies in memory is
``PagedKVCache``'s business). Blocks are the unit of allocation and of sharing (the radix prefix
cache shares whole blocks between requests), so every block carries a reference count (see
``BlockAllocator``).
"""

from __future__ import annotations

import heapq
import re
from decimal import Decimal, InvalidOperation

import torch

from nanoinfer.config import ModelConfig
from nanoinfer.errors import NanoInferError


def kv_bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes one token occupies in the KV cache: K and V, in every layer, for every KV head."""
    element_size = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_layers * config.num_kv_heads * config.head_dim * element_size


def kv_cache_bytes(config: ModelConfig, dtype: torch.dtype, num_tokens: int) -> int:
    """Bytes a KV cache holding ``num_tokens`` tokens occupies."""
    return kv_bytes_per_token(config, dtype) * num_tokens


# Decimal units are powers of 1000, binary ones powers of 1024. The bare letters K/M/G/T are
# binary, as in `docker --memory 2g`, because that is what people typing them usually mean.
_MEMORY_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "k": 2**10,
    "m": 2**20,
    "g": 2**30,
    "t": 2**40,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_MEMORY_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*$")


def parse_memory(value: str | int) -> int:
    """Parse a memory size such as ``"2GiB"``, ``"512MiB"``, ``"1.5GB"`` or ``"1000000"`` to bytes.

    Units are case-insensitive: B, KB/MB/GB/TB (powers of 1000), KiB/MiB/GiB/TiB and the bare
    K/M/G/T (powers of 1024). Fractions of a byte are rounded down. Raises ValueError, naming
    the accepted forms, on anything else (negative numbers, unknown units, junk).
    """
    if isinstance(value, bool):  # bool is an int subclass; True bytes is surely a mistake
        raise ValueError(f"invalid memory size {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"memory size must not be negative, got {value}")
        return value
    match = _MEMORY_RE.match(value) if isinstance(value, str) else None
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _MEMORY_UNITS:
        raise ValueError(
            f"invalid memory size {value!r}: expected a number with an optional unit "
            "(B, KB, MB, GB, TB, KiB, MiB, GiB, TiB, K, M, G, T), e.g. '2GiB', '1.5GB', '1000000'"
        )
    try:
        number = Decimal(match.group(1))  # Decimal: '0.1GiB' must not suffer float rounding
    except InvalidOperation:  # pragma: no cover - the regex admits only valid decimals
        raise ValueError(f"invalid memory size {value!r}") from None
    return int(number * _MEMORY_UNITS[unit])


class OutOfBlocks(NanoInferError):
    """An allocation asked for more KV blocks than are free. Nothing was allocated."""

    def __init__(self, requested: int, available: int) -> None:
        super().__init__(f"requested {requested} KV blocks but only {available} are free")
        self.requested = requested
        self.available = available


class BlockAllocator:
    """Reference-counted pool of ``num_blocks`` block ids ``0 .. num_blocks-1``.

    Invariants: a block is on the free list iff its reference count is 0; counts never go
    negative. ``allocate`` hands out blocks with count 1; whoever holds a reference releases
    it with ``decref`` exactly once. Free blocks are handed out lowest id first, so the
    allocation order depends only on which blocks are free, never on the order they were
    freed (deterministic runs, and reproducible tests).
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be at least 1, got {num_blocks}")
        self._refcounts = [0] * num_blocks
        self._free: list[int] = list(range(num_blocks))  # a min-heap; sorted is a valid heap

    @property
    def num_total(self) -> int:
        return len(self._refcounts)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_total - self.num_free

    def refcount(self, block: int) -> int:
        self._check_id(block)
        return self._refcounts[block]

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` free blocks, each with reference count 1. All or nothing: raises
        OutOfBlocks, changing nothing, when fewer than ``n`` are free."""
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of blocks ({n})")
        if n > len(self._free):
            raise OutOfBlocks(n, len(self._free))
        blocks = [heapq.heappop(self._free) for _ in range(n)]
        for block in blocks:
            self._refcounts[block] = 1
        return blocks

    def incref(self, block: int) -> int:
        """Add a reference to an allocated block; returns the new count. A free block has no
        owner to share it from, so incref on it is an error (use ``allocate``)."""
        self._check_id(block)
        if self._refcounts[block] == 0:
            raise ValueError(f"incref of free block {block}")
        self._refcounts[block] += 1
        return self._refcounts[block]

    def decref(self, block: int) -> int:
        """Drop a reference; returns the new count. At 0 the block goes back to the free list.
        Decref of a free block is an error (it means a reference was released twice)."""
        self._check_id(block)
        if self._refcounts[block] == 0:
            raise ValueError(f"decref of free block {block} (double free)")
        self._refcounts[block] -= 1
        if self._refcounts[block] == 0:
            heapq.heappush(self._free, block)
        return self._refcounts[block]

    def check_integrity(self) -> None:
        """Raise AssertionError unless the free list is exactly the set of blocks with count 0."""
        free = sorted(self._free)
        zero = [b for b, count in enumerate(self._refcounts) if count == 0]
        if free != zero:
            raise AssertionError(f"free list {free} disagrees with zero-count blocks {zero}")
        if any(count < 0 for count in self._refcounts):
            raise AssertionError("negative reference count")

    def _check_id(self, block: int) -> None:
        if not 0 <= block < len(self._refcounts):
            raise ValueError(f"block id {block} out of range [0, {len(self._refcounts)})")


def read_slots(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """The K or V rows [n, num_kv_heads, head_dim] of the tokens in ``slots``."""
    block_size = cache.shape[2]
    return cache[slots // block_size, :, slots % block_size]


def write_slots(cache: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor) -> None:
    """Store rows [n, num_kv_heads, head_dim] at ``slots``, narrowed to the cache's dtype."""
    block_size = cache.shape[2]
    cache[slots // block_size, :, slots % block_size] = rows.to(cache.dtype)


class PagedKVCache:
    """Preallocated K and V tensors for every layer, addressed by slot.

    ``k[layer]`` and ``v[layer]`` have shape ``[num_blocks, num_kv_heads, block_size, head_dim]``
    and start zeroed; slot ``block * block_size + offset`` holds the token at ``offset`` in
    ``block`` (``read_slots``/``write_slots``). Within a block each KV head's keys lie together:
    decode attention, one task per sequence and KV head, then reads 2 KB runs (block 16, head_dim
    64, float16) instead of 128 bytes every 384, which took 1.3-1.5x as long on this 2-core machine
    (decode attention in `python -m benchmarks.kernels`, before and after, interleaved).
    This class only owns memory: which blocks belong to whom is the business of a
    ``BlockAllocator`` of the same ``num_blocks``.
    """

    def __init__(
        self,
        config: ModelConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be at least 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}")
        self.config = config
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.dtype = dtype
        self.device = torch.device(device)
        shape = (num_blocks, config.num_kv_heads, block_size, config.head_dim)
        self.k: list[torch.Tensor] = [
            torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(config.num_layers)
        ]
        self.v: list[torch.Tensor] = [
            torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(config.num_layers)
        ]

    @classmethod
    def for_memory(
        cls,
        config: ModelConfig,
        memory_bytes: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> "PagedKVCache":
        """The largest cache of whole blocks that fits in ``memory_bytes``.
        Raises ValueError when not even one block fits."""
        bytes_per_block = kv_bytes_per_token(config, dtype) * block_size
        num_blocks = memory_bytes // bytes_per_block
        if num_blocks < 1:
            raise ValueError(
                f"KV cache memory {memory_bytes} bytes is less than one block "
                f"({bytes_per_block} bytes for {block_size} tokens)"
            )
        return cls(config, num_blocks, block_size, dtype, device)

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def nbytes(self) -> int:
        """Bytes held by all K and V tensors (equals kv_cache_bytes(config, dtype, num_slots))."""
        return sum(t.nbytes for t in self.k) + sum(t.nbytes for t in self.v)
