"""Tests of the page-granular radix prefix cache: unit tests, then a stateful property test
that drives it with a BlockAllocator against a trivially correct reference model.

Blocks hold BS = 4 tokens and pages PS = 2, so every block holds two pages: the cases where a
page and its block differ (a partial block's pages, a block whose pages leave one by one) show.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from nanoinfer.engine.block_allocator import BlockAllocator, OutOfBlocks
from nanoinfer.engine.radix_cache import RadixCache, RadixNode

BS = 4
PS = 2
PAGES_PER_BLOCK = BS // PS


def make(num_blocks: int = 16, enabled: bool = True) -> tuple[BlockAllocator, RadixCache]:
    alloc = BlockAllocator(num_blocks)
    return alloc, RadixCache(alloc, BS, PS, enabled=enabled)


def store(alloc: BlockAllocator, cache: RadixCache, tokens: list[int]) -> list[int]:
    """Run a request that computed all of ``tokens`` itself, then finished: insert and release.
    Returns the blocks it used."""
    blocks = alloc.allocate(-(-len(tokens) // BS))
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
    assert (m.pages, m.num_tokens, m.node) == ([], 0, cache.root)
    cache.check_integrity()


def test_page_size_must_divide_block_size() -> None:
    with pytest.raises(ValueError, match="divisor"):
        RadixCache(BlockAllocator(4), 4, 3)
    assert RadixCache(BlockAllocator(4), 4).page_size == 4  # default: one page per block


def test_split_at_page_boundary() -> None:
    alloc, cache = make()
    b = store(alloc, cache, [1, 2, 3, 4, 5, 6])
    assert edges(cache) == [(1, 2, 3, 4, 5, 6)]
    m = cache.match_prefix([1, 2, 3, 4, 9, 9])
    assert (m.pages, m.num_tokens) == ([b[0], b[0]], 4)
    assert m.node.key == (1, 2, 3, 4)  # the match ends exactly at a (new) node
    assert edges(cache) == [(1, 2, 3, 4), (5, 6)]
    # A mismatch inside a page splits at the page boundary before it, here inside a block.
    m = cache.match_prefix([1, 2, 3, 9])
    assert (m.pages, m.num_tokens, m.node.key) == ([b[0]], 2, (1, 2))
    assert edges(cache) == [(1, 2), (3, 4), (5, 6)]
    cache.check_integrity()


def test_insert_branches_off_inside_an_edge_and_inside_a_block() -> None:
    alloc, cache = make()
    first = store(alloc, cache, [1, 2, 3, 4, 5, 6])
    second = alloc.allocate(2)
    assert cache.insert([1, 2, 3, 4, 7, 7], second) == 4
    assert edges(cache) == [(1, 2, 3, 4), (5, 6), (7, 7)]
    assert cache.match_prefix([1, 2, 3, 4, 7, 7, 0]).pages == [first[0], first[0], second[1]]
    # The tree adopted only second[1]; second[0] duplicates cached pages and stays the caller's.
    assert [alloc.refcount(b) for b in second] == [1, 2]
    # A branch in the middle of block 0: its second page lies in another block, at offset 2.
    third = alloc.allocate(1)
    assert cache.insert([1, 2, 8, 8], third) == 2
    assert cache.match_prefix([1, 2, 8, 8, 0]).pages == [first[0], third[0]]
    assert cache.page_map()[(1, 2, 8, 8)] == third[0]
    cache.check_integrity(in_use_refs={b: 1 for b in second + third})


def test_match_never_exceeds_given_tokens() -> None:
    alloc, cache = make()
    blocks = store(alloc, cache, [5, 6, 7, 8, 9, 10])
    prompt = [5, 6, 7, 8, 9, 10]
    m = cache.match_prefix(prompt[:-1])  # the documented call: whole prompt never matched
    assert (m.num_tokens, m.pages) == (4, [blocks[0], blocks[0]])
    assert cache.match_prefix(prompt[:3]).num_tokens == 2
    assert cache.match_prefix(prompt[:1]).num_tokens == 0
    assert cache.match_prefix([]).num_tokens == 0
    assert cache.match_prefix(prompt).num_tokens == 6  # only when asked for all of it


def test_whole_pages_of_a_partial_block_are_cached_a_partial_page_is_not() -> None:
    alloc, cache = make()
    blocks = alloc.allocate(2)
    assert cache.insert([1, 2, 3, 4, 5], blocks) == 0
    assert cache.cached_blocks() == 1  # [5] is less than a page
    assert [alloc.refcount(b) for b in blocks] == [2, 1]
    assert cache.insert([1, 2, 3, 4, 5, 6, 7], blocks) == 4  # a request that went on writing
    assert cache.cached_blocks() == 2 and [alloc.refcount(b) for b in blocks] == [2, 2]
    m = cache.match_prefix([1, 2, 3, 4, 5, 6, 7, 8])
    assert (m.num_tokens, m.pages) == (6, [blocks[0], blocks[0], blocks[1]])  # the tail is half a block
    cache.check_integrity(in_use_refs={b: 1 for b in blocks})


def test_insert_duplicate_returns_cached_length_and_adopts_nothing() -> None:
    alloc, cache = make(num_blocks=6)
    first = store(alloc, cache, [1, 2, 3, 4, 5, 6, 7, 8])
    # A second request computed the same prompt in its own blocks (it arrived before the
    # first one finished, so it could not share).
    dup = alloc.allocate(2)
    result = cache.insert_with_node([1, 2, 3, 4, 5, 6, 7, 8], dup)
    assert result.num_cached_tokens == 8
    assert result.node is cache.match_prefix([1, 2, 3, 4, 5, 6, 7, 8]).node
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
    assert cache.match_prefix([0, 0]).pages == a
    assert cache.evict(5) == 1  # stops when nothing is evictable
    assert cache.cached_blocks() == 0 and alloc.num_free == 6
    assert cache.evict(1) == 0


def test_parent_becomes_evictable_after_children_and_evicts_leaves_first() -> None:
    alloc, cache = make()
    store(alloc, cache, [1, 1, 2, 2, 9, 9, 9, 9])
    store(alloc, cache, [1, 1, 2, 2, 3, 3, 3, 3])
    cache.match_prefix([1, 1, 2, 2])  # the shared parent is newest, but is not a leaf
    assert cache.evict(1) == 1
    assert edges(cache) == [(1, 1, 2, 2), (3, 3, 3, 3)]
    assert cache.evict(2) == 2
    assert edges(cache) == []
    cache.check_integrity()


def test_a_block_is_freed_with_its_last_cached_page() -> None:
    alloc, cache = make()
    (b,) = store(alloc, cache, [1, 1, 2, 2])
    (c,) = store(alloc, cache, [1, 1, 3, 3])  # only its page [3 3] is new: at offset 2 of c
    assert cache.page_map() == {(1, 1): b, (1, 1, 2, 2): b, (1, 1, 3, 3): c}
    cache.match_prefix([1, 1, 3, 3])
    assert cache.evictable_blocks() == 2
    # [2 2] is older: it goes first, but b still holds [1 1], so nothing is freed until [3 3] goes.
    assert cache.evict(1) == 1
    assert edges(cache) == [(1, 1)] and alloc.refcount(c) == 0 and alloc.refcount(b) == 1
    assert cache.evict(1) == 1 and alloc.num_free == alloc.num_total
    cache.check_integrity(in_use_refs={})


def test_locked_nodes_survive_eviction() -> None:
    alloc, cache = make()
    store(alloc, cache, [1, 1, 2, 2, 3, 3])
    store(alloc, cache, [4, 4])
    m = cache.match_prefix([1, 1, 2, 2])
    cache.lock(m.node)
    assert cache.root.lock_count == 1  # the root counts every outstanding lock
    assert cache.evictable_blocks() == 2  # [3 3]'s block below the lock, and [4 4]'s
    assert cache.evict(100) == 2
    assert cache.match_prefix([1, 1, 2, 2, 3, 3]).num_tokens == 4
    assert cache.evictable_blocks() == 0 and cache.evict(100) == 0
    cache.unlock(m.node)
    assert cache.evictable_blocks() == 1
    assert cache.evict(100) == 1
    assert alloc.num_free == alloc.num_total
    with pytest.raises(ValueError, match="not locked"):
        cache.unlock(m.node)
    with pytest.raises(ValueError, match="evicted"):
        cache.lock(m.node)


def test_a_locked_page_keeps_its_block_though_other_pages_go() -> None:
    alloc, cache = make()
    (b,) = store(alloc, cache, [1, 1, 2, 2])
    m = cache.match_prefix([1, 1])
    cache.lock(m.node)
    assert cache.evictable_blocks() == 0  # b's page [1 1] is locked
    assert cache.evict(10) == 0
    assert edges(cache) == [(1, 1)] and alloc.refcount(b) == 1  # [2 2] went, b stayed
    cache.unlock(m.node)
    assert cache.evict(10) == 1
    cache.check_integrity(in_use_refs={})


def test_lock_survives_a_later_split_of_its_node() -> None:
    alloc, cache = make()
    store(alloc, cache, [1, 1, 2, 2])
    m = cache.match_prefix([1, 1, 2, 2])
    cache.lock(m.node)
    cache.match_prefix([1, 1, 3])  # splits m.node's edge; m.node keeps ending at [1 1 2 2]
    cache.check_integrity()
    assert cache.evict(10) == 0
    cache.unlock(m.node)
    assert cache.evict(10) == 1


def test_evict_counts_only_blocks_actually_freed() -> None:
    alloc, cache = make()
    held = alloc.allocate(2)  # a running request's blocks, which it has also inserted
    cache.insert([1, 1, 2, 2, 3, 3], held)
    store(alloc, cache, [4, 4])
    assert cache.evictable_blocks() == 1
    assert cache.evict(100) == 1  # [1 1 2 2 3 3] leaves the tree but its blocks stay allocated
    assert cache.cached_blocks() == 0
    assert [alloc.refcount(b) for b in held] == [1, 1]
    cache.check_integrity(in_use_refs={b: 1 for b in held})


def test_request_lifecycle_protocol() -> None:
    alloc, cache = make(num_blocks=8)
    cached = store(alloc, cache, [1, 2, 3, 4, 5, 6])
    prompt = [1, 2, 3, 4, 5, 6]
    m = cache.match_prefix(prompt[:-1])
    cache.lock(m.node)
    assert m.pages == [cached[0], cached[0]]  # block 0 fully matched, from one block: share it
    alloc.incref(cached[0])
    table = [cached[0]] + alloc.allocate(1)
    cache.check_integrity(in_use_refs={b: 1 for b in table})
    tokens = prompt + [7, 8]
    cache.insert(tokens, table)
    cache.unlock(m.node)
    for b in table:
        alloc.decref(b)
    cache.check_integrity(in_use_refs={})
    assert cache.match_prefix(tokens).num_tokens == 8
    # Page [5 6] stays in the first request's block; [7 8] was adopted in the second's, at offset 2.
    assert cache.match_prefix(tokens).pages == [cached[0], cached[0], cached[1], table[1]]
    assert alloc.num_free == alloc.num_total - cache.cached_blocks() == 8 - 3


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
    leaked = alloc.allocate(1)
    with pytest.raises(ValueError, match="need 2 blocks"):
        cache.insert([2, 2, 3, 3, 4, 4], leaked)
    mine = alloc.allocate(1)
    with pytest.raises(ValueError, match="already stored"):  # [3 3] would land on cached's [1 1]
        cache.insert([1, 1, 2, 2, 3, 3], mine + cached)
    with pytest.raises(ValueError, match="already stored"):
        cache.insert([5, 5], cached)
    with pytest.raises(ValueError, match="free block"):
        cache.insert([5, 5], [15])
    with pytest.raises(ValueError, match="repeats"):
        cache.insert([5, 5, 6, 6, 7, 7], mine + mine)
    assert cache.cached_blocks() == 1 and alloc.refcount(mine[0]) == 1
    cache.check_integrity(in_use_refs={mine[0]: 1, leaked[0]: 1})


def test_disabled_cache_stores_nothing() -> None:
    alloc, cache = make(enabled=False)
    blocks = alloc.allocate(2)
    result = cache.insert_with_node([1, 2, 3, 4, 5, 6], blocks)
    assert result == (0, cache.root)
    m = cache.match_prefix([1, 2, 3, 4])
    assert (m.pages, m.num_tokens, m.node) == ([], 0, cache.root)
    cache.lock(m.node)  # the protocol runs unchanged
    cache.unlock(m.node)
    assert [alloc.refcount(b) for b in blocks] == [1, 1]
    assert cache.cached_blocks() == cache.evictable_blocks() == cache.evict(10) == 0
    assert cache.queried_tokens == 4 and cache.hit_tokens == 0


def test_reset_drops_everything_but_refuses_while_locked() -> None:
    alloc, cache = make()
    store(alloc, cache, [1, 1, 2, 2, 5, 5])
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
    blocks = store(alloc, cache, [1, 1, 2, 2, 3, 3, 4, 4])
    cache.check_integrity(in_use_refs={})
    alloc.incref(blocks[0])  # a request reference nobody accounted for
    with pytest.raises(AssertionError, match="refcount"):
        cache.check_integrity(in_use_refs={})
    cache.check_integrity(in_use_refs={blocks[0]: 1})
    alloc.decref(blocks[0])
    node = cache.match_prefix([1, 1, 2, 2, 3, 3, 4, 4]).node
    node.blocks = [blocks[0]] * 4  # pages 0 and 2 would share offset 0 of one block
    with pytest.raises(AssertionError, match="twice"):
        cache.check_integrity()
    node.blocks = [blocks[0], blocks[0], blocks[1], blocks[0]]  # offset 2 of block 0 twice too
    with pytest.raises(AssertionError, match="twice|two logical blocks"):
        cache.check_integrity()
    node.blocks = [blocks[0], blocks[0], blocks[1], blocks[1]]
    cache.check_integrity(in_use_refs={})
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


def _blocks_for(num_tokens: int) -> int:
    return -(-num_tokens // BS)


class RadixCacheMachine(RuleBasedStateMachine):
    """Drives RadixCache + BlockAllocator with the documented request protocol, sharing a
    matched block when it is fully matched from one block and taking a fresh one otherwise
    (KVCacheManager's rule; the copies themselves are tested in test_kv_cache_manager.py).

    Reference model: ``cached`` maps every cached whole-page prefix to the block holding its
    last page, ``tick`` to the logical time it was last touched, and ``refs`` counts the
    references requests hold. Eviction is checked by properties (only unlocked, prefix-closed
    drops; exact freed count; LRU order; evicts all it can when short), then adopted.
    """

    def __init__(self) -> None:
        super().__init__()
        self.alloc = BlockAllocator(NUM_BLOCKS)
        self.cache = RadixCache(self.alloc, BS, PS)
        self.cached: dict[tuple[int, ...], int] = {}
        self.tick: dict[tuple[int, ...], int] = {}
        self.now = 0
        self.refs: Counter[int] = Counter()
        self.requests: list[Request] = []
        self.pins: list[tuple[RadixNode, tuple[int, ...]]] = []
        self.queried = 0
        self.hit = 0

    # ---- reference model

    def ref_match_pages(self, tokens: list[int] | tuple[int, ...]) -> int:
        k = 0
        while (k + 1) * PS <= len(tokens) and tuple(tokens[: (k + 1) * PS]) in self.cached:
            k += 1
        return k

    def touch(self, tokens: list[int] | tuple[int, ...], num_pages: int) -> None:
        self.now += 1
        for j in range(1, num_pages + 1):
            self.tick[tuple(tokens[: j * PS])] = self.now

    def protected(self) -> set[tuple[int, ...]]:
        locked = [r.locked_prefix for r in self.requests] + [p for _, p in self.pins]
        return {p for p in self.cached if any(lp[: len(p)] == p for lp in locked)}

    def matched(self, tokens: list[int]):
        """match_prefix, checked against the reference and mirrored in it."""
        m = self.cache.match_prefix(tokens)
        k = self.ref_match_pages(tokens)
        assert m.num_tokens == k * PS <= len(tokens)
        assert m.pages == [self.cached[tuple(tokens[: j * PS])] for j in range(1, k + 1)]
        self.touch(tokens, k)
        self.queried += len(tokens)
        self.hit += m.num_tokens
        return m

    def inserted(self, r: Request):
        whole = len(r.tokens) // PS * PS
        k = self.ref_match_pages(r.tokens[:whole])
        result = self.cache.insert_with_node(r.tokens, r.table)
        assert result.num_cached_tokens == k * PS
        for j in range(k + 1, whole // PS + 1):
            self.cached[tuple(r.tokens[: j * PS])] = r.table[(j - 1) * PS // BS]
        self.touch(r.tokens, whole // PS)
        return result

    def node_prefixes(self) -> list[list[tuple[int, ...]]]:
        """The cached prefixes of each node's pages, one list per node (white-box: eviction
        works on whole nodes, so its stopping rule can only be checked per node)."""
        result = []
        stack = [(self.cache.root, ())]
        while stack:
            node, prefix = stack.pop()
            if node is not self.cache.root:
                result.append([prefix + node.key[: (i + 1) * PS] for i in range(len(node.blocks))])
            stack.extend((child, prefix + node.key) for child in node.children.values())
        return result

    def evicted(self, n: int) -> None:
        before = self.cache.page_map()
        assert before == self.cached
        protected = self.protected()
        nodes = self.node_prefixes()
        freed = self.cache.evict(n)
        after = self.cache.page_map()
        assert after.items() <= before.items()
        dropped = before.keys() - after.keys()
        for p in after:  # still prefix-closed
            assert all(p[:j] in after for j in range(PS, len(p), PS))
        assert not dropped & protected, "evicted a locked prefix"
        gone = set(before.values()) - set(after.values())  # blocks that lost their last page
        assert freed == sum(1 for b in gone if self.refs[b] == 0)
        if n <= 0:
            assert not dropped
        if freed < n:
            assert set(after) <= protected, "stopped early with evictable prefixes left"
        dropped_nodes = [ps for ps in nodes if ps[0] in dropped]
        assert all(set(ps) <= dropped for ps in dropped_nodes), "evicted part of a node"
        if dropped_nodes:  # it stops once enough is freed: before its last node it had < n
            most = max(len({before[p] for p in ps if self.refs[before[p]] == 0}) for ps in dropped_nodes)
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
        groups = [m.pages[i : i + PAGES_PER_BLOCK] for i in range(0, len(m.pages), PAGES_PER_BLOCK)]
        shared = [g[0] if len(g) == PAGES_PER_BLOCK and len(set(g)) == 1 else None for g in groups]
        held = [b for b in shared if b is not None]
        for b in held:
            self.alloc.incref(b)
        self.refs.update(held)
        # Registered before allocating: its lock must protect its prefix from that eviction.
        r = Request(tokens, held, m.node, tuple(tokens[: m.num_tokens]))
        self.requests.append(r)
        new = self.allocated(_blocks_for(len(tokens)) - len(held))
        if new is None:  # could not admit it: undo, in the finishing order
            self.requests.remove(r)
            self.cache.unlock(m.node)
            self.release(held)
            return
        fresh = iter(new)
        r.table = [b if b is not None else next(fresh) for b in shared] + list(fresh)

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
            r.locked_prefix = tuple(r.tokens[: len(r.tokens) // PS * PS])

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
        assert self.cache.page_map() == self.cached
        assert self.cache.cached_blocks() == len(set(self.cached.values()))
        protected = self.protected()
        pinned_blocks = {self.cached[p] for p in protected}
        assert self.cache.evictable_blocks() == sum(
            1 for b in set(self.cached.values()) if b not in pinned_blocks and self.refs[b] == 0
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
