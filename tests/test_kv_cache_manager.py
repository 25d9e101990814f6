"""KVCacheManager: block accounting, page-granular prefix sharing with copy-on-write, forks.

The KV memory is simulated: each slot holds the token whose K/V it would hold, so a test can
read back what a sequence's block table points at. That is the trivially correct reference:
every computed position of every sequence, and every page of the prefix tree, must read back
its own token, whoever shared or copied what.
"""

from __future__ import annotations

import random

import pytest
from bare_sequences import bare_sequence
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from nanoinfer.engine.kv_cache_manager import KVCacheManager
from nanoinfer.engine.sequence import Sequence

BS = 8
PS = 2


class TokenStorage:
    """Simulated KV memory: ``data[block][offset]`` is the token whose K/V the slot holds."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.data: list[list[int | None]] = [[None] * block_size for _ in range(num_blocks)]
        self.copies: list[tuple[int, int, int, int]] = []

    def copy(self, src_block: int, dst_block: int, start: int, end: int) -> None:
        self.copies.append((src_block, dst_block, start, end))
        self.data[dst_block][start:end] = self.data[src_block][start:end]

    def read(self, table: list[int], length: int) -> list[int | None]:
        bs = self.block_size
        return [self.data[table[p // bs]][p % bs] for p in range(length)]


def make(num_blocks: int = 16, enabled: bool = True) -> tuple[KVCacheManager, TokenStorage]:
    storage = TokenStorage(num_blocks, BS)
    return KVCacheManager(storage, num_blocks, BS, PS, enable_prefix_cache=enabled), storage


def sequence(prompt: list[int], salt: str | None = None, rid: str = "r") -> Sequence:
    return bare_sequence(rid, prompt, salt=salt)


def compute(kv: KVCacheManager, storage: TokenStorage, seq: Sequence, n: int, cache: bool = True) -> None:
    """What a forward pass does to the KV: write seq's next n tokens where its table says."""
    assert kv.allocate_slots(seq, n)
    tokens, bs = seq.token_ids, kv.block_size
    tree_slots = kv.prefix_cache._slots  # white box: a cached page must never be overwritten
    for pos in range(seq.num_computed, seq.num_computed + n):
        block, offset = seq.block_table[pos // bs], pos % bs
        assert kv.held_refs()[block] == 1, f"writing into block {block}, which another sequence holds"
        assert (block, offset - offset % PS) not in tree_slots, f"overwriting cached page at {(block, offset)}"
        storage.data[block][offset] = tokens[pos]
    seq.num_computed += n
    if cache:
        kv.cache(seq)


def run_prompt(kv: KVCacheManager, storage: TokenStorage, prompt: list[int], salt: str | None = None) -> Sequence:
    """Admit a sequence and compute its whole prompt in one chunk."""
    seq = sequence(prompt, salt)
    n = kv.admit(seq, 10_000)
    assert n == len(prompt) - seq.num_computed
    compute(kv, storage, seq, n)
    assert storage.read(seq.block_table, len(seq)) == prompt
    return seq


# -------------------------------------------------------------------------- unit tests


def test_page_size_is_capped_at_the_block_and_must_divide_it() -> None:
    assert KVCacheManager(TokenStorage(1, 4), 1, 4, page_size=16).page_size == 4
    with pytest.raises(ValueError, match="divide"):
        KVCacheManager(TokenStorage(1, 12), 1, 12, page_size=8)


def test_admit_without_a_hit_allocates_the_first_chunk_only() -> None:
    kv, _ = make()
    seq = sequence(list(range(20)))
    assert kv.admit(seq, 10) == 10
    assert (seq.num_computed, len(seq.block_table)) == (0, 2)
    assert kv.usage().in_use == 2
    kv.check_integrity()


def test_full_blocks_are_shared_and_the_tail_is_copied() -> None:
    kv, storage = make()
    first = run_prompt(kv, storage, list(range(100, 120)))  # 20 tokens: blocks 0, 1 full, 2 half
    prompt = list(range(100, 113)) + [7, 7, 7]  # shares 13 tokens: 12 of them in whole pages
    second = sequence(prompt)
    assert kv.admit(second, 100) == 4
    assert second.num_computed == 12
    assert second.block_table[0] == first.block_table[0]  # block 0: 4 pages of one block, shared
    assert second.block_table[1] != first.block_table[1]  # block 1: 2 of 4 pages matched, copied
    assert storage.copies == [(first.block_table[1], second.block_table[1], 0, 4)]
    assert storage.read(second.block_table, 12) == prompt[:12]
    assert kv.allocator.refcount(first.block_table[0]) == 3  # first, second, the tree
    kv.check_integrity()


def test_a_branch_inside_a_block_is_copied_from_both_sources() -> None:
    kv, storage = make()
    trunk = list(range(100, 116))
    a = run_prompt(kv, storage, trunk)
    b = run_prompt(kv, storage, trunk[:4] + list(range(200, 212)))  # branches at page 2 of block 0
    assert b.num_computed == 16 and storage.copies == [(a.block_table[0], b.block_table[0], 0, 4)]
    storage.copies.clear()
    c = sequence(trunk[:4] + list(range(200, 212)) + [5])
    assert kv.admit(c, 100) == 1
    # Block 0's pages come from a (tokens 0-3) and b (4-7): copied in two runs; block 1 is b's alone.
    assert storage.copies == [(a.block_table[0], c.block_table[0], 0, 4), (b.block_table[0], c.block_table[0], 4, 8)]
    assert c.block_table[1] == b.block_table[1]
    assert storage.read(c.block_table, 16) == c.token_ids[:16]
    kv.check_integrity()


def test_pages_of_a_partial_block_are_cached_while_its_owner_keeps_writing() -> None:
    kv, storage = make()
    owner = run_prompt(kv, storage, list(range(100, 112)))  # 12 tokens: block 1 holds 4
    other = sequence(list(range(100, 112)) + [9])
    kv.admit(other, 100)
    assert other.num_computed == 12 and other.block_table[1] != owner.block_table[1]  # copied
    for token in (50, 51, 52):  # the owner decodes into the rest of its block 1
        owner.append_token(token)
        compute(kv, storage, owner, 1, cache=False)
    assert storage.read(other.block_table, 12) == other.token_ids[:12]
    assert storage.read(owner.block_table, 15) == owner.token_ids[:15]
    kv.check_integrity()


def test_fork_shares_full_blocks_and_copies_the_partial_one() -> None:
    kv, storage = make()
    parent = run_prompt(kv, storage, list(range(100, 111)))  # 11 tokens: block 1 holds 3
    child = sequence(parent.prompt_ids, rid="r-1")
    assert kv.fork(parent, child)
    assert child.block_table[0] == parent.block_table[0]
    assert child.block_table[1] != parent.block_table[1]
    assert storage.copies[-1] == (parent.block_table[1], child.block_table[1], 0, 3)
    assert child.num_computed == 11 and child.prefix_node is parent.prefix_node
    for seq, token in ((parent, 1), (child, 2)):  # each writes its own next token
        seq.append_token(token)
        compute(kv, storage, seq, 1, cache=False)
    assert storage.read(parent.block_table, 12) == parent.token_ids
    assert storage.read(child.block_table, 12) == child.token_ids
    kv.free(child, cache=True)
    kv.free(parent, cache=True)
    kv.check_integrity()
    assert kv.usage().in_use == 0


def test_fork_of_whole_blocks_copies_nothing() -> None:
    kv, storage = make()
    parent = run_prompt(kv, storage, list(range(100, 116)))
    child = sequence(parent.prompt_ids)
    copies = len(storage.copies)
    assert kv.fork(parent, child) and child.block_table == parent.block_table
    assert len(storage.copies) == copies
    kv.check_integrity()


def test_fork_without_a_free_block_changes_nothing() -> None:
    kv, storage = make(num_blocks=2)
    parent = run_prompt(kv, storage, list(range(100, 111)))  # holds both blocks
    child = sequence(parent.prompt_ids)
    assert not kv.fork(parent, child)
    assert child.block_table == [] and child not in kv.holders
    kv.check_integrity()


def test_admit_evicts_cached_prefixes_and_fails_cleanly_when_short() -> None:
    kv, storage = make(num_blocks=4)
    done = run_prompt(kv, storage, list(range(100, 124)))  # 3 blocks
    kv.free(done, cache=True)
    assert kv.usage().cached_only == 3
    seq = sequence(list(range(200, 232)))  # 4 blocks: needs the cached ones evicted
    assert kv.admit(seq, 100) == 32
    assert kv.usage() == type(kv.usage())(total=4, free=0, in_use=4, cached_only=0)
    short = sequence([1, 2, 3])
    assert kv.admit(short, 100) is None
    assert short.block_table == [] and short.prefix_node is None and short not in kv.holders
    assert kv.prefix_cache.root.lock_count == 1  # only seq's lock
    kv.check_integrity()


def test_admit_keeps_the_matched_prefix_while_evicting_for_the_rest() -> None:
    kv, storage = make(num_blocks=4)
    done = run_prompt(kv, storage, list(range(100, 116)))  # 2 blocks cached
    cached = list(done.block_table)
    kv.free(done, cache=True)
    seq = sequence(list(range(100, 116)) + list(range(300, 316)) + [1])  # shares 2, needs 3 more
    assert kv.admit(seq, 100) is None  # 2 free: evicting its own prefix is not allowed
    assert kv.usage().cached_only == 2
    assert kv.admit(seq, 15) == 15  # a smaller first chunk fits
    assert seq.num_computed == 16 and seq.block_table[:2] == cached
    kv.check_integrity()


def test_free_caches_only_when_asked() -> None:
    kv, storage = make()
    preempted = run_prompt(kv, storage, list(range(100, 105)))
    preempted.append_token(7)
    compute(kv, storage, preempted, 1, cache=False)
    kv.free(preempted, cache=False)  # the prompt's pages went in at compute; the decoded one did not
    assert kv.prefix_cache.match_prefix(list(range(100, 105)) + [7]).num_tokens == 4
    finished = run_prompt(kv, storage, list(range(200, 205)))
    finished.append_token(7)
    compute(kv, storage, finished, 1, cache=False)
    kv.free(finished, cache=True)
    assert kv.prefix_cache.match_prefix(list(range(200, 205)) + [7]).num_tokens == 6
    assert (preempted.block_table, preempted.num_computed, preempted.prefix_node) == ([], 0, None)
    kv.check_integrity()
    assert kv.usage().in_use == 0


def test_disabled_prefix_cache_shares_nothing() -> None:
    kv, storage = make(enabled=False)
    first = run_prompt(kv, storage, list(range(100, 120)))
    second = sequence(list(range(100, 120)))
    kv.admit(second, 100)
    assert second.num_computed == 0 and not set(second.block_table) & set(first.block_table)
    kv.free(first, cache=True)
    assert kv.usage().cached_only == 0 and kv.prefix_cache.cached_blocks() == 0
    kv.check_integrity()


def test_salts_share_only_within_their_namespace() -> None:
    kv, storage = make()
    run_prompt(kv, storage, list(range(100, 120)), salt="a")
    other = sequence(list(range(100, 120)), salt="b")
    kv.admit(other, 100)
    same = sequence(list(range(100, 120)), salt="a")
    kv.admit(same, 100)
    assert (other.num_computed, same.num_computed) == (0, 18)
    kv.check_integrity()


def test_check_integrity_catches_a_leaked_reference() -> None:
    kv, storage = make()
    seq = run_prompt(kv, storage, list(range(100, 120)))
    kv.check_integrity()
    kv.allocator.incref(seq.block_table[0])
    with pytest.raises(AssertionError, match="refcount"):
        kv.check_integrity()


def test_reuse_is_page_granular_for_many_prefix_lengths() -> None:
    """A shared prefix of n tokens reuses n rounded down to whole pages (at least n - PS + 1)."""
    rng = random.Random(0)
    for n in range(1, 40):
        kv, storage = make(num_blocks=32)
        shared = [rng.randrange(100, 200) for _ in range(n)]
        first = run_prompt(kv, storage, shared + [1, 1, 1])
        kv.free(first, cache=True)
        second = run_prompt(kv, storage, shared + [2, 2])
        assert second.num_computed == len(second)
        assert kv.prefix_cache.hit_tokens == n // PS * PS
        kv.check_integrity()


# ------------------------------------------------------------- stateful property test

NUM_BLOCKS = 10
MACHINE_BS = 4  # two pages a block: branches inside a block, and so mixed-source blocks, are common
tokens_st = st.lists(st.integers(0, 1), min_size=1, max_size=14)  # few values: prefixes collide often


class KVCacheManagerMachine(RuleBasedStateMachine):
    """Random admissions, chunked prefills, decodes, forks, finishes, preemptions and evictions.

    Invariants: the accounting is exact (``check_integrity``); every holder's computed
    positions and every cached page read back their own tokens from the simulated storage; a
    sequence's cached length after admission is the longest whole-page prefix of prompt[:-1]
    the tree held; the blocks it shares are exactly the fully matched single-source ones.
    """

    def __init__(self) -> None:
        super().__init__()
        self.storage = TokenStorage(NUM_BLOCKS, MACHINE_BS)
        self.kv = KVCacheManager(self.storage, NUM_BLOCKS, MACHINE_BS, PS)
        self.running: list[Sequence] = []
        self.rng = random.Random(0)

    # ---- rules

    @rule(tokens=tokens_st, salt=st.sampled_from([None, None, "s"]), budget=st.integers(1, 24))
    def admit(self, tokens: list[int], salt: str | None, budget: int) -> None:
        seq = sequence(tokens, salt)
        pages = self.kv.prefix_cache.page_map(salt)
        expected = 0
        while expected + PS <= len(tokens) - 1 and tuple(tokens[: expected + PS]) in pages:
            expected += PS
        n = self.kv.admit(seq, budget)
        if n is None:
            assert seq not in self.kv.holders and not seq.block_table
            return
        assert n == min(len(tokens) - expected, budget) and seq.num_computed == expected
        bs = MACHINE_BS
        for i in range(-(-expected // bs)):  # the match's logical blocks
            sources = {pages[tuple(tokens[: d + PS])] for d in range(i * bs, min((i + 1) * bs, expected), PS)}
            if (i + 1) * bs <= expected and len(sources) == 1:
                assert seq.block_table[i] in sources, "a whole block matched from one block is shared"
            else:
                assert self.kv.allocator.refcount(seq.block_table[i]) == 1, "a partial or mixed block is copied"
        self.running.append(seq)
        self.compute(seq, n)

    def compute(self, seq: Sequence, n: int) -> None:
        compute(self.kv, self.storage, seq, n, cache=n > 1)

    @precondition(lambda self: self.running)
    @rule(i=st.integers(0, 100), budget=st.integers(1, 24), token=st.integers(0, 2))
    def step(self, i: int, budget: int, token: int) -> None:
        """Compute the next chunk of a sequence, sampling a token when it has computed everything."""
        seq = self.running[i % len(self.running)]
        if seq.num_pending == 0:
            if len(seq) >= 40:
                return
            seq.append_token(token)
        n = min(seq.num_pending, budget)
        if not self.kv.allocate_slots(seq, n):
            self.kv.free(seq, cache=False)  # preempted: it would recompute from a fresh admit
            self.running.remove(seq)
            return
        self.compute(seq, n)

    @precondition(lambda self: any(s.num_pending == 0 for s in self.running))
    @rule(i=st.integers(0, 100))
    def fork(self, i: int) -> None:
        parents = [s for s in self.running if s.num_pending == 0]
        parent = parents[i % len(parents)]
        child = sequence(parent.token_ids, parent.cache_salt)
        if self.kv.fork(parent, child):
            assert self.storage.read(child.block_table, len(child)) == child.token_ids
            self.running.append(child)

    @precondition(lambda self: self.running)
    @rule(i=st.integers(0, 100), keep=st.booleans())
    def finish(self, i: int, keep: bool) -> None:
        self.kv.free(self.running.pop(i % len(self.running)), cache=keep)

    @rule(n=st.integers(0, 4))
    def evict(self, n: int) -> None:
        self.kv.evict(n)

    # ---- invariants

    @invariant()
    def accounting_is_exact(self) -> None:
        self.kv.check_integrity()
        assert set(self.kv.holders) == set(self.running)
        usage = self.kv.usage()
        assert usage.free + usage.in_use + usage.cached_only == usage.total == NUM_BLOCKS

    @invariant()
    def every_kv_reads_back_its_own_tokens(self) -> None:
        for seq in self.running:
            assert self.storage.read(seq.block_table, seq.num_computed) == seq.token_ids[: seq.num_computed]
        for salt in (None, "s"):
            for prefix, block in self.kv.prefix_cache.page_map(salt).items():
                start = (len(prefix) - PS) % MACHINE_BS
                assert self.storage.data[block][start : start + PS] == list(prefix[-PS:])

    def teardown(self) -> None:
        for seq in self.running:
            self.kv.free(seq, cache=True)
        self.kv.evict(NUM_BLOCKS)
        assert self.kv.usage().free == NUM_BLOCKS
        self.kv.check_integrity()


KVCacheManagerMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_kv_cache_manager_state_machine = KVCacheManagerMachine.TestCase
