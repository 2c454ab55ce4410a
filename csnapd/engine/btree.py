"""The exception btree: one tree keyed by logical chunk, leaves holding every
exception of the chunks in their range (docs/format.md, "Exception btree").

Rules:
  * Every edit goes through the pager (modify/create/forget), so a failed
    request rolls back exactly.
  * A leaf's base equals its key in its parent; index keys[0] equals the
    node's own lower bound; the root's lower bound is 0. Descent checks both,
    so a damaged pointer is reported instead of followed.
  * A leaf gets room for one more exception by splitting at the byte middle,
    or, when the chunk is 2^32 or more past its base, by starting a new leaf
    at that chunk (64-bit chunks in u32 directory entries).
  * Every walk stays inside the origin's chunks and advances on each leaf:
    a range past the origin is refused and bounds that do not advance are
    reported as damage, so no walk can loop.
  * Deleting snapshots' bits are cleared by a sweep in key order; a leaf left
    half empty is merged into its left sibling, index nodes likewise, and a
    root with one child gives way to that child.
  * Every index entry's summary holds at least every share bit used below
    it (docs/rules.md, "Subtree summaries"): an edit that adds bits to a
    leaf ORs them into the summaries on its path first, splits and merges
    carry summaries with their children, and the sweep makes the summaries
    on the path of each leaf it visits exact again. Walks that look for
    some bits (the sweep, the changelist) skip subtrees without them.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator

from csnap_format import (
    EXCEPTION_BYTES,
    LEAF_ENTRY_BYTES,
    LOST_CHUNK,
    MAX_DEPTH,
    RCHUNK_LIMIT,
    Geometry,
    leaf_room,
    summary_index_capacity,
)
from csnapd.engine.allocator import Allocator
from csnapd.engine.errors import InvalidRequestError, StoreCorruptError
from csnapd.engine.pager import Pager
from csnapd.engine.pages import IndexPage, LeafPage
from csnapd.engine.state import StoreState

__all__ = ["Entry", "ExceptionTree", "Path"]

#: The index nodes from the root down to a leaf, with the slot taken in each.
Path = list[tuple[IndexPage, int]]
#: What ExceptionTree.entries_of yields: (chunk, leaf, entry index, where its
#: exceptions start or -1).
Entry = tuple[int, LeafPage, int, int]


class ExceptionTree:
    """Lookups and edits of the exception btree."""

    def __init__(self, pager: Pager, state: StoreState, geometry: Geometry, meta: Allocator):
        self._pager = pager
        self._state = state
        self._meta = meta
        self._room = leaf_room(geometry.block_size)
        self._fanout = summary_index_capacity(geometry.block_size)
        self._end = geometry.origin_chunks

    # -- lookups ---------------------------------------------------------------

    def descend(self, chunk: int) -> tuple[LeafPage, Path, int]:
        """The leaf whose range holds `chunk`, the path to it, and its upper bound.

        Raises:
            InvalidRequestError: `chunk` is not an origin chunk.
            StoreCorruptError: a node's level or bounds are not what its parent says.
        """
        if not 0 <= chunk < self._end:
            raise InvalidRequestError(
                f"chunk {chunk} is not in the btree's range (the origin's {self._end} chunks)"
            )
        address = self._state.root
        lo, hi = 0, self._end
        path: Path = []
        for level in range(self._state.depth, 0, -1):
            node = self._pager.index(address)
            if node.level != level or node.keys[0] != lo:
                raise StoreCorruptError(
                    f"index node {address} has level {node.level} and lower key"
                    f" {node.keys[0]}; its parent expects level {level} from {lo}"
                )
            slot = node.slot(chunk)
            if slot + 1 < len(node.keys):
                hi = node.keys[slot + 1]
            lo = node.keys[slot]
            path.append((node, slot))
            address = node.children[slot]
        leaf = self._pager.leaf(address)
        if leaf.base != lo:
            raise StoreCorruptError(f"leaf {address} has base {leaf.base}; its parent expects {lo}")
        return leaf, path, hi

    def entries_of(self, ranges: Iterable[tuple[int, int]]) -> Iterator[Entry]:
        """(chunk, leaf, entry index, at) for the chunks of each (start, count)
        range in turn: `at` is where the entry's exceptions start in the
        leaf's shares and targets, or -1 when the chunk has no entry (the
        index is then where it would go).

        One descent per leaf, none for a range inside the leaf the one before
        ended in (a query naming chunks one by one), and the positions are
        counted as the walk goes (LeafPage.span counts from the leaf's start
        every time). The caller must not edit the tree while iterating.

        Raises:
            InvalidRequestError: a range is not inside the origin (callers
                check first; the walk refuses rather than run past its end).
            StoreCorruptError: the index bounds do not advance the walk.
        """
        leaf: LeafPage | None = None
        lo = hi = 0
        for start, count in ranges:
            chunk, end = start, start + count
            if count < 1 or start < 0 or end > self._end:
                raise InvalidRequestError(
                    f"the btree walk of chunks {start}..{end - 1} goes beyond the origin's"
                    f" {self._end} chunks"
                )
            while chunk < end:
                if leaf is None or not lo <= chunk < hi:
                    leaf, _, hi = self.descend(chunk)
                    lo = leaf.base
                    if hi <= chunk:
                        raise StoreCorruptError(
                            f"leaf {leaf.address} holding chunk {chunk} ends at {hi}: the walk"
                            " would make no progress"
                        )
                stop = min(end, hi)
                i, _ = leaf.find(chunk)
                at = sum(leaf.counts[:i])
                chunks, counts = leaf.chunks, leaf.counts
                entries = len(chunks)
                for c in range(chunk, stop):
                    if i < entries and chunks[i] == c:
                        yield c, leaf, i, at
                        at += counts[i]
                        i += 1
                    else:
                        yield c, leaf, i, -1
                chunk = stop

    def seek(self, chunk: int, mask: int) -> int | None:
        """The first chunk from `chunk` on whose leaf may hold a bit of `mask`.

        Subtrees whose summary lacks every bit of `mask` are skipped without
        being read. Returns `chunk` itself, or the lower bound of a later
        leaf, or None when no leaf from `chunk`'s on may hold one.

        Raises:
            StoreCorruptError: a node's level is not what its parent says.
        """
        if not 0 <= chunk < self._end:
            return None
        if self._state.depth == 0:
            return chunk
        return self._seek(self._state.root, self._state.depth, chunk, mask)

    def _seek(self, address: int, level: int, chunk: int, mask: int) -> int | None:
        node = self._pager.index(address)
        if node.level != level:
            raise StoreCorruptError(
                f"index node {address} has level {node.level}; its parent expects {level}"
            )
        for slot in range(max(0, node.slot(chunk)), len(node.keys)):
            if not node.summaries[slot] & mask:
                continue
            at = max(chunk, node.keys[slot])
            if level == 1:
                return at
            found = self._seek(node.children[slot], level - 1, at, mask)
            if found is not None:
                return found
        return None

    def root_union(self) -> int:
        """A superset of every share bit used anywhere in the tree."""
        if self._state.depth == 0:
            return self._pager.leaf(self._state.root).union
        return self._pager.index(self._state.root).union

    def leaves(self) -> Iterator[tuple[LeafPage, Path, int]]:
        """Every leaf in key order, with its path and upper bound."""
        chunk = 0
        while True:
            leaf, path, hi = self.descend(chunk)
            if hi <= chunk:
                raise StoreCorruptError(
                    f"leaf {leaf.address} holding chunk {chunk} ends at {hi}: the walk"
                    " would make no progress"
                )
            yield leaf, path, hi
            if hi >= self._end:
                return
            chunk = hi

    # -- insertion -------------------------------------------------------------

    def leaf_for_update(self, chunk: int, bits: int) -> LeafPage:
        """A writable leaf holding `chunk`'s range, with room for one more exception.

        `bits` are the share bits the caller is about to add to the leaf:
        they are added to the summaries on its path first.
        """
        while True:
            leaf, path, _ = self.descend(chunk)
            if chunk - leaf.base >= RCHUNK_LIMIT:
                self._split(leaf, path, len(leaf.chunks), chunk)
                continue
            _, found = leaf.find(chunk)
            need = EXCEPTION_BYTES + (0 if found else LEAF_ENTRY_BYTES)
            if leaf.used + need <= self._room:
                for node, slot in path:
                    if bits & ~node.summaries[slot]:
                        self._pager.modify(node).summaries[slot] |= bits
                return self._pager.modify(leaf)
            self._split(leaf, path, _split_point(leaf), None)

    def _split(self, leaf: LeafPage, path: Path, at: int, key: int | None) -> None:
        """Move entries [at:] of `leaf` to a new leaf starting at `key`."""
        address = self._meta.allocate_one()
        left = self._pager.modify(leaf)
        base = key if key is not None else left.chunks[at]
        right = left.split_off(at, address, base)
        self._pager.create(right)
        self._insert_child(path, base, address, right.union)

    def _insert_child(self, path: Path, key: int, child: int, summary: int) -> None:
        """Insert (key, child) after the slot of the last node of `path`.

        `summary` is the new child's; it is a subset of its old neighbour's,
        so the summaries above stay supersets.
        """
        if not path:
            self._grow_root(key, child, summary)
            return
        node, slot = path[-1]
        node = self._pager.modify(node)
        node.keys.insert(slot + 1, key)
        node.children.insert(slot + 1, child)
        node.summaries.insert(slot + 1, summary)
        if len(node.keys) <= self._fanout:
            return
        middle = len(node.keys) // 2
        address = self._meta.allocate_one()
        right = IndexPage(
            address,
            node.level,
            node.keys[middle:],
            node.children[middle:],
            node.summaries[middle:],
        )
        del node.keys[middle:]
        del node.children[middle:]
        del node.summaries[middle:]
        self._pager.create(right)
        self._insert_child(path[:-1], right.keys[0], address, right.union)

    def _grow_root(self, key: int, child: int, summary: int) -> None:
        if self._state.depth >= MAX_DEPTH:
            raise StoreCorruptError(f"the btree would grow beyond {MAX_DEPTH} levels")
        address = self._meta.allocate_one()
        level = self._state.depth + 1
        old = self.root_union()
        self._pager.create(
            IndexPage(address, level, [0, key], [self._state.root, child], [old, summary])
        )
        self._state.root = address
        self._state.depth = level

    # -- the deletion sweep ----------------------------------------------------

    def sweep_leaf(
        self,
        chunk: int,
        mask: int,
        free_chunk: Callable[[int], None],
        may_continue: Callable[[], bool],
    ) -> tuple[int | None, bool]:
        """Clear `mask` from the exceptions of the leaf holding `chunk`.

        Exceptions left with an empty mask are removed and their chunks freed
        through `free_chunk`. Stops early when `may_continue()` says the
        transaction is full; clearing is idempotent, so the caller simply
        comes back to the same chunk.

        Returns:
            where to continue: the next leaf's first chunk, `chunk` again if
            the leaf is not finished, or None after the last leaf; and
            whether the leaf held any bit of `mask` (and was changed).
        """
        leaf, path, hi = self.descend(chunk)
        if hi <= chunk:
            raise StoreCorruptError(
                f"leaf {leaf.address} holding chunk {chunk} ends at {hi}: the sweep"
                " would make no progress"
            )
        changed = any(share & mask for share in leaf.shares)
        if changed:
            leaf = self._pager.modify(leaf)
            if not self._clear(leaf, mask, free_chunk, may_continue):
                self._tighten(path, leaf.union)
                return chunk, True
        self._tighten(path, leaf.union)
        if changed:
            self._merge_leaf(leaf, path)
        return (hi if hi < self._end else None), changed

    def _tighten(self, path: Path, summary: int) -> None:
        """Make the summaries on `path` exact for the child at its end, whose
        summary is `summary`, changing only the nodes that differ.

        Stops at the first entry that is already exact: the node holding it
        has the same union as before, so the entries above, supersets of
        it, stay supersets (they are made exact when a change below them
        reaches them).
        """
        for node, slot in reversed(path):
            if node.summaries[slot] == summary:
                return
            self._pager.modify(node).summaries[slot] = summary
            summary = node.union

    def _clear(
        self,
        leaf: LeafPage,
        mask: int,
        free_chunk: Callable[[int], None],
        may_continue: Callable[[], bool],
    ) -> bool:
        """Clear `mask` in `leaf`, last exception first; False if stopped early."""
        state = self._state
        end = len(leaf.shares)
        for i in range(len(leaf.chunks) - 1, -1, -1):
            start = end - leaf.counts[i]
            for j in range(end - 1, start - 1, -1):
                share = leaf.shares[j]
                if not share & mask:
                    continue
                if not may_continue():
                    return False
                state.count_exception(share, -1)
                remaining = share & ~mask
                if remaining:
                    leaf.shares[j] = remaining
                    state.count_exception(remaining, 1)
                else:
                    if leaf.targets[j] != LOST_CHUNK:  # a lost copy holds no chunk
                        free_chunk(leaf.targets[j])
                    leaf.remove_exception(i, j)
                    state.exceptions -= 1
            end = start
        return True

    def _merge_leaf(self, leaf: LeafPage, path: Path) -> None:
        """Fold a leaf that is at most half full into its left sibling."""
        if not path:
            return
        parent, slot = path[-1]
        if slot == 0 or leaf.used > self._room // 2:
            return
        left = self._pager.leaf(parent.children[slot - 1])
        if left.used + leaf.used > self._room:
            return
        if leaf.chunks and leaf.chunks[-1] - left.base >= RCHUNK_LIMIT:
            return
        self._pager.modify(left).absorb(leaf)
        self._pager.modify(parent).summaries[slot - 1] |= parent.summaries[slot]
        self._remove_child(path)

    def _remove_child(self, path: Path) -> None:
        """Drop the child at the last slot of `path` (never slot 0) and free it."""
        node, slot = path[-1]
        node = self._pager.modify(node)
        del node.keys[slot]
        del node.summaries[slot]
        child = node.children.pop(slot)
        self._meta.free(child)
        self._pager.forget(child)
        above = path[:-1]
        if above and len(node.keys) <= self._fanout // 2:
            parent, parent_slot = above[-1]
            if parent_slot > 0:
                left = self._pager.index(parent.children[parent_slot - 1])
                if len(left.keys) + len(node.keys) <= self._fanout:
                    left = self._pager.modify(left)
                    boundary = len(left.keys)
                    left.keys.extend(node.keys)
                    left.children.extend(node.children)
                    left.summaries.extend(node.summaries)
                    parent = self._pager.modify(parent)
                    parent.summaries[parent_slot - 1] |= parent.summaries[parent_slot]
                    self._remove_child(above)
                    self._merge_at(left, boundary)
        self._shrink_root()

    def _merge_at(self, node: IndexPage, slot: int) -> None:
        """Merge the children at `slot` - 1 and `slot` of `node` if they fit.

        They became siblings when two index nodes merged; before, each was
        its parent's end child, which the sweep's left-merge never reaches.
        """
        if not 0 < slot < len(node.keys):
            return
        left_address, right_address = node.children[slot - 1], node.children[slot]
        if node.level == 1:
            left_leaf = self._pager.leaf(left_address)
            right_leaf = self._pager.leaf(right_address)
            if left_leaf.used + right_leaf.used > self._room:
                return
            if right_leaf.chunks and right_leaf.chunks[-1] - left_leaf.base >= RCHUNK_LIMIT:
                return
            self._pager.modify(left_leaf).absorb(right_leaf)
            self._drop_slot(node, slot)
            return
        left_node = self._pager.index(left_address)
        right_node = self._pager.index(right_address)
        if len(left_node.keys) + len(right_node.keys) > self._fanout:
            return
        left_node = self._pager.modify(left_node)
        boundary = len(left_node.keys)
        left_node.keys.extend(right_node.keys)
        left_node.children.extend(right_node.children)
        left_node.summaries.extend(right_node.summaries)
        self._drop_slot(node, slot)
        self._merge_at(left_node, boundary)

    def _drop_slot(self, node: IndexPage, slot: int) -> None:
        """Remove child `slot` (never 0) of `node`, whose summary joins its
        left neighbour's (which absorbed it), and free its block."""
        node = self._pager.modify(node)
        node.summaries[slot - 1] |= node.summaries[slot]
        del node.keys[slot]
        del node.summaries[slot]
        child = node.children.pop(slot)
        self._meta.free(child)
        self._pager.forget(child)

    def _shrink_root(self) -> None:
        while self._state.depth > 0:
            root = self._pager.index(self._state.root)
            if len(root.keys) > 1:
                return
            self._meta.free(root.address)
            self._pager.forget(root.address)
            self._state.root = root.children[0]
            self._state.depth -= 1


def _split_point(leaf: LeafPage) -> int:
    """Entry index that splits `leaf` into two halves of about equal bytes."""
    n = len(leaf.chunks)
    if n < 2:
        raise StoreCorruptError(f"leaf {leaf.address} is full with a single chunk")
    sizes = [LEAF_ENTRY_BYTES + EXCEPTION_BYTES * c for c in leaf.counts]
    half = sum(sizes) / 2
    best, best_gap = 1, float("inf")
    for at, before in enumerate(itertools.accumulate(sizes)):
        if 0 < at + 1 < n:
            gap = abs(before - half)
            if gap < best_gap:
                best, best_gap = at + 1, gap
    return best
