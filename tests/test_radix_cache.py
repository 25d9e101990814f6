"""Tests of the block-granular radix prefix cache: unit tests, then a stateful property test
that drives it with a BlockAllocator against a trivially correct reference model."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from nanoinfer.engine.kv_cache import BlockAllocator, OutOfBlocks
from nanoinfer.engine.radix_cache import RadixCache, RadixNode

BS = 2


def make(num_blocks: int = 16, block_size: int = BS, enabled: bool = True) -> tuple[BlockAllocator, RadixCache]:
    alloc = BlockAllocator(num_blocks)
    return alloc, RadixCache(alloc, block_size, enabled=enabled)


def store(alloc: BlockAllocator, cache: RadixCache, tokens: list[int]) -> list[int]:
    """Run a request that computed all of ``tokens`` itself, then finished: insert and release.
    Returns the blocks it used."""
    blocks = alloc.allocate(-(-len(tokens) // cache.block_size))
    cache.insert(tokens, blocks)
    for b in blocks:
        alloc.decref(b)
    return blocks


def edges(cache: RadixCache) -> list[tuple[int, ...]]:
    return sorted(node.key for node in cache._nodes() if node is not cache.root)


# -------------------------------------------------------------------------- unit tests


def test_empty_cache_matches_nothing() -> None:
    _, cache = make()
    m = cache.match_prefix([1, 2, 3, 4])
    assert (m.blocks, m.num_tokens, m.node) == ([], 0, cache.root)
    cache.check_integrity()


def test_split_at_block_boundary() -> None:
    alloc, cache = make()
    b = store(alloc, cache, [1, 2, 3, 4, 5, 6])
    assert edges(cache) == [(1, 2, 3, 4, 5, 6)]
    m = cache.match_prefix([1, 2, 3, 4, 9, 9])
    assert (m.blocks, m.num_tokens) == (b[:2], 4)
    assert m.node.key == (1, 2, 3, 4)  # the match ends exactly at a (new) node
    assert edges(cache) == [(1, 2, 3, 4), (5, 6)]
    # A mismatch inside a block splits at the block boundary before it.
    m = cache.match_prefix([1, 2, 3, 9])
    assert (m.blocks, m.num_tokens, m.node.key) == (b[:1], 2, (1, 2))
    assert edges(cache) == [(1, 2), (3, 4), (5, 6)]
    cache.check_integrity()


def test_insert_branches_off_inside_an_edge() -> None:
    alloc, cache = make()
    first = store(alloc, cache, [1, 2, 3, 4, 5, 6])
    second = alloc.allocate(3)
    assert cache.insert([1, 2, 3, 4, 7, 7], second) == 4
    assert edges(cache) == [(1, 2, 3, 4), (5, 6), (7, 7)]
    assert cache.match_prefix([1, 2, 3, 4, 7, 7, 0]).blocks == first[:2] + second[2:]
    # The tree adopted only second[2]; second[:2] duplicate cached blocks and stay the caller's.
    assert [alloc.refcount(b) for b in second] == [1, 1, 2]
    cache.check_integrity(in_use_refs={b: 1 for b in second})


def test_match_never_exceeds_given_tokens() -> None:
    alloc, cache = make()
    blocks = store(alloc, cache, [5, 6, 7, 8, 9, 10])
    prompt = [5, 6, 7, 8, 9, 10]
    m = cache.match_prefix(prompt[:-1])  # the documented call: whole prompt never matched
    assert (m.num_tokens, m.blocks) == (4, blocks[:2])
    assert cache.match_prefix(prompt[:3]).num_tokens == 2
    assert cache.match_prefix(prompt[:1]).num_tokens == 0
    assert cache.match_prefix([]).num_tokens == 0
    assert cache.match_prefix(prompt).num_tokens == 6  # only when asked for all of it


def test_trailing_partial_block_is_not_cached() -> None:
    alloc, cache = make()
    blocks = alloc.allocate(3)
    assert cache.insert([1, 2, 3, 4, 5], blocks) == 0
    assert cache.cached_blocks() == 2
    assert [alloc.refcount(b) for b in blocks] == [2, 2, 1]
    assert cache.match_prefix([1, 2, 3, 4, 5, 6]).num_tokens == 4


def test_insert_duplicate_returns_cached_length_and_adopts_nothing() -> None:
    alloc, cache = make(num_blocks=6)
    first = store(alloc, cache, [1, 2, 3, 4])
    # A second request computed the same prompt in its own blocks (it arrived before the
    # first one finished, so it could not share).
    dup = alloc.allocate(2)
    result = cache.insert_with_node([1, 2, 3, 4], dup)
    assert result.num_cached_tokens == 4
    assert result.node is cache.match_prefix([1, 2, 3, 4]).node
    assert [alloc.refcount(b) for b in dup] == [1, 1]
    for b in dup:  # the caller's normal release frees the duplicates
        alloc.decref(b)
    assert alloc.num_free == 4 and cache.cached_blocks() == 2
    assert [alloc.refcount(b) for b in first] == [1, 1]
    cache.check_integrity(in_use_refs={})


def test_lru_eviction_order() -> None:
    alloc, cache = make(num_blocks=6)
    a = store(alloc, cache, [0, 0])
    b = store(alloc, cache, [1, 1])
    c = store(alloc, cache, [2, 2])
    cache.match_prefix([0, 0])  # a is now the most recently used
    assert cache.evict(1) == 1
    assert alloc.refcount(b[0]) == 0 and cache.cached_blocks() == 2
    assert cache.evict(1) == 1
    assert alloc.refcount(c[0]) == 0
    assert cache.match_prefix([0, 0]).blocks == a
    assert cache.evict(5) == 1  # stops when nothing is evictable
    assert cache.cached_blocks() == 0 and alloc.num_free == 6
    assert cache.evict(1) == 0


def test_parent_becomes_evictable_after_children_and_evicts_leaves_first() -> None:
    alloc, cache = make()
    store(alloc, cache, [1, 1, 2, 2])
    store(alloc, cache, [1, 1, 3, 3])
    cache.match_prefix([1, 1])  # the shared parent is newest, but is not a leaf
    assert cache.evict(1) == 1
    assert edges(cache) == [(1, 1), (3, 3)]
    assert cache.evict(2) == 2
    assert edges(cache) == []
    cache.check_integrity()


def test_locked_nodes_survive_eviction() -> None:
    alloc, cache = make()
    store(alloc, cache, [1, 1, 2, 2, 3, 3])
    store(alloc, cache, [4, 4])
    m = cache.match_prefix([1, 1, 2, 2])
    cache.lock(m.node)
    assert cache.root.lock_count == 1  # the root counts every outstanding lock
    assert cache.evictable_blocks() == 2  # [3 3] below the lock, and [4 4]
    assert cache.evict(100) == 2
    assert cache.match_prefix([1, 1, 2, 2, 3, 3]).num_tokens == 4
    assert cache.evictable_blocks() == 0 and cache.evict(100) == 0
    cache.unlock(m.node)
    assert cache.evictable_blocks() == 2
    assert cache.evict(100) == 2
    assert alloc.num_free == alloc.num_total
    with pytest.raises(ValueError, match="not locked"):
        cache.unlock(m.node)
    with pytest.raises(ValueError, match="evicted"):
        cache.lock(m.node)


def test_lock_survives_a_later_split_of_its_node() -> None:
    alloc, cache = make()
    store(alloc, cache, [1, 1, 2, 2])
    m = cache.match_prefix([1, 1, 2, 2])
    cache.lock(m.node)
    cache.match_prefix([1, 1, 3])  # splits m.node's edge; m.node keeps ending at [1 1 2 2]
    cache.check_integrity()
    assert cache.evict(10) == 0
    cache.unlock(m.node)
    assert cache.evict(10) == 2


def test_evict_counts_only_blocks_actually_freed() -> None:
    alloc, cache = make()
    held = alloc.allocate(2)  # a running request's blocks, which it has also inserted
    cache.insert([1, 1, 2, 2], held)
    store(alloc, cache, [3, 3])
    assert cache.evictable_blocks() == 1
    assert cache.evict(100) == 1  # [1 1 2 2] leaves the tree but its blocks stay allocated
    assert cache.cached_blocks() == 0
    assert [alloc.refcount(b) for b in held] == [1, 1]
    cache.check_integrity(in_use_refs={b: 1 for b in held})


def test_request_lifecycle_protocol() -> None:
    alloc, cache = make(num_blocks=8)
    store(alloc, cache, [1, 2, 3, 4, 5, 6])
    prompt = [1, 2, 3, 4, 5, 6]
    m = cache.match_prefix(prompt[:-1])
    cache.lock(m.node)
    for b in m.blocks:
        alloc.incref(b)
    table = m.blocks + alloc.allocate(-(-len(prompt) // BS) - len(m.blocks))
    cache.check_integrity(in_use_refs={b: 1 for b in table})
    tokens = prompt + [7, 8]
    table += alloc.allocate(1)
    cache.insert(tokens, table)
    cache.unlock(m.node)
    for b in table:
        alloc.decref(b)
    cache.check_integrity(in_use_refs={})
    assert cache.match_prefix(tokens).num_tokens == 8
    # The request's recomputed copy of [5 6] was a duplicate and is free again.
    assert alloc.num_free == alloc.num_total - cache.cached_blocks() == 8 - 4


def test_stats() -> None:
    alloc, cache = make()
    store(alloc, cache, [1, 2, 3, 4])
    cache.match_prefix([1, 2, 3])
    cache.match_prefix([1, 2, 3, 4, 5])
    cache.match_prefix([9, 9])
    assert (cache.queried_tokens, cache.hit_tokens) == (10, 6)
    assert cache.hit_rate == pytest.approx(0.6)


def test_insert_rejects_bad_blocks_without_side_effects() -> None:
    alloc, cache = make()
    cached = store(alloc, cache, [1, 1])
    with pytest.raises(ValueError, match="need 2 blocks"):
        cache.insert([2, 2, 3, 3], alloc.allocate(1))
    mine = alloc.allocate(1)
    with pytest.raises(ValueError, match="already stored"):
        cache.insert([1, 1, 2, 2], mine + cached)
    with pytest.raises(ValueError, match="already stored"):
        cache.insert([5, 5], cached)
    with pytest.raises(ValueError, match="free block"):
        cache.insert([5, 5], [15])
    with pytest.raises(ValueError, match="repeat"):
        cache.insert([5, 5, 6, 6], mine + mine)
    assert cache.cached_blocks() == 1 and alloc.refcount(mine[0]) == 1


def test_disabled_cache_stores_nothing() -> None:
    alloc, cache = make(enabled=False)
    blocks = alloc.allocate(2)
    result = cache.insert_with_node([1, 2, 3, 4], blocks)
    assert result == (0, cache.root)
    m = cache.match_prefix([1, 2, 3, 4])
    assert (m.blocks, m.num_tokens, m.node) == ([], 0, cache.root)
    cache.lock(m.node)  # the protocol runs unchanged
    cache.unlock(m.node)
    assert [alloc.refcount(b) for b in blocks] == [1, 1]
    assert cache.cached_blocks() == cache.evictable_blocks() == cache.evict(10) == 0
    assert cache.queried_tokens == 4 and cache.hit_tokens == 0


def test_reset_drops_everything_but_refuses_while_locked() -> None:
    alloc, cache = make()
    store(alloc, cache, [1, 1, 2, 2])
    store(alloc, cache, [3, 3])
    m = cache.match_prefix([3, 3])
    cache.lock(m.node)
    with pytest.raises(RuntimeError, match="locks held"):
        cache.reset()
    cache.unlock(m.node)
    cache.reset()
    assert cache.cached_blocks() == 0 and alloc.num_free == alloc.num_total
    assert cache.queried_tokens == cache.hit_tokens == 0
    assert cache.match_prefix([1, 1, 2, 2]).num_tokens == 0
    cache.check_integrity()


def test_check_integrity_catches_leaks_and_corruption() -> None:
    alloc, cache = make()
    blocks = store(alloc, cache, [1, 1, 2, 2])
    cache.check_integrity(in_use_refs={})
    alloc.incref(blocks[0])  # a request reference nobody accounted for
    with pytest.raises(AssertionError, match="refcount"):
        cache.check_integrity(in_use_refs={})
    cache.check_integrity(in_use_refs={blocks[0]: 1})
    alloc.decref(blocks[0])
    node = cache.match_prefix([1, 1, 2, 2]).node
    node.blocks = [blocks[0], blocks[0]]
    with pytest.raises(AssertionError, match="twice"):
        cache.check_integrity()
    node.blocks = blocks
    node.lock_count = 1  # a child locked but its parent (the root) not
    with pytest.raises(AssertionError, match="locked more"):
        cache.check_integrity()


# ------------------------------------------------------------- stateful property test

NUM_BLOCKS = 12
MAX_TOKENS = 13
tokens_st = st.lists(st.integers(0, 2), min_size=1, max_size=9)


@dataclass
class Request:
    tokens: list[int]
    table: list[int]  # one request reference on each entry
    node: RadixNode  # the node this request holds locked
    locked_prefix: tuple[int, ...]  # the prefix that node ends


class RadixCacheMachine(RuleBasedStateMachine):
    """Drives RadixCache + BlockAllocator with the documented request protocol.

    Reference model: ``cached`` maps every cached full-block prefix to the block of its last
    block, ``tick`` to the logical time it was last touched, and ``refs`` counts the
    references requests hold. Eviction is checked by properties (only unlocked, prefix-closed
    drops; exact freed count; LRU order; evicts all it can when short), then adopted.
    """

    def __init__(self) -> None:
        super().__init__()
        self.alloc = BlockAllocator(NUM_BLOCKS)
        self.cache = RadixCache(self.alloc, BS)
        self.cached: dict[tuple[int, ...], int] = {}
        self.tick: dict[tuple[int, ...], int] = {}
        self.now = 0
        self.refs: Counter[int] = Counter()
        self.requests: list[Request] = []
        self.pins: list[tuple[RadixNode, tuple[int, ...]]] = []
        self.queried = 0
        self.hit = 0

    # ---- reference model

    def ref_match_blocks(self, tokens: list[int] | tuple[int, ...]) -> int:
        k = 0
        while (k + 1) * BS <= len(tokens) and tuple(tokens[: (k + 1) * BS]) in self.cached:
            k += 1
        return k

    def touch(self, tokens: list[int] | tuple[int, ...], num_blocks: int) -> None:
        self.now += 1
        for j in range(1, num_blocks + 1):
            self.tick[tuple(tokens[: j * BS])] = self.now

    def protected(self) -> set[tuple[int, ...]]:
        locked = [r.locked_prefix for r in self.requests] + [p for _, p in self.pins]
        return {p for p in self.cached if any(lp[: len(p)] == p for lp in locked)}

    def matched(self, tokens: list[int]):
        """match_prefix, checked against the reference and mirrored in it."""
        m = self.cache.match_prefix(tokens)
        k = self.ref_match_blocks(tokens)
        assert m.num_tokens == k * BS <= len(tokens)
        assert m.blocks == [self.cached[tuple(tokens[: j * BS])] for j in range(1, k + 1)]
        self.touch(tokens, k)
        self.queried += len(tokens)
        self.hit += m.num_tokens
        return m

    def inserted(self, r: Request):
        full = len(r.tokens) // BS * BS
        k = self.ref_match_blocks(r.tokens[:full])
        result = self.cache.insert_with_node(r.tokens, r.table)
        assert result.num_cached_tokens == k * BS
        for j in range(k + 1, full // BS + 1):
            self.cached[tuple(r.tokens[: j * BS])] = r.table[j - 1]
        self.touch(r.tokens, full // BS)
        return result

    def node_prefixes(self) -> list[list[tuple[int, ...]]]:
        """The cached prefixes of each node's blocks, one list per node (white-box: eviction
        works on whole nodes, so its stopping rule can only be checked per node)."""
        result = []
        stack = [(self.cache.root, ())]
        while stack:
            node, prefix = stack.pop()
            if node is not self.cache.root:
                result.append([prefix + node.key[: (i + 1) * BS] for i in range(len(node.blocks))])
            stack.extend((child, prefix + node.key) for child in node.children.values())
        return result

    def evicted(self, n: int) -> None:
        before = self.cache.block_map()
        assert before == self.cached
        protected = self.protected()
        nodes = self.node_prefixes()
        freed = self.cache.evict(n)
        after = self.cache.block_map()
        assert after.items() <= before.items()
        dropped = before.keys() - after.keys()
        for p in after:  # still prefix-closed
            assert all(p[:j] in after for j in range(BS, len(p), BS))
        assert not dropped & protected, "evicted a locked prefix"
        assert freed == sum(1 for p in dropped if self.refs[before[p]] == 0)
        if n <= 0:
            assert not dropped
        if freed < n:
            assert set(after) <= protected, "stopped early with evictable prefixes left"
        dropped_nodes = [ps for ps in nodes if ps[0] in dropped]
        assert all(set(ps) <= dropped for ps in dropped_nodes), "evicted part of a node"
        if dropped_nodes:  # it stops once enough is freed: before its last node it had < n
            most = max(sum(1 for p in ps if self.refs[before[p]] == 0) for ps in dropped_nodes)
            assert freed - most < n, "evicted more than needed"
        kept = [self.tick[p] for p in after if p not in protected]
        if dropped and kept:
            assert max(self.tick[p] for p in dropped) <= min(kept), "not LRU"
        self.cached = after
        for p in dropped:
            del self.tick[p]

    def allocated(self, n: int) -> list[int] | None:
        if self.alloc.num_free < n:
            self.evicted(n - self.alloc.num_free)
        if self.alloc.num_free < n:
            free = self.alloc.num_free
            with pytest.raises(OutOfBlocks):
                self.alloc.allocate(n)
            assert self.alloc.num_free == free
            return None
        blocks = self.alloc.allocate(n)
        self.refs.update(blocks)
        return blocks

    def release(self, blocks: list[int]) -> None:
        for b in blocks:
            self.alloc.decref(b)
            self.refs[b] -= 1

    # ---- rules

    @rule(tokens=tokens_st)
    def query(self, tokens: list[int]) -> None:
        self.matched(tokens)

    @rule(tokens=tokens_st)
    def pin(self, tokens: list[int]) -> None:
        m = self.matched(tokens)
        self.cache.lock(m.node)
        self.pins.append((m.node, tuple(tokens[: m.num_tokens])))

    @precondition(lambda self: self.pins)
    @rule(i=st.integers(0, 100))
    def unpin(self, i: int) -> None:
        node, _ = self.pins.pop(i % len(self.pins))
        self.cache.unlock(node)

    @rule(tokens=tokens_st)
    def start_request(self, tokens: list[int]) -> None:
        tokens = list(tokens)
        m = self.matched(tokens[:-1])
        self.cache.lock(m.node)
        for b in m.blocks:
            self.alloc.incref(b)
        self.refs.update(m.blocks)
        # Registered before allocating: its lock must protect its prefix from that eviction.
        r = Request(tokens, list(m.blocks), m.node, tuple(tokens[: m.num_tokens]))
        self.requests.append(r)
        new = self.allocated(-(-len(tokens) // BS) - len(m.blocks))
        if new is None:  # could not admit it: undo, in the finishing order
            self.requests.remove(r)
            self.cache.unlock(m.node)
            self.release(m.blocks)
            return
        r.table += new

    @precondition(lambda self: self.requests)
    @rule(i=st.integers(0, 100), token=st.integers(0, 2))
    def decode(self, i: int, token: int) -> None:
        r = self.requests[i % len(self.requests)]
        if len(r.tokens) >= MAX_TOKENS:
            return
        if len(r.tokens) == len(r.table) * BS:
            new = self.allocated(1)
            if new is None:
                return
            r.table += new
        r.tokens.append(token)

    @precondition(lambda self: self.requests)
    @rule(i=st.integers(0, 100), relock=st.booleans())
    def cache_running_request(self, i: int, relock: bool) -> None:
        """Insert a request's tokens mid-flight; optionally move its lock to the new node."""
        r = self.requests[i % len(self.requests)]
        result = self.inserted(r)
        if relock:
            self.cache.lock(result.node)
            self.cache.unlock(r.node)
            r.node = result.node
            r.locked_prefix = tuple(r.tokens[: len(r.tokens) // BS * BS])

    @precondition(lambda self: self.requests)
    @rule(i=st.integers(0, 100), keep=st.booleans())
    def finish_request(self, i: int, keep: bool) -> None:
        """Finish (insert, unlock, release) or abort (unlock, release) a request."""
        r = self.requests.pop(i % len(self.requests))
        if keep:
            self.inserted(r)
        self.cache.unlock(r.node)
        self.release(r.table)

    @rule(n=st.integers(-1, 8))
    def evict(self, n: int) -> None:
        self.evicted(n)

    # ---- invariants

    @invariant()
    def agrees_with_reference(self) -> None:
        self.cache.check_integrity(in_use_refs={b: c for b, c in self.refs.items() if c})
        assert self.cache.block_map() == self.cached
        assert self.cache.cached_blocks() == len(self.cached)
        protected = self.protected()
        assert self.cache.evictable_blocks() == sum(
            1 for p, b in self.cached.items() if p not in protected and self.refs[b] == 0
        )
        held = {b for b, c in self.refs.items() if c} | set(self.cached.values())
        assert self.alloc.num_free == NUM_BLOCKS - len(held)
        assert (self.cache.queried_tokens, self.cache.hit_tokens) == (self.queried, self.hit)
        assert self.cache.root.lock_count == len(self.requests) + len(self.pins)

    def teardown(self) -> None:
        # Everything released, everything evicts and every block comes back.
        for r in self.requests:
            self.cache.unlock(r.node)
            self.release(r.table)
        for node, _ in self.pins:
            self.cache.unlock(node)
        self.cache.evict(NUM_BLOCKS + 1)
        assert self.alloc.num_free == NUM_BLOCKS
        assert self.cache.cached_blocks() == 0
        self.cache.check_integrity(in_use_refs={})


RadixCacheMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_radix_cache_state_machine = RadixCacheMachine.TestCase
