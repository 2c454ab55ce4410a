"""The snapshot table as the engine offers it: the requests on whole
snapshots (create, delete, priority, use count, squash, revert) and the
status that reports them.

Owns the order in which each request consults its keepers: a revert in
progress refuses what would disturb it (csnapd.engine.revert), the table
keeps the records (csnapd.engine.snapshots), and the store-full policy
chooses what to squash (csnapd.engine.squash).
"""

from __future__ import annotations

from collections.abc import Callable, Collection

from csnap_format import Geometry, RevertProgress
from csnapd.engine.journal import Journal
from csnapd.engine.results import SnapshotInfo, StoreStatus
from csnapd.engine.revert import Reverter
from csnapd.engine.snapshots import SnapshotTable
from csnapd.engine.squash import Squashed, Squasher, squash_order
from csnapd.engine.state import StoreState
from csnapd.engine.transaction import Transaction
from csnapd.engine.validation import Ranges

__all__ = ["SnapshotRequests"]


class SnapshotRequests:
    """The engine's snapshot requests, over its state (Engine mixes this in)."""

    geometry: Geometry
    _journal: Journal
    _state: StoreState
    _txn: Transaction
    _snapshots: SnapshotTable
    _squasher: Squasher
    _reverter: Reverter
    #: Squashes noted by a squasher a resize step replaced, not yet taken.
    _squashed_earlier: list[Squashed]

    # -- the table ---------------------------------------------------------------

    def create_snapshot(self, tag: int, priority: int = 0) -> SnapshotInfo:
        """Create a snapshot of the origin as it is now."""
        self._reverter.refuse_if_running("creating a snapshot")
        return self._snapshots.create(tag, priority)

    def delete_snapshot(self, tag: int) -> SnapshotInfo:
        """Delete a snapshot: its tag goes at once, its space in the background."""
        self._reverter.refuse_if_reverting(tag, "deleting the snapshot")
        return self._snapshots.delete(tag)

    def set_priority(self, tag: int, priority: int) -> SnapshotInfo:
        """Set a snapshot's priority (-128..127)."""
        return self._snapshots.set_priority(tag, priority)

    def change_use_count(self, tag: int, delta: int) -> SnapshotInfo:
        """Add `delta` to a snapshot's use count (0 reads it)."""
        return self._snapshots.change_use_count(tag, delta)

    def snapshot(self, tag: int) -> SnapshotInfo:
        """One snapshot by tag."""
        return self._snapshots.snapshot(tag)

    def snapshots(self) -> list[SnapshotInfo]:
        """Live (and squashed) snapshots, oldest first."""
        return self._snapshots.snapshots()

    def snapshot_chunks(self, tag: int | None) -> int:
        """Chunks of the view `tag` (None: the origin): a snapshot's size is
        the origin's when it was taken."""
        return self._snapshots.view_chunks(tag)

    def status(self) -> StoreStatus:
        """Store totals and every snapshot, without walking the btree."""
        self._txn.check_usable()
        return self._snapshots.status(self._journal.next_sequence - 1)

    # -- squashing -----------------------------------------------------------------

    def squash_order(self, spare: Collection[int] = ()) -> list[int]:
        """Tags of the expendable snapshots, the first a full store squashes first."""
        self._txn.check_usable()
        tags = []
        for bit in squash_order(self._state, spare):
            record = self._state.snapshots[bit]
            assert record is not None
            tags.append(record.tag)
        return tags

    def squash_for_reserve(self, spare: Collection[int] = ()) -> Squashed | None:
        """Squash the first expendable snapshot to keep free space; the caller commits."""
        return self._squasher.squash_for_reserve(spare)

    @property
    def data_use(self) -> tuple[int, int]:
        """The data area's size and free chunks now (committed or not)."""
        return self.geometry.data_chunks, self._state.data_free

    def take_squashed(self) -> list[Squashed]:
        """Snapshots squashed to make room since the last call, in order."""
        later = self._squasher.take_squashed()
        if not self._squashed_earlier:
            return later  # (asked after every request: most often nothing)
        earlier, self._squashed_earlier = self._squashed_earlier, []
        return earlier + later

    # -- revert ----------------------------------------------------------------

    @property
    def revert_progress(self) -> RevertProgress | None:
        """The revert in progress, if any (csnapd.engine.revert)."""
        return self._reverter.progress

    def start_revert(self, tag: int) -> RevertProgress:
        """Begin making the origin equal to snapshot `tag` (a request; the caller commits).

        The caller holds origin writes until the revert is done.
        """
        return self._reverter.start(tag)

    def revert_step(
        self,
        *,
        locked: Callable[[Ranges], bool] = lambda ranges: False,
        spare: Collection[int] = (),
        reclaim: bool = True,
    ) -> bool:
        """One step of the revert in progress; whether more remains (see Reverter.step)."""
        return self._reverter.step(locked=locked, spare=spare, reclaim=reclaim)

    def finish_revert(self, progress: Callable[[RevertProgress], None] | None = None) -> None:
        """Run the revert in progress, if any, to its end, committing each step."""
        self._reverter.finish(progress)
