"""A reference-counted allocator of KV cache blocks.

Blocks are the unit of allocation and of sharing (the radix prefix cache and n > 1 siblings share
blocks between sequences), so every block carries a reference count: it is free when nobody holds it.
"""

from __future__ import annotations

import heapq

from nanoinfer.errors import NanoInferError


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
