"""Questions about where chunks are: snapshot reads and the maps of the origin.

Owns no state of its own: each answer is read from the exception btree as it
stands in the open transaction. Answers come as runs of consecutive chunks.
"""

from __future__ import annotations

from collections.abc import Callable

from csnap_format import LOST_CHUNK, Geometry
from csnap_format.runs import append_mapped_run, append_run
from csnapd.engine.btree import ExceptionTree
from csnapd.engine.errors import InvalidRequestError, lost_chunk_error
from csnapd.engine.results import ReadSegment
from csnapd.engine.snapshots import SnapshotTable
from csnapd.engine.state import StoreState
from csnapd.engine.transaction import Transaction
from csnapd.engine.validation import Ranges, check_ranges

__all__ = ["ChunkReads"]


class ChunkReads:
    """Where a snapshot's chunks are, and which origin chunks snapshots share."""

    def __init__(
        self,
        state: StoreState,
        geometry: Geometry,
        tree: ExceptionTree,
        snapshots: SnapshotTable,
        transaction: Transaction,
    ):
        self._state = state
        self._geometry = geometry
        self._tree = tree
        self._snapshots = snapshots
        self._txn = transaction

    def snapshot_read(self, tag: int, ranges: Ranges) -> list[ReadSegment]:
        """Where snapshot `tag`'s chunks are: store chunks, or the origin.

        Segments with `store_chunk` None are shared with the origin; the
        caller must hold them against origin writes while it reads them.
        """
        check_ranges(ranges, self._snapshots.view_chunks(tag))
        return self._txn.lookup(lambda: self._snapshot_read(tag, ranges))

    def _snapshot_read(self, tag: int, ranges: Ranges) -> list[ReadSegment]:
        bit = 1 << self._snapshots.io_bit(tag)
        runs: list[tuple[int, int, int | None]] = []
        for chunk, leaf, i, at in self._tree.entries_of(ranges):
            j = leaf.exception_at(i, at, bit) if at >= 0 else -1
            target = leaf.targets[j] if j >= 0 else None
            if target == LOST_CHUNK:
                raise lost_chunk_error(tag, chunk)
            append_mapped_run(runs, chunk, 1, target)
        return [ReadSegment(*run) for run in runs]

    def snapshot_owned(
        self, tag: int, ranges: Ranges
    ) -> tuple[list[tuple[int, int, int]], list[tuple[int, int]]]:
        """Store chunks snapshot `tag` owns alone among live snapshots, as
        (chunk, count, store chunk) runs, and the chunks it still shares with
        the origin, as (chunk, count) runs; chunks whose store copy it shares
        with another live snapshot are in neither.

        An owned address is stable while the snapshot lives: a write to it
        goes in place (CopyOut.snapshot_write), no other snapshot's write or
        delete frees it (the snapshot's own share bit keeps it), and only
        deleting the snapshot itself does (docs/rules.md, "stable owned
        addresses"). The origin runs are true when answered only.
        """
        check_ranges(ranges, self._snapshots.view_chunks(tag))
        owned, origin = self._txn.request(lambda: self._snapshot_owned(tag, ranges))
        # The client may write into owned chunks in place once the reply is out.
        self._txn.hand_out((target, count) for _, count, target in owned)
        return owned, origin

    def _snapshot_owned(
        self, tag: int, ranges: Ranges
    ) -> tuple[list[tuple[int, int, int]], list[tuple[int, int]]]:
        bit = 1 << self._snapshots.io_bit(tag)
        others = self._state.live_mask & ~bit
        owned: list[tuple[int, int, int]] = []
        origin: list[tuple[int, int]] = []
        # Both lists go out ascending (docs/protocol.md, "owned"), whatever
        # order the ranges were asked in (they do not overlap: checked).
        for chunk, leaf, i, at in self._tree.entries_of(sorted(ranges)):
            j = leaf.exception_at(i, at, bit) if at >= 0 else -1
            if j < 0:
                append_run(origin, chunk, 1)
            elif leaf.targets[j] == LOST_CHUNK:
                # In neither list: the client asks for it as a read,
                # which fails store_corrupt (docs/format.md, "Lost copies").
                continue
            elif not leaf.shares[j] & others:
                append_mapped_run(owned, chunk, 1, leaf.targets[j])
        return owned, origin

    def origin_shared(self, ranges: Ranges) -> list[tuple[int, int]]:
        """Ranges of origin chunks that some live snapshot still shares.

        These are the chunks an origin write would copy out first.
        """
        check_ranges(ranges, self._geometry.origin_chunks)
        # Shared: some live snapshot has no exception of its own there.
        return self._txn.lookup(
            lambda: self._origin_where(
                ranges, lambda found, using, live: not found or live & ~using
            )
        )

    def origin_copied(self, ranges: Ranges) -> list[tuple[int, int]]:
        """Ranges of origin chunks that some live snapshot holds a copy of."""
        check_ranges(ranges, self._geometry.origin_chunks)
        # Copied: some live snapshot uses an exception there.
        return self._txn.lookup(
            lambda: self._origin_where(ranges, lambda found, using, live: found and live & using)
        )

    def _origin_where(
        self, ranges: Ranges, wanted: Callable[[bool, int, int], object]
    ) -> list[tuple[int, int]]:
        """Ranges of the origin chunks for which wanted(found, share mask, live mask)."""
        masks = self._state.live_masks
        out: list[tuple[int, int]] = []
        if not masks.live:
            return out
        for chunk, leaf, i, at in self._tree.entries_of(ranges):
            live = masks.at(chunk)
            found = at >= 0
            if live and wanted(found, leaf.using_at(i, at) if found else 0, live):
                append_run(out, chunk, 1)
        return out

    def exceptions(self, start: int, count: int) -> list[tuple[int, int, int]]:
        """Every exception of logical chunks start..start+count-1, in order.

        Returns (logical chunk, share mask, store chunk) triples: the btree as
        it is, including bits of snapshots still being deleted. Costs one
        descent per leaf whatever the range, so it can list a whole origin.
        """
        end = self._geometry.origin_chunks
        if count < 1 or start < 0 or start + count > end:
            raise InvalidRequestError(
                f"chunks {start}..{start + count - 1} are not inside the origin"
            )
        return self._txn.request(lambda: self._exceptions(start, start + count))

    def _exceptions(self, start: int, end: int) -> list[tuple[int, int, int]]:
        out: list[tuple[int, int, int]] = []
        chunk = start
        while chunk < end:
            leaf, _, hi = self._tree.descend(chunk)
            i, _ = leaf.find(chunk)
            at = sum(leaf.counts[:i])
            while i < len(leaf.chunks) and leaf.chunks[i] < end:
                logical, n = leaf.chunks[i], leaf.counts[i]
                out.extend((logical, leaf.shares[j], leaf.targets[j]) for j in range(at, at + n))
                at += n
                i += 1
            chunk = hi
        return out
