"""KVCacheManager: the one owner of KV block references (vLLM v1's name).

It gives sequences the blocks they need for a step, shares cached prefixes with them (the radix
tree, ``radix_cache.py``), forks n > 1 siblings, frees and evicts. Nothing else in the engine
changes a reference count: the scheduler decides *who* runs and asks the manager for memory.
The manager only does the accounting; moving KV data (copy-on-write) is the storage's job, behind
the small ``KVStorage`` protocol, so other layouts (MLA latents, draft-model caches, per-rank
shards) can plug in their own storage under the same accounting.

Pages and blocks
----------------
A block holds ``block_size`` tokens (long runs for decode attention); the prefix tree matches
in pages of ``page_size`` tokens (``EngineConfig.prefix_page_size``), so a shared prefix loses
fewer than ``page_size`` tokens of reuse. The page at token depth ``d`` lies at offset
``d % block_size`` of its block. Admitting a sequence with a matched prefix, each logical block

* fully covered by matched pages that all lie in one physical block is *shared* (incref): the
  block is full, so nobody will write to it again;
* only partly covered (the match's tail), or covered by pages of several blocks (a branch point
  inside the block), gets a fresh block into which the matched pages are *copied*, since the
  sequence writes its own tokens into the rest of it.

So a block is written only by the sequence that allocated it, at the offsets of its own tokens,
which is why a sequence may cache the whole pages of its still-partial last block.

Ownership and locking contract
------------------------------
* Every block a sequence's ``block_table`` lists carries one reference of that sequence's,
  taken in ``admit``/``allocate_slots``/``fork`` and dropped in ``free``. The tree holds one
  reference per block any of its pages names (see ``RadixCache``).
* A sequence holding blocks holds one lock on ``seq.prefix_node``, a node of the tree in its own
  salt's namespace: it keeps the pages it shares or copied from in the tree. ``admit`` locks the
  match before it evicts (so the match survives its own eviction); ``cache`` locks the new node
  before unlocking the old one; ``free`` inserts, then unlocks, then decrefs (insert first, or a
  block the tree is about to adopt would already be free).
* Eviction (LRU over unlocked leaves of the tree) runs only inside the manager, when a request
  for blocks finds too few free: cached-only blocks always go before the caller has to preempt.
* The manager knows every sequence holding blocks (``holders``), so ``check_integrity`` can
  verify every reference count exactly. Not thread-safe: the engine thread calls it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Protocol

from nanoinfer.engine.block_allocator import BlockAllocator
from nanoinfer.engine.radix_cache import RadixCache
from nanoinfer.engine.sequence import Sequence


class KVStorage(Protocol):
    """Physical KV memory, addressed by block id and offset (``PagedKVCache`` is one)."""

    def copy(self, src_block: int, dst_block: int, start: int, end: int) -> None:
        """Copy offsets ``[start, end)`` of ``src_block`` into the same offsets of ``dst_block``."""
        ...


@dataclass(frozen=True)
class KVUsage:
    """Where the blocks are: ``free + in_use + cached_only == total``."""

    total: int
    free: int
    in_use: int  # referenced by at least one sequence
    cached_only: int  # referenced by the prefix cache alone (evictable unless locked)


class KVCacheManager:
    """Block accounting for every sequence and the prefix cache (see the module docstring)."""

    def __init__(
        self,
        storage: KVStorage,
        num_blocks: int,
        block_size: int,
        page_size: int = 16,
        enable_prefix_cache: bool = True,
    ) -> None:
        page_size = min(page_size, block_size)  # small blocks (tests, --block-size 4) page per block
        if page_size < 1 or block_size % page_size:
            raise ValueError(f"prefix_page_size {page_size} must divide block_size {block_size}")
        self.storage = storage
        self.block_size = block_size
        self.page_size = page_size
        # Public for inspection (stats, tests, benchmarks); only the manager changes their counts.
        self.allocator = BlockAllocator(num_blocks)
        self.prefix_cache = RadixCache(self.allocator, block_size, page_size, enabled=enable_prefix_cache)
        self.holders: dict[Sequence, None] = {}  # sequences holding blocks, in admission order

    # ---- sequences -------------------------------------------------------------------------

    def admit(self, seq: Sequence, token_budget: int) -> int | None:
        """Give a sequence that holds nothing its cached prefix, and blocks for its first chunk of
        ``min(tokens left to compute, token_budget)`` tokens, which it returns. Sets
        ``seq.num_computed`` to the cached length. Returns None, holding nothing, when memory is
        short even after evicting (the match still counts in the hit statistics)."""
        assert not seq.block_table and seq.prefix_node is None, "admit of a sequence holding blocks"
        match = self.prefix_cache.match_prefix(seq.token_ids[:-1], seq.cache_salt)  # never all of it
        self.prefix_cache.lock(match.node)  # before evicting: what we share and copy must stay
        chunk = min(len(seq) - match.num_tokens, token_budget)
        plan = self._plan(match.pages)
        num_shared = sum(1 for group in plan if isinstance(group, int))
        needed = self._blocks_for(match.num_tokens + chunk) - num_shared
        if not self._make_free(needed):
            self.prefix_cache.unlock(match.node)
            return None
        fresh = iter(self.allocator.allocate(needed))
        table = []
        for group in plan:
            if isinstance(group, int):
                self.allocator.incref(group)
                table.append(group)
            else:
                table.append(self._copy_pages(group, next(fresh)))
        seq.block_table = table + list(fresh)
        seq.prefix_node = match.node
        seq.num_computed = match.num_tokens
        self.holders[seq] = None
        return chunk

    def allocate_slots(self, seq: Sequence, num_tokens: int) -> bool:
        """Extend ``seq``'s table to cover ``num_tokens`` more tokens, evicting cached-only blocks
        as needed. False, the table unchanged, when even that is not enough (the caller preempts)."""
        needed = self._blocks_for(seq.num_computed + num_tokens) - len(seq.block_table)
        if not self._make_free(needed):
            return False
        seq.block_table.extend(self.allocator.allocate(max(needed, 0)))
        return True

    def cache(self, seq: Sequence) -> None:
        """Cache the whole pages ``seq`` has computed, so sequences arriving now can share them,
        and move its lock to the node ending them."""
        tokens = seq.token_slice(0, seq.num_computed)
        node = self.prefix_cache.insert_with_node(tokens, seq.block_table, seq.cache_salt).node
        self.prefix_cache.lock(node)
        self.prefix_cache.unlock(seq.prefix_node)
        seq.prefix_node = node

    def fork(self, parent: Sequence, child: Sequence) -> bool:
        """Give ``child`` (holding nothing) ``parent``'s computed KV: the full blocks shared, the
        partial last one copied (copy-on-write: both will write their own tokens into it). False,
        changing nothing, when no block is free for that copy."""
        full, rest = divmod(parent.num_computed, self.block_size)
        if not self._make_free(1 if rest else 0):
            return False
        table = parent.block_table[:full]
        for block in table:
            self.allocator.incref(block)
        if rest:
            (own,) = self.allocator.allocate(1)
            self.storage.copy(parent.block_table[full], own, 0, rest)
            table.append(own)
        child.block_table = table
        child.num_computed = parent.num_computed
        child.prefix_node = parent.prefix_node
        self.prefix_cache.lock(child.prefix_node)
        self.holders[child] = None
        return True

    def trim(self, seq: Sequence) -> None:
        """Drop the blocks past ``seq.num_computed`` (slots of rejected speculative drafts): only
        ``seq`` references them, since they were allocated for this step."""
        keep = self._blocks_for(seq.num_computed)
        for block in seq.block_table[keep:]:
            self.allocator.decref(block)
        del seq.block_table[keep:]

    def free(self, seq: Sequence, cache: bool) -> None:
        """Release everything ``seq`` holds, caching its computed pages first when ``cache``
        (a finished or aborted sequence; a preempted one recomputes and caches nothing)."""
        if cache:
            self.prefix_cache.insert(seq.token_slice(0, seq.num_computed), seq.block_table, seq.cache_salt)
        self.prefix_cache.unlock(seq.prefix_node)
        for block in seq.block_table:
            self.allocator.decref(block)
        seq.block_table = []
        seq.prefix_node = None
        seq.num_computed = 0
        del self.holders[seq]

    # ---- memory ----------------------------------------------------------------------------

    def evict(self, num_blocks: int) -> int:
        """Evict cached-only prefixes (LRU) until ``num_blocks`` blocks are freed; returns how many were."""
        return self.prefix_cache.evict(num_blocks)

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (refuses while sequences hold locks)."""
        self.prefix_cache.reset()

    def usage(self) -> KVUsage:
        total, free = self.allocator.num_total, self.allocator.num_free
        in_use = len(self.held_refs())
        return KVUsage(total, free, in_use, total - free - in_use)

    def held_refs(self) -> Counter[int]:
        """References each block has from sequences (not from the tree)."""
        refs: Counter[int] = Counter()
        for seq in self.holders:
            refs.update(seq.block_table)
        return refs

    def check_integrity(self) -> None:
        """Raise AssertionError unless every reference is accounted for: the tree's and the
        holders' references are exactly each block's count, and free + cached_only + in_use ==
        total; every holder's table covers its computed tokens and it holds a live lock."""
        self.prefix_cache.check_integrity(dict(self.held_refs()))
        for seq in self.holders:
            node = seq.prefix_node
            if node is None or node.evicted or node.lock_count < 1:
                raise AssertionError(f"sequence {seq.request_id}/{seq.index} holds no live lock")
            if len(seq.block_table) * self.block_size < seq.num_computed:
                raise AssertionError(f"sequence {seq.request_id}/{seq.index}: table shorter than its KV")

    # ---- internals -------------------------------------------------------------------------

    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _make_free(self, needed: int) -> bool:
        """Evict until ``needed`` blocks are free; False if that is impossible."""
        if needed > self.allocator.num_free:
            self.prefix_cache.evict(needed - self.allocator.num_free)
        return needed <= self.allocator.num_free

    def _plan(self, pages: list[int]) -> list[int | list[int]]:
        """Per logical block of a match: the block to share (an int), or the pages to copy (the
        block of each matched page in it) when the block is partly covered or mixes sources."""
        per_block = self.block_size // self.page_size
        plan: list[int | list[int]] = []
        for first in range(0, len(pages), per_block):
            group = pages[first : first + per_block]
            shareable = len(group) == per_block and all(b == group[0] for b in group)
            plan.append(group[0] if shareable else group)
        return plan

    def _copy_pages(self, group: list[int], dst: int) -> int:
        """Copy a logical block's matched pages into ``dst``, one storage call per run of pages
        from the same source block; returns ``dst``."""
        ps = self.page_size
        start = 0
        for i in range(1, len(group) + 1):
            if i == len(group) or group[i] != group[start]:
                self.storage.copy(group[start], dst, start * ps, i * ps)
                start = i
        return dst
