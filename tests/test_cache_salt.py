"""Multi-tenant isolation of the radix prefix cache: one namespace per ``cache_salt``.

Requests with different salts must never share cached blocks; the same salt (or both None)
shares as before. Eviction, locking, reset and integrity checks span all namespaces."""

from __future__ import annotations

import random

import pytest
from bare_sequences import bare_sequence

from nanoinfer.engine.block_allocator import BlockAllocator
from nanoinfer.engine.kv_cache_manager import KVCacheManager
from nanoinfer.engine.radix_cache import RadixCache
from nanoinfer.engine.scheduler import Scheduler
from nanoinfer.engine.sequence import Sequence

BS = 2
PROMPT = [1, 2, 3, 4, 5, 6, 7]


def make(num_blocks: int = 32, enabled: bool = True) -> tuple[BlockAllocator, RadixCache]:
    alloc = BlockAllocator(num_blocks)
    return alloc, RadixCache(alloc, BS, enabled=enabled)


def store(alloc: BlockAllocator, cache: RadixCache, tokens: list[int], salt: str | None = None) -> list[int]:
    """A request that computed all of ``tokens`` itself and finished: insert, then release."""
    blocks = alloc.allocate(-(-len(tokens) // BS))
    cache.insert(tokens, blocks, salt)
    for b in blocks:
        alloc.decref(b)
    return blocks


# ------------------------------------------------------------------------- isolation


def test_different_salts_do_not_hit() -> None:
    alloc, cache = make()
    store(alloc, cache, PROMPT, "tenant-a")
    assert cache.match_prefix(PROMPT, "tenant-b").num_tokens == 0
    assert cache.match_prefix(PROMPT, "tenant-a").num_tokens == 6
    cache.check_integrity()


def test_same_salt_hits_with_the_same_blocks() -> None:
    alloc, cache = make()
    blocks = store(alloc, cache, PROMPT, "tenant-a")
    m = cache.match_prefix(PROMPT[:-1], "tenant-a")
    assert (m.pages, m.num_tokens) == (blocks[:3], 6)


@pytest.mark.parametrize(("stored", "queried"), [(None, "s"), ("s", None)])
def test_none_and_a_salt_are_separate_namespaces(stored: str | None, queried: str | None) -> None:
    alloc, cache = make()
    store(alloc, cache, PROMPT, stored)
    m = cache.match_prefix(PROMPT, queried)
    assert (m.pages, m.num_tokens) == ([], 0)
    assert cache.match_prefix(PROMPT, stored).num_tokens == 6
    assert cache.hit_tokens == 6  # stats are global


def test_same_prompt_in_two_namespaces_keeps_separate_blocks() -> None:
    alloc, cache = make()
    a = store(alloc, cache, PROMPT, "a")
    b = store(alloc, cache, PROMPT, "b")
    assert not set(a[:3]) & set(b[:3])  # the partial 4th block is never cached, so it is reused
    assert cache.cached_blocks() == 6
    assert set(cache.page_map("a").values()) == set(a[:3])
    assert set(cache.page_map("b").values()) == set(b[:3])
    assert cache.page_map() == {} and cache.page_map("unknown") == {}
    cache.check_integrity(in_use_refs={})


def test_a_block_cannot_move_into_another_namespace() -> None:
    # A table holding salt a's blocks must not be adopted under salt b: that would share them.
    alloc, cache = make()
    blocks = alloc.allocate(2)
    cache.insert([1, 2, 3, 4], blocks, "a")
    with pytest.raises(ValueError, match="already stored"):
        cache.insert([1, 2, 3, 4], blocks, "b")
    cache.check_integrity(in_use_refs={b: 1 for b in blocks})


def test_disabled_cache_ignores_salts() -> None:
    alloc, cache = make(enabled=False)
    assert cache.insert(PROMPT, alloc.allocate(4), "a") == 0
    m = cache.match_prefix(PROMPT, "a")
    assert (m.pages, m.num_tokens, m.node) == ([], 0, cache.root)
    assert cache.num_namespaces() == 1


# ---------------------------------------------------------------- eviction and locks


def test_eviction_is_lru_across_namespaces() -> None:
    alloc, cache = make()
    a = store(alloc, cache, [1, 1], "a")
    shared = store(alloc, cache, [1, 1])
    b = store(alloc, cache, [1, 1], "b")
    cache.match_prefix([1, 1], "a")  # a becomes the most recently used
    for expected_free in ([shared[0]], [shared[0], b[0]], [shared[0], b[0], a[0]]):
        assert cache.evict(1) == 1
        assert [blk for blk in (shared[0], b[0], a[0]) if alloc.refcount(blk) == 0] == expected_free
        cache.check_integrity(in_use_refs={})
    assert alloc.num_free == alloc.num_total and cache.num_namespaces() == 1


def test_locked_namespace_survives_eviction_and_blocks_reset() -> None:
    alloc, cache = make()
    store(alloc, cache, PROMPT, "a")
    store(alloc, cache, PROMPT, "b")
    m = cache.match_prefix(PROMPT, "a")
    cache.lock(m.node)
    assert cache.evict(100) == 3  # only b's blocks
    assert cache.match_prefix(PROMPT, "a").num_tokens == 6
    assert cache.num_namespaces() == 2  # None and a
    with pytest.raises(RuntimeError, match="1 locks held"):
        cache.reset()
    cache.unlock(m.node)
    cache.reset()
    assert cache.num_namespaces() == 1 and alloc.num_free == alloc.num_total
    assert m.node.evicted
    cache.check_integrity(in_use_refs={})


def test_many_one_off_salts_leave_no_roots() -> None:
    alloc, cache = make(num_blocks=64)
    for i in range(50):
        store(alloc, cache, [i, i, i], f"salt-{i}")
    assert cache.num_namespaces() == 51
    assert cache.evictable_blocks() == 50
    cache.check_integrity(in_use_refs={})
    assert cache.evict(1000) == 50
    assert cache.num_namespaces() == 1 and alloc.num_free == alloc.num_total
    cache.check_integrity(in_use_refs={})


def test_empty_namespaces_are_dropped() -> None:
    alloc, cache = make()
    # Nothing to insert (no full block): no root is left behind.
    blocks = alloc.allocate(1)
    assert cache.insert([9], blocks, "x") == 0
    alloc.decref(blocks[0])
    assert cache.num_namespaces() == 1
    # A miss that is locked, then unlocked (a request that was admitted, then preempted).
    m = cache.match_prefix(PROMPT, "y")
    cache.lock(m.node)
    assert cache.num_namespaces() == 2
    cache.unlock(m.node)
    assert cache.num_namespaces() == 1
    # A miss nobody locked is swept by the next eviction; its stale node can no longer be locked.
    stale = cache.match_prefix(PROMPT, "z").node
    assert cache.num_namespaces() == 2
    cache.evict(1)
    assert cache.num_namespaces() == 1
    with pytest.raises(ValueError, match="evicted"):
        cache.lock(stale)
    # The shared root is never dropped.
    root = cache.root
    cache.lock(root)
    cache.unlock(root)
    cache.evict(1)
    assert cache.root is root and not root.evicted
    cache.check_integrity(in_use_refs={})


def test_random_ops_agree_with_one_cache_per_salt() -> None:
    """Without eviction, a salted cache answers every query like separate caches would."""
    rng = random.Random(0)
    alloc, cache = make(num_blocks=2000)
    separate: dict[str | None, RadixCache] = {}
    salts = [None, "a", "b", "c"]
    for _ in range(300):
        salt = rng.choice(salts)
        tokens = [rng.randrange(3) for _ in range(rng.randint(1, 9))]
        ref = separate.setdefault(salt, RadixCache(BlockAllocator(2000), BS))
        if rng.random() < 0.5:
            store(alloc, cache, tokens, salt)
            store(ref.allocator, ref, tokens)
        else:
            assert cache.match_prefix(tokens, salt).num_tokens == ref.match_prefix(tokens).num_tokens
    for salt in salts:
        assert sorted(cache.page_map(salt)) == sorted(separate[salt].page_map())
    cache.check_integrity(in_use_refs={})


# ------------------------------------------------------------------------- scheduler


def _sequence(request_id: str, prompt: list[int], salt: str | None) -> Sequence:
    return bare_sequence(request_id, prompt, max_tokens=4, salt=salt)


def _admit_and_prefill(scheduler: Scheduler, seq: Sequence) -> None:
    scheduler.add(seq)
    chunks = scheduler.schedule()
    assert [c.seq for c in chunks] == [seq]
    scheduler.commit(chunks[0])  # inserts the computed prompt blocks under seq's salt
    scheduler.check_integrity()


class _NoStorage:
    """KV memory the scheduler tests do not need: block accounting only."""

    def copy(self, src_block: int, dst_block: int, start: int, end: int) -> None:
        pass


def test_scheduler_shares_blocks_only_within_a_salt() -> None:
    bs = 4
    kv = KVCacheManager(_NoStorage(), 32, bs, page_size=2)
    alloc, cache = kv.allocator, kv.prefix_cache
    scheduler = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=64)
    prompt = list(range(10, 23))  # 13 tokens: 12 matchable (prompt[:-1]), 3 whole blocks to share
    first = _sequence("r0", prompt, "tenant-a")
    _admit_and_prefill(scheduler, first)
    other = _sequence("r1", prompt, "tenant-b")
    _admit_and_prefill(scheduler, other)
    assert other.num_cached_prompt == 0
    assert not set(other.block_table) & set(first.block_table)
    unsalted = _sequence("r2", prompt, None)
    _admit_and_prefill(scheduler, unsalted)
    assert unsalted.num_cached_prompt == 0
    assert not set(unsalted.block_table) & (set(first.block_table) | set(other.block_table))
    same = _sequence("r3", prompt, "tenant-a")
    _admit_and_prefill(scheduler, same)
    assert same.num_cached_prompt == 12
    assert same.block_table[:3] == first.block_table[:3]
    for seq in (first, other, unsalted, same):
        scheduler.finish(seq, "stop")
        scheduler.check_integrity()
    assert cache.num_namespaces() == 3  # None, tenant-a, tenant-b: still cached
    cache.evict(alloc.num_total)
    assert cache.num_namespaces() == 1 and alloc.num_free == alloc.num_total
    scheduler.check_integrity()
