"""Scheduler policy on its own: decode before prefill, the token budget, FCFS admission,
preemption by recompute of the newest sequence, eviction before preemption, forked siblings.

The KV memory is a stub (the scheduler never reads it); a step is what LLMEngine.step does
around the model: schedule, commit every chunk, append a token to every completed sequence.
"""

from __future__ import annotations

import pytest
from bare_sequences import bare_sequence

from nanoinfer.engine.kv_cache_manager import KVCacheManager
from nanoinfer.engine.scheduler import ScheduledChunk, Scheduler
from nanoinfer.engine.sequence import Sequence, SequenceStatus

BS = 4


class RecordingStorage:
    def __init__(self) -> None:
        self.copies: list[tuple[int, int, int, int]] = []

    def copy(self, src_block: int, dst_block: int, start: int, end: int) -> None:
        self.copies.append((src_block, dst_block, start, end))


def make(num_blocks: int = 32, max_num_seqs: int = 8, budget: int = 64) -> Scheduler:
    kv = KVCacheManager(RecordingStorage(), num_blocks, BS, page_size=2)
    return Scheduler(kv, max_num_seqs=max_num_seqs, max_num_batched_tokens=budget)


def seq(name: str, length: int, first: int = 0) -> Sequence:
    return bare_sequence(name, list(range(first, first + length)), max_tokens=100)


def step(scheduler: Scheduler) -> list[tuple[str, int]]:
    """One engine step without the model; returns (request id, tokens) per chunk, in order."""
    chunks = scheduler.schedule()
    for chunk in chunks:
        scheduler.commit(chunk)
        if chunk.seq.num_pending == 0:
            chunk.seq.append_token(7)
    scheduler.check_integrity()
    return [(c.seq.request_id, c.num_tokens) for c in chunks]


def test_a_lone_request_prefills_once_then_decodes() -> None:
    s = make()
    s.add(seq("a", 10))
    assert step(s) == [("a", 10)]
    assert step(s) == [("a", 1)]
    assert step(s) == [("a", 1)]


def test_decodes_come_before_prefills() -> None:
    s = make()
    s.add(seq("a", 6))
    step(s)
    s.add(seq("b", 9, first=100))
    assert step(s) == [("a", 1), ("b", 9)]
    assert step(s) == [("a", 1), ("b", 1)]


def test_token_budget_chunks_prefill() -> None:
    s = make(budget=8)
    s.add(seq("a", 5))
    step(s)
    s.add(seq("b", 20, first=100))
    assert step(s) == [("a", 1), ("b", 7)]  # the decode takes one token of the budget
    assert step(s) == [("a", 1), ("b", 7)]  # b continues where it stopped
    assert step(s) == [("a", 1), ("b", 6)]
    assert step(s) == [("a", 1), ("b", 1)]


def test_a_one_token_chunk_is_scheduled_with_the_decodes() -> None:
    s = make()
    s.add(seq("a", 9))
    step(s)
    s.finish(s.running[0], "stop")  # its 9 computed tokens stay cached: 8 in whole pages
    s.add(seq("b", 9))  # the same prompt: 8 tokens hit, 1 left
    s.add(seq("c", 5, first=100))
    chunks = s.schedule()
    assert [(c.seq.request_id, c.num_tokens) for c in chunks] == [("b", 1), ("c", 5)]
    assert chunks[0].seq.num_cached_prompt == 8


def test_fcfs_admission_waits_for_the_oldest() -> None:
    s = make(num_blocks=4)
    s.add(seq("a", 8))  # 2 blocks
    step(s)
    s.add(seq("big", 12, first=100))  # 3 blocks: only 1 is free after a's decode takes one
    s.add(seq("small", 2, first=200))  # would fit, but must not overtake
    assert step(s) == [("a", 1)]
    assert [x.request_id for x in s.waiting] == ["big", "small"]
    s.finish(s.running[0], "stop")
    assert step(s) == [("big", 12), ("small", 2)]  # a's cached blocks were evicted for big


