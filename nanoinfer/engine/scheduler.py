"""Scheduler: continuous batching over a paged KV pool with a prefix cache.

Each step mixes the decode tokens of every running sequence with chunked prefill of the oldest
waiting ones (first come, first served) under a token budget. Memory is the KVCacheManager's:
the scheduler asks it for blocks, and when it has none left (it evicts cached-only prefixes
first) the scheduler preempts the newest running sequence by recompute.

The scheduler owns the queues and each sequence's status; it never touches a block reference.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from nanoinfer.engine.kv_cache_manager import KVCacheManager
from nanoinfer.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledChunk:
    seq: Sequence
    num_tokens: int  # tokens computed this step, from seq.num_computed on (drafts included)
    num_draft: int = 0  # of those, speculative guesses after the sequence's last token

    @property
    def completes(self) -> bool:
        """True when this chunk reaches the end of the sequence, so a token is sampled."""
        return self.seq.num_computed + self.num_tokens == len(self.seq) + self.num_draft


class Scheduler:
    def __init__(
        self,
        kv: KVCacheManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        can_start: Callable[[Sequence], bool] | None = None,
    ) -> None:
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        # Whether a waiting sequence may start now beyond memory (its LoRA adapter needs a slot).
        self.can_start = can_start
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    # ---- queue -------------------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def add_forks(self, parent: Sequence, siblings: list[Sequence]) -> list[Sequence]:
        """n > 1: start ``siblings`` from ``parent``'s computed prompt (the manager shares or
        copies its blocks). Returns those now running, in order; a sibling the pool has no block
        for waits at the front of the queue and recomputes its prompt (prefix hits still apply)."""
        running = []
        for sib in siblings:
            if self.kv.fork(parent, sib):
                sib.num_cached_prompt = parent.num_cached_prompt
                sib.status = SequenceStatus.RUNNING
                self.running.append(sib)
                running.append(sib)
            else:
                self.waiting.appendleft(sib)
        return running

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step ----------------------------------------------------------------------------

    def schedule(self) -> list[ScheduledChunk]:
        """Choose this step's work: decode chunks first, then prefill chunks."""
        budget = self.max_num_batched_tokens
        decodes: list[ScheduledChunk] = []
        verifies: list[ScheduledChunk] = []  # decodes with drafts: after the one-token rows
        prefills: list[ScheduledChunk] = []
        for seq in list(self.running):
            if seq.status is not SequenceStatus.RUNNING or seq.num_pending != 1:
                continue  # preempted below, or still prefilling
            num_draft = len(seq.draft_ids)
            if num_draft and self.kv.allocate_slots(seq, 1 + num_draft):  # drafts never cost a preemption
                verifies.append(ScheduledChunk(seq, 1 + num_draft, num_draft))
                budget -= 1 + num_draft
            elif self._reserve(seq, 1):
                decodes.append(ScheduledChunk(seq, 1))
                budget -= 1
        for seq in list(self.running):
            if budget <= 0:
                break
            if seq.status is SequenceStatus.RUNNING and seq.num_pending > 1:
                n = min(seq.num_pending, budget)
                if self._reserve(seq, n):
                    prefills.append(ScheduledChunk(seq, n))
                    budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            if self.can_start is not None and not self.can_start(self.waiting[0]):
                break  # its adapter waits for a slot; keep FCFS order
            chunk = self._admit(self.waiting[0], budget)
            if chunk is None:
                break  # the oldest waiting request must wait for memory; keep FCFS order
            self.waiting.popleft()
            seq = chunk.seq
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            (decodes if chunk.num_tokens == 1 else prefills).append(chunk)
            budget -= chunk.num_tokens
        # a preempted sequence may already have been given a chunk earlier in this pass
        return [c for c in decodes + verifies + prefills if c.seq.status is SequenceStatus.RUNNING]

    def _admit(self, seq: Sequence, budget: int) -> ScheduledChunk | None:
        """The cached prefix and blocks for the first chunk; None if memory is short (no preemption
        to admit: running sequences go first)."""
        num_tokens = self.kv.admit(seq, budget)
        if num_tokens is None:
            return None
        if not seq.output_ids:  # a preempted sequence keeps what its first admission reported
            seq.num_cached_prompt = seq.num_computed
        return ScheduledChunk(seq, num_tokens)

    def _reserve(self, seq: Sequence, num_tokens: int) -> bool:
        """Make seq's block table cover num_tokens more tokens, preempting the newest running
        sequences while the manager (which evicts first) has too few blocks."""
        while not self.kv.allocate_slots(seq, num_tokens):
            victim = self._newest_running()
            self.preempt(victim)
            if victim is seq:
                return False
        return True

    def _newest_running(self) -> Sequence:
        return next(s for s in reversed(self.running) if s.status is SequenceStatus.RUNNING)

    def preempt(self, seq: Sequence) -> None:
        """Free seq's blocks and requeue it at the front; it recomputes (its prefix may still hit)."""
        self.kv.free(seq, cache=False)
        self.running.remove(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    # ---- after the forward pass ---------------------------------------------------------------

    def commit(self, chunk: ScheduledChunk) -> None:
        """Record that chunk's K/V are now in the cache; share computed prompt pages via the tree."""
        seq = chunk.seq
        computed = chunk.num_tokens - chunk.num_draft  # drafts count once verification keeps them
        seq.num_computed += computed
        if computed > 1:
            self.kv.cache(seq)

    def trim(self, seq: Sequence) -> None:
        """After verification: give back the blocks that only held rejected drafts."""
        if seq.status is SequenceStatus.RUNNING:
            self.kv.trim(seq)

    def decoding(self) -> list[Sequence]:
        """Running sequences whose next step is a decode (one token pending): they may speculate."""
        return [s for s in self.running if s.status is SequenceStatus.RUNNING and s.num_pending == 1]

    def finish(self, seq: Sequence, reason: str | None) -> None:
        """Retire seq: keep its computed pages in the prefix cache, drop its own references."""
        if seq.status is SequenceStatus.RUNNING:
            self.kv.free(seq, cache=True)
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    # ---- accounting ---------------------------------------------------------------------------

    def check_integrity(self) -> None:
        """The manager's accounting is exact, and exactly the running sequences hold blocks."""
        self.kv.check_integrity()
        if set(self.kv.holders) != set(self.running):
            raise AssertionError("the sequences holding blocks are not the running ones")
        if any(s.block_table for s in self.waiting):
            raise AssertionError("a waiting sequence holds blocks")
