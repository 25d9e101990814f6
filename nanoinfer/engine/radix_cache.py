"""Radix prefix cache over KV blocks: requests that share a prompt prefix share its KV blocks.

A compressed radix tree whose edges are token-id sequences. Everything happens at *block*
granularity: an edge's length is a positive multiple of ``block_size`` and its node stores one
KV block id per ``block_size`` tokens; nodes are split only at block boundaries. A trailing
partial block is never cached (its KV would be overwritten as the request keeps decoding).

Namespaces (``cache_salt``): every lookup and insertion names a salt, and each salt has its own
root, so requests with different salts never read or write each other's entries (multi-tenant
isolation: a hit would leak, through timing, that another tenant sent the same prefix). The
``None`` salt is the shared namespace, ``cache.root``. A block lives in at most one namespace.
Eviction, stats and ``reset`` span all namespaces (one global LRU order); a salted root is
dropped once its namespace is empty and unlocked, so one-off salts do not accumulate.

Reference ownership protocol (shared with ``BlockAllocator``)
------------------------------------------------------------
* The tree holds exactly one reference on every block stored in it, taken in ``insert`` and
  dropped in ``evict``/``reset``.
* A request holds one reference per entry of its block table. Blocks it gets from
  ``match_prefix`` are the tree's: the request must ``incref`` each of them itself. Blocks it
  allocates carry the reference ``allocate`` gave it.
* A request ``lock``s ``match.node`` for its lifetime, so that its prefix stays in the tree
  (eviction skips locked nodes) and can be shared with requests that arrive meanwhile.
* A request passes its own salt to every ``match_prefix``/``insert`` call; its nodes, and so
  its locks, stay inside that salt's namespace.

Serving a request::

    match = cache.match_prefix(prompt[:-1], salt)    # never the whole prompt: see match_prefix
    cache.lock(match.node)
    for b in match.blocks: allocator.incref(b)
    table = match.blocks + allocator.allocate(needed)   # on OutOfBlocks: cache.evict(), retry
    ... prefill prompt[match.num_tokens:], decode ...

Finishing it, in this order::

    cache.insert(tokens, table, salt)           # 1. tree increfs the blocks it newly stores
    cache.unlock(match.node)                    # 2. prefix becomes evictable again
    for b in table: allocator.decref(b)         # 3. release the request's own references

Insert must precede the decrefs, or a block the tree is about to adopt would already be free.
Blocks of the table that duplicate what the tree already held are not adopted, so step 3 frees
them; no special casing is needed.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from nanoinfer.engine.kv_cache import BlockAllocator


class RadixNode:
    """One edge of the tree and the node it leads to.

    Invariants (non-root): ``len(key) == len(blocks) * block_size > 0``; the parent's
    ``children`` maps ``key[:block_size]`` to this node; ``lock_count`` is ≥ 0 and ≤ the
    parent's; ``last_access`` is ≤ the parent's (touching a node touches its whole path).
    A node stands for the prefix ending at it, which a split never changes, so a node held by
    a request stays valid across splits.
    """

    __slots__ = ("key", "blocks", "children", "parent", "lock_count", "last_access", "evicted")

    def __init__(
        self,
        key: tuple[int, ...],
        blocks: list[int],
        parent: RadixNode | None,
        last_access: int,
        lock_count: int = 0,
    ) -> None:
        self.key = key
        self.blocks = blocks
        self.children: dict[tuple[int, ...], RadixNode] = {}
        self.parent = parent
        self.lock_count = lock_count
        self.last_access = last_access
        self.evicted = False

    def __repr__(self) -> str:
        return f"RadixNode(key={self.key}, blocks={self.blocks}, lock={self.lock_count})"


class _RootNode(RadixNode):
    """The root of one namespace. It knows its salt so that ``unlock`` and ``evict``, which
    only see nodes, can drop the namespace once it is empty and unlocked."""

    __slots__ = ("salt",)

    def __init__(self, salt: str | None, last_access: int) -> None:
        super().__init__((), [], None, last_access)
        self.salt = salt

    def __repr__(self) -> str:
        return f"RadixRoot(salt={self.salt!r}, children={len(self.children)}, lock={self.lock_count})"


@dataclass(frozen=True)
class PrefixMatch:
    """Result of ``match_prefix``: the blocks of the longest cached prefix (the tree's
    references, not the caller's), its length in tokens (a multiple of block_size), and the
    node ending that prefix (the salt's root when nothing matched), for ``lock``/``unlock``."""

    blocks: list[int]
    num_tokens: int
    node: RadixNode


class InsertResult(NamedTuple):
    """Result of ``insert_with_node``: how many leading tokens were already cached, and the
    node ending the inserted full-block prefix (a caller may lock it)."""

    num_cached_tokens: int
    node: RadixNode


class RadixCache:
    """Block-granular radix tree of cached KV prefixes with LRU eviction of unlocked leaves.

    With ``enabled=False`` (``--no-prefix-cache``) nothing is ever stored: ``match_prefix``
    returns an empty match on the root and ``insert`` returns 0, so callers need no branches.

    One root per salt (see the module docstring); ``root`` is the ``None`` salt's, which always
    exists. Salted roots are created on first use and dropped when empty and unlocked.
    """

    def __init__(self, allocator: BlockAllocator, block_size: int, enabled: bool = True) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}")
        self.allocator = allocator
        self.block_size = block_size
        self.enabled = enabled
        self._clock = 0  # logical time: deterministic, and no ties from a coarse wall clock
        self._roots: dict[str | None, _RootNode] = {None: _RootNode(None, last_access=0)}
        self._tree_blocks: set[int] = set()  # over all namespaces: a block is in at most one
        self.queried_tokens = 0
        self.hit_tokens = 0

    @property
    def root(self) -> RadixNode:
        """Root of the shared (``None`` salt) namespace."""
        return self._roots[None]

    def num_namespaces(self) -> int:
        """Roots currently held, the shared one included (a leak check for one-off salts)."""
        return len(self._roots)

    # ----------------------------------------------------------------- lookup and insertion

    def match_prefix(self, token_ids: Sequence[int], salt: str | None = None) -> PrefixMatch:
        """Longest cached prefix of ``token_ids`` made of whole blocks, within ``salt``'s
        namespace only; marks its path as used.

        Never matches more than ``len(token_ids)`` tokens. Callers pass ``prompt[:-1]``: the
        last prompt token must still go through the model to produce the first output logits,
        so a fully matched prompt would leave nothing to compute. May split a node so that the
        returned node ends exactly at the match. Lock the node at once: an unlocked empty
        namespace may be dropped by the next ``evict``.
        """
        self.queried_tokens += len(token_ids)
        if not self.enabled:
            return PrefixMatch([], 0, self.root)
        tokens = self._full_blocks(token_ids)
        node, matched = self._descend(self._root_for(salt), tokens, self._tick())
        self.hit_tokens += matched
        return PrefixMatch(self._path_blocks(node), matched, node)

    def insert(self, token_ids: Sequence[int], blocks: Sequence[int], salt: str | None = None) -> int:
        """Cache the full-block prefix of ``token_ids`` in ``salt``'s namespace, its KV living
        in ``blocks`` (one per block_size tokens; a trailing partial block is ignored). Returns
        how many leading tokens were already cached: the caller's blocks for those are not
        adopted."""
        result = self.insert_with_node(token_ids, blocks, salt)
        # Nobody can lock the node now, so a namespace left empty (nothing to insert) goes.
        self._drop_if_unused(self._root_of(result.node))
        return result.num_cached_tokens

    def insert_with_node(
        self, token_ids: Sequence[int], blocks: Sequence[int], salt: str | None = None
    ) -> InsertResult:
        """``insert``, also returning the node that ends the inserted prefix.

        The tree increfs each block it newly stores. Raises ValueError, before changing any
        reference count, when ``blocks`` is too short, or a block to adopt is free or
        already stored anywhere in the tree, in any namespace (a caller bug that would corrupt
        sharing, or leak a block across salts).
        """
        if not self.enabled:
            return InsertResult(0, self.root)
        tokens = self._full_blocks(token_ids)
        num_full = len(tokens) // self.block_size
        if len(blocks) < num_full:
            raise ValueError(f"{len(tokens)} full-block tokens need {num_full} blocks, got {len(blocks)}")
        node, cached = self._descend(self._root_for(salt), tokens, self._tick())
        if cached < len(tokens):
            new_blocks = list(blocks[cached // self.block_size : num_full])
            self._check_adoptable(new_blocks)
            for block in new_blocks:
                self.allocator.incref(block)
            self._tree_blocks.update(new_blocks)
            leaf = RadixNode(tokens[cached:], new_blocks, node, last_access=node.last_access)
            node.children[leaf.key[: self.block_size]] = leaf
            node = leaf
        return InsertResult(cached, node)

    # ------------------------------------------------------------------------------ locking

    def lock(self, node: RadixNode) -> None:
        """Protect ``node`` and its ancestors from eviction (counts nest; a namespace's root
        counts all its outstanding locks, which also keeps the namespace alive). Lock a match's
        node right away: an unlocked node may be evicted."""
        if node.evicted:
            raise ValueError("cannot lock an evicted node; lock right after match_prefix")
        current: RadixNode | None = node
        while current is not None:
            current.lock_count += 1
            current = current.parent

    def unlock(self, node: RadixNode) -> None:
        """Undo one ``lock(node)``; drops the namespace if that leaves it empty and unlocked."""
        if node.lock_count <= 0:
            raise ValueError("unlock of a node that is not locked")
        current: RadixNode | None = node
        root = node
        while current is not None:
            current.lock_count -= 1
            root, current = current, current.parent
        self._drop_if_unused(root)

    # ----------------------------------------------------------------------------- eviction

    def evict(self, num_blocks: int) -> int:
        """Evict least-recently-used unlocked leaves until at least ``num_blocks`` blocks have
        been freed or nothing is evictable; returns the number freed.

        Evicting a node drops the tree's reference on each of its blocks; only blocks whose
        count thereby reaches 0 count as freed (a block a request still holds stays allocated).
        A parent becomes a candidate once its last child is gone. Since a parent is never
        older than its children and all namespaces share one clock, the order is global LRU
        over unlocked nodes of every namespace. Namespaces left empty and unlocked are dropped.
        """
        if num_blocks <= 0:
            return 0
        order = itertools.count()  # tie-break: equal times pop in tree order, never compare nodes
        heap = [(n.last_access, next(order), n) for n in self._nodes() if self._is_evictable_leaf(n)]
        heapq.heapify(heap)
        freed = 0
        while freed < num_blocks and heap:
            _, _, node = heapq.heappop(heap)
            parent = node.parent
            freed += self._remove_leaf(node)
            if parent is not None and self._is_evictable_leaf(parent):
                heapq.heappush(heap, (parent.last_access, next(order), parent))
        # Also sweeps roots a match_prefix created but nobody locked (they never see an unlock).
        for root in list(self._roots.values()):
            self._drop_if_unused(root)
        return freed

    def evictable_blocks(self) -> int:
        """Blocks that evicting everything unlocked would free: blocks of unlocked nodes that
        only the tree references. O(tree size)."""
        return sum(
            1
            for node in self._nodes()
            if node.lock_count == 0 and node.parent is not None
            for block in node.blocks
            if self.allocator.refcount(block) == 1
        )

    def cached_blocks(self) -> int:
        """Blocks stored in the tree (each holds one tree reference)."""
        return len(self._tree_blocks)

    def reset(self) -> None:
        """Drop every namespace and its references, and zero the stats. Refuses while any node
        is locked: running requests would be left holding nodes of a tree that is gone."""
        locks = sum(root.lock_count for root in self._roots.values())
        if locks:
            raise RuntimeError(f"cannot reset the prefix cache with {locks} locks held")
        shared = self.root
        for node in self._nodes():
            node.evicted = node is not shared
            for block in node.blocks:
                self.allocator.decref(block)
        self._roots = {None: _RootNode(None, last_access=self._clock)}
        self._tree_blocks.clear()
        self.queried_tokens = 0
        self.hit_tokens = 0

    # --------------------------------------------------------------------- stats, debugging

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0

    def block_map(self, salt: str | None = None) -> dict[tuple[int, ...], int]:
        """Every full-block prefix cached in ``salt``'s namespace mapped to the block holding
        its last block_size tokens (empty for an unknown salt). For tests and debugging:
        O(sum of cached prefix lengths)."""
        result: dict[tuple[int, ...], int] = {}
        root = self._roots.get(salt)
        if root is None:
            return result
        stack: list[tuple[RadixNode, tuple[int, ...]]] = [(root, ())]
        while stack:
            node, prefix = stack.pop()
            for i, block in enumerate(node.blocks):
                result[prefix + node.key[: (i + 1) * self.block_size]] = block
            prefix += node.key
            stack.extend((child, prefix) for child in node.children.values())
        return result

    def check_integrity(self, in_use_refs: dict[int, int] | None = None) -> None:
        """Raise AssertionError unless the tree and the allocator agree.

        Checks the structure (see RadixNode) of every namespace, that no block is stored twice
        (within or across namespaces), that every tree block has count ≥ 1, and
        ``free + cached_only + in_use == total``. With
        ``in_use_refs`` (block -> references held by requests), also that every block's count
        is exactly the tree's share (0 or 1) plus the requests'.
        """
        allocator = self.allocator
        allocator.check_integrity()
        for salt, root in self._roots.items():
            _require(isinstance(root, _RootNode) and root.salt == salt, f"root filed under {salt!r}: {root}")
            _require(root.parent is None and not root.blocks, f"root with a parent or blocks: {root}")
        seen: set[int] = set()
        for node in self._nodes():
            self._check_node(node)
            for block in node.blocks:
                _require(block not in seen, f"block {block} stored twice in the tree")
                _require(allocator.refcount(block) >= 1, f"tree block {block} is free")
                seen.add(block)
        _require(seen == self._tree_blocks, "block index disagrees with the tree")
        cached_only = sum(1 for b in seen if allocator.refcount(b) == 1)
        in_use = sum(
            1 for b in range(allocator.num_total) if allocator.refcount(b) - (b in seen) > 0
        )
        _require(
            allocator.num_free + cached_only + in_use == allocator.num_total,
            f"free {allocator.num_free} + cached {cached_only} + in use {in_use} "
            f"!= total {allocator.num_total}",
        )
        if in_use_refs is not None:
            for block in range(allocator.num_total):
                expected = (block in seen) + in_use_refs.get(block, 0)
                _require(
                    allocator.refcount(block) == expected,
                    f"block {block}: refcount {allocator.refcount(block)} != expected {expected}",
                )
            _require(
                all(0 <= b < allocator.num_total for b in in_use_refs), "in_use_refs has bad block ids"
            )

    # -------------------------------------------------------------------------- internals

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def _full_blocks(self, token_ids: Sequence[int]) -> tuple[int, ...]:
        end = len(token_ids) - len(token_ids) % self.block_size
        return tuple(token_ids[:end])

    def _root_for(self, salt: str | None) -> _RootNode:
        """The namespace's root, created on first use (at the current time, so it is never
        older than the children it is about to get)."""
        root = self._roots.get(salt)
        if root is None:
            root = self._roots[salt] = _RootNode(salt, last_access=self._clock)
        return root

    def _root_of(self, node: RadixNode) -> RadixNode:
        while node.parent is not None:
            node = node.parent
        return node

    def _drop_if_unused(self, root: RadixNode) -> None:
        """Forget a salted namespace with no entries and no locks; the shared root stays."""
        if not isinstance(root, _RootNode) or root.salt is None or root.children or root.lock_count:
            return
        if self._roots.get(root.salt) is root:
            del self._roots[root.salt]
            root.evicted = True  # a stale match on it can no longer be locked

    def _descend(self, root: RadixNode, tokens: tuple[int, ...], now: int) -> tuple[RadixNode, int]:
        """Follow ``tokens`` (whole blocks) down from ``root`` as far as it is cached, splitting
        the last edge at the first differing block, and stamp the path with ``now``. Returns the
        node ending the match and the number of tokens matched."""
        bs = self.block_size
        node, i = root, 0
        node.last_access = now
        while i < len(tokens):
            child = node.children.get(tokens[i : i + bs])
            if child is None:
                break
            common = self._common_length(child.key, tokens, i)
            if common < len(child.key):
                child = self._split(child, common)
            child.last_access = now
            node, i = child, i + common
        return node, i

    def _common_length(self, key: tuple[int, ...], tokens: tuple[int, ...], start: int) -> int:
        """Length of the common prefix of ``key`` and ``tokens[start:]``, rounded down to whole
        blocks. At least one block, since the caller found the child by its first block."""
        limit = min(len(key), len(tokens) - start)
        n = self.block_size
        while n < limit and key[n] == tokens[start + n]:
            n += 1
        return n - n % self.block_size

    def _split(self, child: RadixNode, length: int) -> RadixNode:
        """Cut ``child``'s edge after ``length`` tokens (a block multiple); return the new upper
        node. The lower part keeps the object identity (it still ends the same prefix)."""
        bs = self.block_size
        parent = child.parent
        assert parent is not None
        # Every lock on child passed through the upper part, and so did every access.
        upper = RadixNode(
            child.key[:length],
            child.blocks[: length // bs],
            parent,
            last_access=child.last_access,
            lock_count=child.lock_count,
        )
        child.key = child.key[length:]
        child.blocks = child.blocks[length // bs :]
        child.parent = upper
        upper.children[child.key[:bs]] = child
        parent.children[upper.key[:bs]] = upper
        return upper

    def _path_blocks(self, node: RadixNode) -> list[int]:
        parts: list[list[int]] = []
        current: RadixNode | None = node
        while current is not None:
            parts.append(current.blocks)
            current = current.parent
        return [block for part in reversed(parts) for block in part]

    def _check_adoptable(self, new_blocks: list[int]) -> None:
        if len(set(new_blocks)) != len(new_blocks):
            raise ValueError(f"blocks to insert repeat an id: {new_blocks}")
        for block in new_blocks:
            if block in self._tree_blocks:
                raise ValueError(f"block {block} is already stored elsewhere in the prefix cache")
            if self.allocator.refcount(block) == 0:
                raise ValueError(f"cannot insert free block {block}: the caller must hold a reference")

    def _is_evictable_leaf(self, node: RadixNode) -> bool:
        # Roots (parent None) are never evicted; empty salted ones are dropped separately.
        return node.parent is not None and not node.children and node.lock_count == 0

    def _remove_leaf(self, node: RadixNode) -> int:
        """Detach a leaf and drop the tree's references; returns the blocks actually freed."""
        assert node.parent is not None
        del node.parent.children[node.key[: self.block_size]]
        node.evicted = True
        freed = 0
        for block in node.blocks:
            self._tree_blocks.discard(block)
            if self.allocator.decref(block) == 0:
                freed += 1
        return freed

    def _nodes(self) -> Iterator[RadixNode]:
        """Every node of every namespace, the shared one first, each root before its subtree,
        parents before children (pre-order, deterministic: roots in creation order)."""
        stack: list[RadixNode] = list(reversed(self._roots.values()))
        while stack:
            node = stack.pop()
            yield node
            stack.extend(reversed(list(node.children.values())))

    def _check_node(self, node: RadixNode) -> None:
        bs = self.block_size
        _require(node.lock_count >= 0, f"negative lock count on {node}")
        _require(not node.evicted, f"evicted node still in the tree: {node}")
        if node.parent is not None:
            _require(len(node.key) > 0, f"empty edge: {node}")
            _require(len(node.key) == len(node.blocks) * bs, f"key/blocks length mismatch: {node}")
        for first, child in node.children.items():
            _require(child.parent is node, f"bad parent pointer: {child}")
            _require(child.key[:bs] == first, f"child indexed under the wrong block: {child}")
            _require(child.lock_count <= node.lock_count, f"child locked more than parent: {child}")
            _require(child.last_access <= node.last_access, f"child newer than parent: {child}")


def _require(condition: bool, message: str) -> None:
    # Explicit raise, not `assert`: the check must also run under `python -O`.
    if not condition:
        raise AssertionError(message)
