"""The changelist: which chunks may differ between two views of the origin.

A view is the origin or one snapshot. Every view of a chunk reads either
the origin or one exception (a store chunk) of it; two views read the same
bytes wherever they read the same place. So a chunk may differ between two
views exactly where they resolve to different places: one reads the origin
and the other an exception, or each reads its own exception. Chunks without
any exception read the origin in every view and never differ. The rule and
why it is exact (not merely a superset) are in docs/protocol.md,
"`query_changes`".

Only leaves that may hold an exception of one of the two views are read:
a subtree whose index summary has neither view's share bit is read the
same (from the origin) by both, so it is skipped whole (docs/rules.md,
"Subtree summaries").

Owns no state: each answer is read from the exception btree as it stands in
the open transaction, without reading any data. One answer visits a bounded
number of leaves and lists a bounded number of runs, and says where the
next answer starts, so a whole origin is listed in steps of bounded time and
memory.
"""

from __future__ import annotations

from dataclasses import dataclass

from csnap_format import Geometry
from csnapd.engine.btree import ExceptionTree
from csnapd.engine.errors import InvalidRequestError, StoreCorruptError
from csnapd.engine.pages import LeafPage
from csnapd.engine.snapshots import SnapshotTable
from csnapd.engine.transaction import Transaction

__all__ = ["ChangeList", "Changes", "MAX_RUN_CHUNKS", "CHANGES_LEAVES_PER_STEP"]

#: Most chunks one run of an answer counts (the protocol's ranges carry u32 counts).
MAX_RUN_CHUNKS = 0xFFFF_FFFF
#: Most btree leaves one answer visits: bounds the time one request takes.
CHANGES_LEAVES_PER_STEP = 256


@dataclass(frozen=True, slots=True)
class Changes:
    """Runs of chunks that may differ, ascending, all below `next`.

    `next` is the chunk the following answer starts from, or None when the
    range asked about is covered: every chunk from the asked start up to
    `next` (or the end of the range) that may differ is in `runs`.
    """

    runs: tuple[tuple[int, int], ...]
    next: int | None


class ChangeList:
    """Answers which chunks may differ between two views."""

    def __init__(
        self,
        geometry: Geometry,
        tree: ExceptionTree,
        snapshots: SnapshotTable,
        transaction: Transaction,
    ):
        self._geometry = geometry
        self._tree = tree
        self._snapshots = snapshots
        self._txn = transaction

    def changes(
        self,
        base: int | None,
        target: int | None,
        start: int,
        count: int,
        *,
        max_runs: int,
        max_leaves: int = CHANGES_LEAVES_PER_STEP,
    ) -> Changes:
        """Chunks of start..start+count-1 that may differ between views `base` and `target`.

        A view is a snapshot's tag, or None for the origin. The answer stops
        early, at a leaf boundary or before a run that would be the
        `max_runs` + 1st; its `next` says where to continue.

        Raises:
            InvalidRequestError: the range is not inside the origin, or a limit is below 1.
            SnapshotNotFoundError: no live snapshot has one of the tags.
            SnapshotUnavailableError: one of them was squashed (its data is gone).
        """
        end = self._geometry.origin_chunks
        if count < 1 or start < 0 or start + count > end:
            raise InvalidRequestError(
                f"chunks {start}..{start + count - 1} are not inside the origin's {end} chunks"
            )
        if max_runs < 1 or max_leaves < 1:
            raise InvalidRequestError("a changelist answer needs room for one run and one leaf")
        return self._txn.request(
            lambda: self._changes(base, target, start, start + count, max_runs, max_leaves)
        )

    def _mask(self, view: int | None) -> int:
        """The share bit of a view as a mask; 0 for the origin."""
        return 0 if view is None else 1 << self._snapshots.io_bit(view)

    def _changes(
        self,
        base: int | None,
        target: int | None,
        start: int,
        end: int,
        max_runs: int,
        max_leaves: int,
    ) -> Changes:
        a, b = self._mask(base), self._mask(target)
        runs: list[tuple[int, int]] = []
        if a == b:
            # A view never differs from itself.
            return Changes((), None)
        chunk = start
        for _ in range(max_leaves):
            # Where neither view has an exception both read the origin: only
            # leaves that may hold bit a or bit b can differ (a is 0 for the
            # origin, which no exception carries).
            found = self._tree.seek(chunk, a | b)
            if found is None or found >= end:
                return Changes(tuple(runs), None)
            chunk = found
            leaf, _path, hi = self._tree.descend(chunk)
            if hi <= chunk:
                raise StoreCorruptError(
                    f"leaf {leaf.address} holding chunk {chunk} ends at {hi}: the walk"
                    " would make no progress"
                )
            stop = min(end, hi)
            resume = _differing(leaf, chunk, stop, a, b, runs, max_runs)
            if resume is not None:
                return Changes(tuple(runs), resume)
            if stop >= end:
                return Changes(tuple(runs), None)
            chunk = stop
        return Changes(tuple(runs), chunk)


def _differing(
    leaf: LeafPage,
    start: int,
    stop: int,
    a: int,
    b: int,
    runs: list[tuple[int, int]],
    max_runs: int,
) -> int | None:
    """Append to `runs` the chunks of `leaf` in start..stop-1 where masks `a` and `b`
    resolve to different places; the chunk to resume at if `runs` is full.

    A mask of 0 stands for the origin, which no exception carries.
    """
    i, _ = leaf.find(start)
    at = sum(leaf.counts[:i])
    shares = leaf.shares
    while i < len(leaf.chunks) and leaf.chunks[i] < stop:
        chunk, n = leaf.chunks[i], leaf.counts[i]
        place_a = place_b = -1
        for j in range(at, at + n):
            if shares[j] & a:
                place_a = j
            if shares[j] & b:
                place_b = j
        at += n
        i += 1
        if place_a == place_b:
            continue
        if runs:
            first, length = runs[-1]
            if first + length == chunk and length < MAX_RUN_CHUNKS:
                runs[-1] = (first, length + 1)
                continue
        if len(runs) >= max_runs:
            return chunk
        runs.append((chunk, 1))
    return None
