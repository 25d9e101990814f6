"""Radix prefix cache over KV pages: requests that share a prompt prefix share its KV.

A compressed radix tree whose edges are token-id sequences, matched in *pages* of ``page_size``
tokens, which need not be the KV block size: an edge's length is a positive multiple of
``page_size``, its node stores per page the KV block that holds it, and nodes split only at page
boundaries. Page ``j`` (tokens ``[j*page_size, (j+1)*page_size)`` of the prefix) always lies at
offset ``j*page_size % block_size`` of its block, where the request that computed it wrote it.
Several pages (up to ``block_size // page_size``, all of one logical block) may name the same
block, and a block may hold pages only in part: a request caches the whole pages of its
still-partial last block while it keeps writing the rest (see ``KVCacheManager`` for who may
share and who must copy such a block).

Namespaces (``cache_salt``): every lookup and insertion names a salt, and each salt has its own
root, so requests with different salts never read or write each other's entries (multi-tenant
isolation: a hit would leak, through timing, that another tenant sent the same prefix). The
``None`` salt is the shared namespace, ``cache.root``. A block's slots are cached at most once
in the whole tree, so a block cannot be adopted into a second namespace. Eviction, stats and
``reset`` span all namespaces (one global LRU order); a salted root is dropped once its
namespace is empty and unlocked, so one-off salts do not accumulate.

Reference ownership protocol (shared with ``BlockAllocator``; ``KVCacheManager`` is the only
caller in the engine)
------------------------------------------------------------------------------------------
* The tree holds exactly one allocator reference on every block that any of its pages names:
  it counts pages per block, increfs on the first page (0 -> 1, in ``insert``) and decrefs when
  the last one goes (1 -> 0, in ``evict``/``reset``).
* A request holds one reference per entry of its block table. ``match_prefix`` hands out the
  tree's blocks, not references: a request that shares one must ``incref`` it itself.
* A request ``lock``s ``match.node`` for its lifetime, so that its prefix stays in the tree
  (eviction skips locked nodes): the blocks it shares or copies from stay valid.
* A request passes its own salt to every ``match_prefix``/``insert`` call; its nodes, and so
  its locks, stay inside that salt's namespace.

Finishing a request, in this order::

    cache.insert(tokens, table, salt)           # 1. tree increfs blocks it starts to reference
    cache.unlock(node)                          # 2. prefix becomes evictable again
    for b in table: allocator.decref(b)         # 3. release the request's own references

Insert must precede the decrefs, or a block the tree is about to adopt would already be free.
Pages the tree already held are not adopted, so step 3 frees the request's duplicates.
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from nanoinfer.engine.block_allocator import BlockAllocator


class RadixNode:
    """One edge of the tree and the node it leads to.

    Invariants (non-root): ``len(key) == len(blocks) * page_size > 0`` (``blocks[i]`` holds the
    edge's page ``i``); ``end`` is the prefix length at this node (the parent's ``end`` plus
    ``len(key)``); the parent's ``children`` maps ``key[:page_size]`` to this node;
    ``lock_count`` is ≥ 0 and ≤ the parent's; ``last_access`` is ≤ the parent's (touching a node
    touches its whole path). A node stands for the prefix ending at it, which a split never
    changes, so a node held by a request stays valid across splits.
    """

    __slots__ = ("key", "blocks", "end", "children", "parent", "lock_count", "last_access", "evicted")

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
        self.end: int = (parent.end if parent is not None else 0) + len(key)
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
    """Result of ``match_prefix``: the block holding each matched page (``pages[j]`` holds tokens
    ``[j*page_size, (j+1)*page_size)``; the tree's references, not the caller's), the match's
    length in tokens (``len(pages) * page_size``), and the node ending it (the salt's root when
    nothing matched), for ``lock``/``unlock``."""

    pages: list[int]
    num_tokens: int
    node: RadixNode


class InsertResult(NamedTuple):
    """Result of ``insert_with_node``: how many leading tokens were already cached, and the
    node ending the inserted whole-page prefix (a caller may lock it)."""

    num_cached_tokens: int
    node: RadixNode


class RadixCache:
    """Page-granular radix tree of cached KV prefixes with LRU eviction of unlocked leaves.

    With ``enabled=False`` (``--no-prefix-cache``) nothing is ever stored: ``match_prefix``
    returns an empty match on the root and ``insert`` returns 0, so callers need no branches.

    One root per salt (see the module docstring); ``root`` is the ``None`` salt's, which always
    exists. Salted roots are created on first use and dropped when empty and unlocked.
    """

    def __init__(
        self, allocator: BlockAllocator, block_size: int, page_size: int | None = None, enabled: bool = True
    ) -> None:
        page_size = block_size if page_size is None else page_size
        if page_size < 1 or block_size % page_size:
            raise ValueError(f"page_size {page_size} must be a positive divisor of block_size {block_size}")
        self.allocator = allocator
        self.block_size = block_size
        self.page_size = page_size
        self.enabled = enabled
        self._clock = 0  # logical time: deterministic, and no ties from a coarse wall clock
        self._roots: dict[str | None, _RootNode] = {None: _RootNode(None, last_access=0)}
        self._pages_of: Counter[int] = Counter()  # block -> pages naming it (over all namespaces)
        self._slots: set[tuple[int, int]] = set()  # (block, token offset) of every cached page
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
        """Longest cached prefix of ``token_ids`` made of whole pages, within ``salt``'s
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
        tokens = self._whole_pages(token_ids)
        node, matched = self._descend(self._root_for(salt), tokens, self._tick())
        self.hit_tokens += matched
        return PrefixMatch(self._path_blocks(node), matched, node)

    def cached_prefix_length(self, token_ids: Sequence[int], salt: str | None = None) -> int:
        """How many leading tokens of ``token_ids`` (whole pages) ``salt``'s namespace holds, without
        touching anything: no LRU stamps, no splits, no stats.

        For a router on another thread while the engine thread changes the tree: it only reads
        dicts and tuples one lookup at a time, so it may see a tree halfway through a change and
        answer a little wrong, never raise (a lookup that races a change counts as no match)."""
        if not self.enabled:
            return 0
        tokens = self._whole_pages(token_ids)
        ps = self.page_size
        try:
            node: RadixNode | None = self._roots.get(salt)
            matched = 0
            while node is not None and matched < len(tokens):
                child = node.children.get(tokens[matched : matched + ps])
                if child is None:
                    break
                key = child.key  # read once: a split replaces it while we compare
                common = self._common_length(key, tokens, matched)
                matched += common
                if common < len(key):
                    break
                node = child
            return matched
        except (RuntimeError, KeyError, IndexError):
            return 0

    def insert(self, token_ids: Sequence[int], block_table: Sequence[int], salt: str | None = None) -> int:
        """Cache the whole pages of ``token_ids`` in ``salt``'s namespace, their KV living in
        ``block_table`` (one block per block_size tokens; a trailing partial page is ignored).
        Returns how many leading tokens were already cached: the caller's copies of those pages
        are not adopted."""
        result = self.insert_with_node(token_ids, block_table, salt)
        # Nobody can lock the node now, so a namespace left empty (nothing to insert) goes.
        self._drop_if_unused(self._root_of(result.node))
        return result.num_cached_tokens

    def insert_with_node(
        self, token_ids: Sequence[int], block_table: Sequence[int], salt: str | None = None
    ) -> InsertResult:
        """``insert``, also returning the node that ends the inserted prefix.

        The tree increfs each block it starts to reference. Raises ValueError, before changing
        any reference count, when ``block_table`` is too short, or a page to adopt lies in a
        free block or in a slot the tree already caches, in any namespace (a caller bug that
        would corrupt sharing, or leak a block across salts).
        """
        if not self.enabled:
            return InsertResult(0, self.root)
        tokens = self._whole_pages(token_ids)
        needed = -(-len(tokens) // self.block_size)
        if len(block_table) < needed:
            raise ValueError(f"{len(tokens)} whole-page tokens need {needed} blocks, got {len(block_table)}")
        node, cached = self._descend(self._root_for(salt), tokens, self._tick())
        if cached < len(tokens):
            ps, bs = self.page_size, self.block_size
            new_blocks = [block_table[d // bs] for d in range(cached, len(tokens), ps)]
            self._check_adoptable(new_blocks, cached)
            leaf = RadixNode(tokens[cached:], new_blocks, node, last_access=node.last_access)
            for i, block in enumerate(new_blocks):
                self._add_page(block, cached + i * ps)
            node.children[leaf.key[:ps]] = leaf
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

        Evicting a node drops its pages; a block whose last page goes loses the tree's
        reference, and counts as freed only if that was its last one (a block a request still
        holds stays allocated; so does one whose other pages are still cached). A parent
        becomes a candidate once its last child is gone. Since a parent is never older than its
        children and all namespaces share one clock, the order is global LRU over unlocked
        nodes of every namespace. Namespaces left empty and unlocked are dropped.
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
        """Blocks that evicting everything unlocked would free: blocks only the tree references
        whose pages all lie in unlocked nodes. O(tree size)."""
        locked = {b for node in self._nodes() if node.lock_count for b in node.blocks}
        return sum(1 for b in self._pages_of if b not in locked and self.allocator.refcount(b) == 1)

    def cached_blocks(self) -> int:
        """Blocks some page of the tree names (each holds one tree reference)."""
        return len(self._pages_of)

    def reset(self) -> None:
        """Drop every namespace and its references, and zero the stats. Refuses while any node
        is locked: running requests would be left holding nodes of a tree that is gone."""
        locks = sum(root.lock_count for root in self._roots.values())
        if locks:
            raise RuntimeError(f"cannot reset the prefix cache with {locks} locks held")
        shared = self.root
        for node in self._nodes():
            node.evicted = node is not shared
        for block in self._pages_of:
            self.allocator.decref(block)
        self._roots = {None: _RootNode(None, last_access=self._clock)}
        self._pages_of.clear()
        self._slots.clear()
        self.queried_tokens = 0
        self.hit_tokens = 0

    # --------------------------------------------------------------------- stats, debugging

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0

    def page_map(self, salt: str | None = None) -> dict[tuple[int, ...], int]:
        """Every whole-page prefix cached in ``salt``'s namespace mapped to the block holding
        its last page (empty for an unknown salt). For tests and debugging: O(sum of cached
        prefix lengths)."""
        result: dict[tuple[int, ...], int] = {}
        root = self._roots.get(salt)
        if root is None:
            return result
        stack: list[tuple[RadixNode, tuple[int, ...]]] = [(root, ())]
        while stack:
            node, prefix = stack.pop()
            for i, block in enumerate(node.blocks):
                result[prefix + node.key[: (i + 1) * self.page_size]] = block
            prefix += node.key
            stack.extend((child, prefix) for child in node.children.values())
        return result

    def check_integrity(self, in_use_refs: dict[int, int] | None = None) -> None:
        """Raise AssertionError unless the tree and the allocator agree.

        Checks the structure (see RadixNode) of every namespace; that no slot is cached twice
        (within or across namespaces) and a block's pages all lie in one logical block; that
        the page counts match the tree and every tree block has count ≥ 1; and
        ``free + cached_only + in_use == total``. With ``in_use_refs`` (block -> references
        held by requests), also that every block's count is exactly the tree's share (0 or 1)
        plus the requests'.
        """
        allocator = self.allocator
        allocator.check_integrity()
        for salt, root in self._roots.items():
            _require(isinstance(root, _RootNode) and root.salt == salt, f"root filed under {salt!r}: {root}")
            _require(root.parent is None and not root.blocks and root.end == 0, f"bad root: {root}")
        slots: set[tuple[int, int]] = set()
        pages_of: Counter[int] = Counter()
        logical_block: dict[int, int] = {}
        for node in self._nodes():
            self._check_node(node)
            start = node.end - len(node.key)
            for i, block in enumerate(node.blocks):
                depth = start + i * self.page_size
                slot = (block, depth % self.block_size)
                _require(slot not in slots, f"slot {slot} cached twice in the tree")
                _require(allocator.refcount(block) >= 1, f"tree block {block} is free")
                index = logical_block.setdefault(block, depth // self.block_size)
                _require(index == depth // self.block_size, f"block {block} holds pages of two logical blocks")
                slots.add(slot)
                pages_of[block] += 1
        _require(slots == self._slots and pages_of == self._pages_of, "page index disagrees with the tree")
        cached_only = sum(1 for b in pages_of if allocator.refcount(b) == 1)
        in_use = sum(1 for b in range(allocator.num_total) if allocator.refcount(b) - (b in pages_of) > 0)
        _require(
            allocator.num_free + cached_only + in_use == allocator.num_total,
            f"free {allocator.num_free} + cached {cached_only} + in use {in_use} != total {allocator.num_total}",
        )
        if in_use_refs is not None:
            _require(all(0 <= b < allocator.num_total for b in in_use_refs), "in_use_refs has bad block ids")
            for block in range(allocator.num_total):
                expected = (block in pages_of) + in_use_refs.get(block, 0)
                _require(
                    allocator.refcount(block) == expected,
                    f"block {block}: refcount {allocator.refcount(block)} != expected {expected}",
                )

    # -------------------------------------------------------------------------- internals

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def _whole_pages(self, token_ids: Sequence[int]) -> tuple[int, ...]:
        end = len(token_ids) - len(token_ids) % self.page_size
        return tuple(token_ids[:end])

    def _slot(self, block: int, depth: int) -> tuple[int, int]:
        """Where the page starting at token ``depth`` lies: its block and offset in it."""
        return (block, depth % self.block_size)

    def _add_page(self, block: int, depth: int) -> None:
        if self._pages_of[block] == 0:
            self.allocator.incref(block)  # the tree's one reference, taken with the first page
        self._pages_of[block] += 1
        self._slots.add(self._slot(block, depth))

    def _drop_page(self, block: int, depth: int) -> bool:
        """Forget one page; True if that dropped the block's last reference (it is free)."""
        self._slots.discard(self._slot(block, depth))
        self._pages_of[block] -= 1
        if self._pages_of[block]:
            return False
        del self._pages_of[block]
        return self.allocator.decref(block) == 0

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
        """Follow ``tokens`` (whole pages) down from ``root`` as far as it is cached, splitting
        the last edge at the first differing page, and stamp the path with ``now``. Returns the
        node ending the match and the number of tokens matched."""
        ps = self.page_size
        node, i = root, 0
        node.last_access = now
        while i < len(tokens):
            child = node.children.get(tokens[i : i + ps])
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
        pages. At least one page, since the caller found the child by its first page."""
        limit = min(len(key), len(tokens) - start)
        n = self.page_size
        while n < limit and key[n] == tokens[start + n]:
            n += 1
        return n - n % self.page_size

    def _split(self, child: RadixNode, length: int) -> RadixNode:
        """Cut ``child``'s edge after ``length`` tokens (a page multiple); return the new upper
        node. The lower part keeps the object identity (it still ends the same prefix)."""
        ps = self.page_size
        parent = child.parent
        assert parent is not None
        # Every lock on child passed through the upper part, and so did every access.
        upper = RadixNode(
            child.key[:length],
            child.blocks[: length // ps],
            parent,
            last_access=child.last_access,
            lock_count=child.lock_count,
        )
        child.key = child.key[length:]
        child.blocks = child.blocks[length // ps :]
        child.parent = upper
        upper.children[child.key[:ps]] = child
        parent.children[upper.key[:ps]] = upper
        return upper

    def _path_blocks(self, node: RadixNode) -> list[int]:
        parts: list[list[int]] = []
        current: RadixNode | None = node
        while current is not None:
            parts.append(current.blocks)
            current = current.parent
        return [block for part in reversed(parts) for block in part]

    def _check_adoptable(self, new_blocks: list[int], start: int) -> None:
        """``new_blocks[i]`` is to hold the page at token ``start + i * page_size``."""
        seen: set[tuple[int, int]] = set()
        for i, block in enumerate(new_blocks):
            slot = self._slot(block, start + i * self.page_size)
            if slot in self._slots:
                raise ValueError(f"slot {slot} is already stored elsewhere in the prefix cache")
            if slot in seen:
                raise ValueError(f"the block table repeats block {block}")
            if self.allocator.refcount(block) == 0:
                raise ValueError(f"cannot insert free block {block}: the caller must hold a reference")
            seen.add(slot)

    def _is_evictable_leaf(self, node: RadixNode) -> bool:
        # Roots (parent None) are never evicted; empty salted ones are dropped separately.
        return node.parent is not None and not node.children and node.lock_count == 0

    def _remove_leaf(self, node: RadixNode) -> int:
        """Detach a leaf and drop its pages; returns the blocks actually freed."""
        assert node.parent is not None
        del node.parent.children[node.key[: self.page_size]]
        node.evicted = True
        start = node.end - len(node.key)
        return sum(self._drop_page(block, start + i * self.page_size) for i, block in enumerate(node.blocks))

    def _nodes(self) -> Iterator[RadixNode]:
        """Every node of every namespace, the shared one first, each root before its subtree,
        parents before children (pre-order, deterministic: roots in creation order)."""
        stack: list[RadixNode] = list(reversed(self._roots.values()))
        while stack:
            node = stack.pop()
            yield node
            stack.extend(reversed(list(node.children.values())))

    def _check_node(self, node: RadixNode) -> None:
        ps = self.page_size
        _require(node.lock_count >= 0, f"negative lock count on {node}")
        _require(not node.evicted, f"evicted node still in the tree: {node}")
        if node.parent is not None:
            _require(len(node.key) > 0, f"empty edge: {node}")
            _require(len(node.key) == len(node.blocks) * ps, f"key/blocks length mismatch: {node}")
            _require(node.end == node.parent.end + len(node.key), f"wrong depth: {node}")
        for first, child in node.children.items():
            _require(child.parent is node, f"bad parent pointer: {child}")
            _require(child.key[:ps] == first, f"child indexed under the wrong page: {child}")
            _require(child.lock_count <= node.lock_count, f"child locked more than parent: {child}")
            _require(child.last_access <= node.last_access, f"child newer than parent: {child}")


def _require(condition: bool, message: str) -> None:
    # Explicit raise, not `assert`: the check must also run under `python -O`.
    if not condition:
        raise AssertionError(message)