def test_max_num_seqs_caps_the_running_batch() -> None:
    s = make(max_num_seqs=2)
    for i in range(3):
        s.add(seq(f"r{i}", 3, first=10 * i))
    assert step(s) == [("r0", 3), ("r1", 3)]
    assert [x.request_id for x in s.waiting] == ["r2"]


def test_preemption_recomputes_the_newest() -> None:
    s = make(num_blocks=5)
    s.add(seq("old", 8))  # 2 blocks
    s.add(seq("new", 8, first=100))  # 2 blocks
    assert step(s) == [("old", 8), ("new", 8)]
    # Both decode into slot 8 next: a third block each, and one is free. The newest yields.
    assert step(s) == [("old", 1)]
    assert s.num_preemptions == 1
    new = s.waiting[0]
    assert new.request_id == "new" and new.status is SequenceStatus.WAITING
    assert (new.block_table, new.num_computed, new.output_ids) == ([], 0, [7])
    assert s.kv.usage().cached_only == 2  # its prompt pages stay cached
    s.finish(s.running[0], "stop")
    # It recomputes prompt + output minus what is cached: its own 8 prompt tokens are.
    assert step(s) == [("new", 1)]
    assert new.num_cached_prompt == 0  # what its first admission reported stands


def test_eviction_comes_before_preemption() -> None:
    s = make(num_blocks=4)
    s.add(seq("done", 8, first=100))
    step(s)
    s.finish(s.running[0], "stop")  # 2 blocks now cached only
    s.add(seq("a", 8))
    assert step(s) == [("a", 8)]  # takes the 2 free blocks
    assert step(s) == [("a", 1)]  # needs a third: evicts, does not preempt itself
    assert s.num_preemptions == 0
    assert s.kv.usage().cached_only == 0


def test_forked_siblings_share_whole_blocks_and_copy_the_tail() -> None:
    s = make()
    parent = seq("a", 6)
    s.add(parent)
    (chunk,) = s.schedule()
    s.commit(chunk)
    siblings = [seq("a", 6), seq("a", 6)]
    assert s.add_forks(parent, siblings) == siblings
    assert all(x.status is SequenceStatus.RUNNING for x in siblings)
    for sib in siblings:
        assert sib.block_table[0] == parent.block_table[0]  # full block: shared
        assert sib.block_table[1] != parent.block_table[1]  # partial: copied
    assert s.kv.storage.copies == [(parent.block_table[1], x.block_table[1], 0, 2) for x in siblings]
    s.check_integrity()


def test_a_sibling_without_memory_waits_first_in_line() -> None:
    s = make(num_blocks=2)
    parent = seq("a", 6)
    s.add(parent)
    s.add(seq("b", 3, first=100))
    assert [c.seq for c in s.schedule()] == [parent]  # b waits: no memory
    s.commit(ScheduledChunk(parent, 6))
    sibling = seq("a", 6)
    assert s.add_forks(parent, [sibling]) == []
    assert s.waiting[0] is sibling and sibling.block_table == []
    s.check_integrity()


@pytest.mark.parametrize("where", ["waiting", "running"])
def test_finish_anywhere_releases_everything(where: str) -> None:
    s = make()
    x = seq("a", 9)
    s.add(x)
    if where == "running":
        step(s)
    s.finish(x, "abort")
    assert x.status is SequenceStatus.FINISHED and x.finish_reason == "abort"
    assert not s.running and not s.waiting and not s.kv.holders
    s.check_integrity()
    assert s.kv.usage().in_use == 0


def test_token_slice_is_token_ids_sliced() -> None:
    x = seq("a", 5)
    for token in (50, 51, 52):
        x.append_token(token)
    ids = x.token_ids
    for start in range(len(ids) + 1):
        for end in range(start, len(ids) + 1):
            assert x.token_slice(start, end) == ids[start:end]
