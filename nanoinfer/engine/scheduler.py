"""Scheduler: continuous batching over a paged KV pool with a radix prefix cache.

Each step mixes the decode tokens of every running sequence with chunked prefill of the oldest
waiting ones (first come, first served) under a token budget. When blocks run out it evicts
cached-only prefixes first, then preempts the newest running sequence by recompute.

Block ownership: a sequence holds one reference on every block of its block table; the radix
tree holds one reference on every block it stores. A block is free when nobody references it.
Every prefix-cache call passes ``seq.cache_salt``, so sequences share cached blocks only within
one salt's namespace (multi-tenant isolation; ``None`` is the shared namespace).
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass

from nanoinfer.engine.kv_cache import BlockAllocator
from nanoinfer.engine.radix_cache import RadixCache
from nanoinfer.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledChunk:
    seq: Sequence
    num_tokens: int  # tokens computed this step, from seq.num_computed on

    @property
    def completes(self) -> bool:
        """True when this chunk reaches the end of the sequence, so a token is sampled."""
        return self.seq.num_computed + self.num_tokens == len(self.seq)


class Scheduler:
    def __init__(
        self,
        allocator: BlockAllocator,
        prefix_cache: RadixCache,
        block_size: int,
        max_num_seqs: int,
        max_num_batched_tokens: int,
    ):
        self.allocator = allocator
        self.prefix_cache = prefix_cache
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    # ---- queue -------------------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step ----------------------------------------------------------------------------

    def schedule(self) -> list[ScheduledChunk]:
        """Choose this step's work: decode chunks first, then prefill chunks."""
        budget = self.max_num_batched_tokens
        decodes: list[ScheduledChunk] = []
        prefills: list[ScheduledChunk] = []
        for seq in list(self.running):
            if seq.status is not SequenceStatus.RUNNING or seq.num_pending != 1:
                continue  # preempted below, or still prefilling
            if self._reserve(seq, 1, preempt=True):
                decodes.append(ScheduledChunk(seq, 1))
                budget -= 1
        for seq in list(self.running):
            if budget <= 0:
                break
            if seq.status is SequenceStatus.RUNNING and seq.num_pending > 1:
                n = min(seq.num_pending, budget)
                if self._reserve(seq, n, preempt=True):
                    prefills.append(ScheduledChunk(seq, n))
                    budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
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
        return [c for c in decodes + prefills if c.seq.status is SequenceStatus.RUNNING]

    def _admit(self, seq: Sequence, budget: int) -> ScheduledChunk | None:
        """Match the cached prefix, then reserve blocks for the first chunk; None if memory is short."""
        match = self.prefix_cache.match_prefix(seq.token_ids[:-1], seq.cache_salt)
        for block in match.blocks:
            self.allocator.incref(block)
        self.prefix_cache.lock(match.node)
        seq.block_table = list(match.blocks)
        seq.prefix_node = match.node
        seq.num_computed = match.num_tokens
        n = min(seq.num_pending, budget)
        if not self._reserve(seq, n, preempt=False):
            self._release(seq)
            return None
        if not seq.output_ids:
            seq.num_cached_prompt = match.num_tokens
        return ScheduledChunk(seq, n)

    def _reserve(self, seq: Sequence, num_tokens: int, preempt: bool) -> bool:
        """Make seq's block table cover num_tokens more tokens, evicting and preempting as allowed."""
        needed = -(-(seq.num_computed + num_tokens) // self.block_size) - len(seq.block_table)
        while needed > self.allocator.num_free:
            if self.prefix_cache.evict(needed - self.allocator.num_free) > 0:
                continue
            if not preempt:
                return False
            victim = self._newest_running()
            self.preempt(victim)
            if victim is seq:
                return False
        if needed > 0:
            seq.block_table.extend(self.allocator.allocate(needed))
        return True

    def _newest_running(self) -> Sequence:
        return next(s for s in reversed(self.running) if s.status is SequenceStatus.RUNNING)

    def preempt(self, seq: Sequence) -> None:
        """Free seq's blocks and requeue it at the front; it recomputes (its prefix may still hit)."""
        self._release(seq)
        self.running.remove(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    # ---- after the forward pass ---------------------------------------------------------------

    def commit(self, chunk: ScheduledChunk) -> None:
        """Record that chunk's K/V are now in the cache; share finished prompt blocks via the tree."""
        seq = chunk.seq
        seq.num_computed += chunk.num_tokens
        if chunk.num_tokens > 1:
            self._cache_computed(seq)

    def _cache_computed(self, seq: Sequence) -> None:
        """Insert the computed full blocks into the tree so concurrent requests can share them."""
        tokens = seq.token_ids[: seq.num_computed]
        node = self.prefix_cache.insert_with_node(tokens, seq.block_table, seq.cache_salt).node
        self.prefix_cache.lock(node)
        self.prefix_cache.unlock(seq.prefix_node)
        seq.prefix_node = node

    def finish(self, seq: Sequence, reason: str | None) -> None:
        """Retire seq: keep its computed blocks in the prefix cache, drop its own references."""
        if seq.status is SequenceStatus.RUNNING:
            self.prefix_cache.insert(seq.token_ids[: seq.num_computed], seq.block_table, seq.cache_salt)
            self._release(seq)
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def _release(self, seq: Sequence) -> None:
        for block in seq.block_table:
            self.allocator.decref(block)
        if seq.prefix_node is not None:
            self.prefix_cache.unlock(seq.prefix_node)
        seq.block_table = []
        seq.prefix_node = None
        seq.num_computed = 0

    # ---- accounting ---------------------------------------------------------------------------

    def block_refs_held(self) -> Counter:
        """References each block has from sequences (not from the tree)."""
        refs: Counter = Counter()
        for seq in self.running:
            refs.update(seq.block_table)
        return refs

    def check_integrity(self) -> None:
        """free + cached_only + in_use == total, and every reference accounted for."""
        self.prefix_cache.check_integrity(dict(self.block_refs_held()))
        assert all(not s.block_table for s in self.waiting), "a waiting sequence holds blocks"
