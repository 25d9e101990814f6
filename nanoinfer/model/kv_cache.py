"""The paged KV cache's memory: K and V tensors for every layer, addressed by slot, and the
formula for how many bytes it takes.

The pool holds one *slot* per cached token, grouped into fixed-size *blocks* of ``block_size``
slots: ``slot = block * block_size + offset``. Which blocks belong to whom is decided by the
engine's KVCacheManager; this module only owns memory.
"""

from __future__ import annotations

import torch

from nanoinfer.config import ModelConfig


def kv_bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes one token occupies in the KV cache: K and V, in every layer, for every KV head (MLA:
    one latent row of kv_lora_rank + qk_rope_head_dim per layer)."""
    element_size = torch.empty((), dtype=dtype).element_size()
    return config.num_layers * config.kv_values_per_token * element_size


def kv_cache_bytes(config: ModelConfig, dtype: torch.dtype, num_tokens: int) -> int:
    """Bytes a KV cache holding ``num_tokens`` tokens occupies."""
    return kv_bytes_per_token(config, dtype) * num_tokens


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
    ``block`` (``read_slots``/``write_slots``). Within a block each KV head's keys lie together,
    so decode attention, one task per sequence and KV head, reads long contiguous runs
    (docs/performance.md, "KV cache layout"). This class only owns memory: which blocks belong to
    whom is the business of the engine's ``KVCacheManager``.
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
        # MLA keeps its latent rows in k alone (values are their first kv_lora_rank columns)
        v_shape = (*shape[:3], 0) if config.is_mla else shape
        self.v: list[torch.Tensor] = [
            torch.zeros(v_shape, dtype=dtype, device=self.device) for _ in range(config.num_layers)
        ]

    @classmethod
    def for_memory(
        cls,
        config: ModelConfig,
        memory_bytes: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> PagedKVCache:
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

    def copy(self, src_block: int, dst_block: int, start: int, end: int) -> None:
        """Copy the K/V of offsets ``[start, end)`` of ``src_block`` to the same offsets of
        ``dst_block``, in every layer (copy-on-write of shared prefixes; the engine's
        ``KVStorage`` protocol). Other offsets of ``dst_block`` are left as they are."""
        if not 0 <= start <= end <= self.block_size:
            raise ValueError(f"offsets [{start}, {end}) outside a block of {self.block_size}")
        for cache in (*self.k, *self.v):
            cache[dst_block, :, start:end] = cache[src_block, :, start:end]

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def nbytes(self) -> int:
        """Bytes held by all K and V tensors (equals kv_cache_bytes(config, dtype, num_slots))."""
        return sum(t.nbytes for t in self.k) + sum(t.nbytes for t in self.v)
