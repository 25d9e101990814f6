"""Unit tests of KV sizing, memory parsing, the block allocator and the paged KV tensors."""

from __future__ import annotations

import pytest
import torch

from nanoinfer.config import ModelConfig, parse_memory
from nanoinfer.engine.block_allocator import BlockAllocator, OutOfBlocks
from nanoinfer.errors import NanoInferError
from nanoinfer.model.kv_cache import (
    PagedKVCache,
    kv_bytes_per_token,
    kv_cache_bytes,
    read_slots,
    write_slots,
)


@pytest.fixture
def config() -> ModelConfig:
    return ModelConfig(
        architecture="llama",
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_layers=3,
        num_heads=4,
        num_kv_heads=2,
        head_dim=4,
        max_position_embeddings=64,
    )


# ------------------------------------------------------------------------------ sizing


def test_kv_bytes_per_token(config: ModelConfig) -> None:
    # 2 (K and V) * 3 layers * 2 kv heads * 4 head_dim * element size
    assert kv_bytes_per_token(config, torch.float32) == 2 * 3 * 2 * 4 * 4
    assert kv_bytes_per_token(config, torch.float16) == 2 * 3 * 2 * 4 * 2
    assert kv_bytes_per_token(config, torch.bfloat16) == 96
    assert kv_cache_bytes(config, torch.float32, 10) == 1920


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1000000", 1_000_000),
        ("2GiB", 2 * 2**30),
        ("512MiB", 512 * 2**20),
        ("1.5GB", 1_500_000_000),
        ("0.1GiB", 107374182),  # exact decimal arithmetic, then floor
        ("4 KiB", 4096),
        ("2g", 2 * 2**30),
        ("16kb", 16_000),
        ("100B", 100),
        (" 3mib ", 3 * 2**20),
        (".5KiB", 512),
        (1234, 1234),
    ],
)
def test_parse_memory(text: str | int, expected: int) -> None:
    assert parse_memory(text) == expected


@pytest.mark.parametrize("junk", ["", "GiB", "2 GiBs", "-1GiB", "1e9", "abc", "1.2.3MB", "2 G B", "nan"])
def test_parse_memory_rejects_junk(junk: str) -> None:
    with pytest.raises(ValueError, match="invalid memory size"):
        parse_memory(junk)


def test_parse_memory_rejects_negative_int_and_bool() -> None:
    with pytest.raises(ValueError):
        parse_memory(-5)
    with pytest.raises(ValueError):
        parse_memory(True)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- allocator


def test_allocate_is_all_or_nothing() -> None:
    alloc = BlockAllocator(4)
    assert alloc.allocate(3) == [0, 1, 2]
    with pytest.raises(OutOfBlocks) as info:
        alloc.allocate(2)
    assert (info.value.requested, info.value.available) == (2, 1)
    assert isinstance(info.value, NanoInferError)
    assert alloc.num_free == 1  # the failed call took nothing
    assert alloc.allocate(1) == [3]
    assert alloc.allocate(0) == []
    with pytest.raises(OutOfBlocks):
        alloc.allocate(1)


def test_refcounts_and_free_list() -> None:
    alloc = BlockAllocator(3)
    assert (alloc.num_total, alloc.num_free, alloc.num_used) == (3, 3, 0)
    (b,) = alloc.allocate(1)
    assert alloc.refcount(b) == 1
    assert alloc.incref(b) == 2
    assert alloc.decref(b) == 1
    assert alloc.num_free == 2
    assert alloc.decref(b) == 0
    assert alloc.num_free == 3 and alloc.refcount(b) == 0
    alloc.check_integrity()


def test_errors_on_misuse() -> None:
    alloc = BlockAllocator(2)
    with pytest.raises(ValueError, match="double free"):
        alloc.decref(0)
    with pytest.raises(ValueError, match="free block"):
        alloc.incref(1)
    with pytest.raises(ValueError, match="out of range"):
        alloc.refcount(2)
    with pytest.raises(ValueError, match="out of range"):
        alloc.decref(-1)
    with pytest.raises(ValueError):
        alloc.allocate(-1)
    with pytest.raises(ValueError):
        BlockAllocator(0)


def test_reuse_order_is_lowest_id_first_regardless_of_free_order() -> None:
    alloc = BlockAllocator(6)
    blocks = alloc.allocate(6)
    for b in (4, 1, 5, 2):
        alloc.decref(blocks[b])
    assert alloc.allocate(3) == [1, 2, 4]
    assert alloc.allocate(1) == [5]
    alloc.check_integrity()


# ------------------------------------------------------------------------ paged tensors


def test_paged_kv_cache_shapes(config: ModelConfig) -> None:
    cache = PagedKVCache(config, num_blocks=5, block_size=4, dtype=torch.float16, device="cpu")
    assert (cache.num_blocks, cache.block_size, cache.num_slots) == (5, 4, 20)
    assert len(cache.k) == len(cache.v) == config.num_layers
    for t in cache.k + cache.v:
        assert t.shape == (5, config.num_kv_heads, 4, config.head_dim)
        assert t.dtype == torch.float16 and t.device.type == "cpu"
        assert not t.any()
    # Layers own separate storage (writing one must not alias another).
    cache.k[0][3] = 1.0
    assert not cache.k[1].any() and not cache.v[0].any()
    assert cache.nbytes == kv_cache_bytes(config, torch.float16, 20)


def test_slots_address_block_head_offset(config: ModelConfig) -> None:
    """Slot block * block_size + offset of head h lies at cache[block, h, offset]."""
    cache = PagedKVCache(config, num_blocks=3, block_size=4, dtype=torch.float32, device="cpu")
    slots = torch.tensor([9, 0, 6])
    rows = torch.randn(3, config.num_kv_heads, config.head_dim)
    write_slots(cache.k[0], slots, rows)
    torch.testing.assert_close(read_slots(cache.k[0], slots), rows)
    for slot, row in zip(slots.tolist(), rows):
        for h in range(config.num_kv_heads):
            torch.testing.assert_close(cache.k[0][slot // 4, h, slot % 4], row[h])
    assert int((cache.k[0] != 0).sum()) == rows.numel()  # nothing else written


def test_for_memory_rounds_down_to_whole_blocks(config: ModelConfig) -> None:
    per_block = kv_bytes_per_token(config, torch.float32) * 8  # 1536
    cache = PagedKVCache.for_memory(config, 10 * per_block + per_block - 1, 8, torch.float32, "cpu")
    assert cache.num_blocks == 10
    assert cache.nbytes == 10 * per_block <= 11 * per_block - 1
    cache = PagedKVCache.for_memory(config, parse_memory("1MiB"), 16, torch.bfloat16)
    assert cache.num_blocks == 2**20 // (kv_bytes_per_token(config, torch.bfloat16) * 16)
    assert cache.nbytes <= 2**20


def test_for_memory_too_small(config: ModelConfig) -> None:
    with pytest.raises(ValueError, match="less than one block"):
        PagedKVCache.for_memory(config, 100, 16, torch.float32)
    with pytest.raises(ValueError):
        PagedKVCache(config, 0, 16, torch.float32)
