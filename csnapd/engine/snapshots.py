"""The snapshot table: create, delete, priority, use count, lookup and status.

Owns the snapshot records of the store state: which share bit each tag has,
its state (live, squashed, deleting), priority, use count and creation time.
A deleted snapshot's tag goes at once; its space is reclaimed by the sweep.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from csnap_format import Geometry, SnapshotRecord, SnapshotState
from csnapd.engine.errors import (
    InvalidRequestError,
    SnapshotBusyError,
    SnapshotExistsError,
    SnapshotNotFoundError,
    SnapshotUnavailableError,
    TooManySnapshotsError,
)
from csnapd.engine.results import SnapshotInfo, StoreStatus
from csnapd.engine.state import StoreState, bits_of
from csnapd.engine.transaction import Transaction
from csnapd.engine.validation import check_priority, check_tag

__all__ = ["SnapshotTable"]


class SnapshotTable:
    """The store's snapshots, by tag and by share bit."""

    def __init__(
        self,
        state: StoreState,
        geometry: Geometry,
        transaction: Transaction,
        clock: Callable[[], int],
    ):
        self._state = state
        self._geometry = geometry
        self._txn = transaction
        self._clock = clock

    # -- requests ----------------------------------------------------------------

    def create(self, tag: int, priority: int = 0) -> SnapshotInfo:
        """Create a snapshot of the origin as it is now."""
        check_tag(tag)
        check_priority(priority)
        return self._txn.request(lambda: self._create(tag, priority))

    def _create(self, tag: int, priority: int) -> SnapshotInfo:
        state = self._state
        if state.bit_of(tag) is not None:
            raise SnapshotExistsError(f"a snapshot with tag {tag} already exists")
        bit = state.free_bit()
        if bit is None:
            deleting = len(bits_of(state.mask_in(SnapshotState.DELETING)))
            more = f" ({deleting} still being deleted)" if deleting else ""
            raise TooManySnapshotsError(f"all 64 snapshot slots are in use{more}")
        state.set_snapshot(
            bit,
            SnapshotRecord(
                tag=tag,
                state=SnapshotState.LIVE,
                priority=priority,
                use_count=0,
                created_ns=self._clock(),
                origin_chunks=self._geometry.origin_chunks,
            ),
        )
        state.unique[bit] = state.shared[bit] = 0
        return self.info(bit)

    def delete(self, tag: int) -> SnapshotInfo:
        """Delete a snapshot: its tag goes at once, its space in the background."""
        return self._txn.request(lambda: self._delete(tag))

    def _delete(self, tag: int) -> SnapshotInfo:
        state = self._state
        bit = self.bit(tag)
        record = state.snapshots[bit]
        assert record is not None
        if record.use_count:
            raise SnapshotBusyError(
                f"snapshot {tag} has use count {record.use_count}; set it to 0 to delete it"
            )
        info = self.info(bit)
        if not state.unique[bit] and not state.shared[bit]:
            # No exception carries this bit: the slot is free at once.
            state.set_snapshot(bit, None)
        else:
            state.set_snapshot(bit, replace(record, state=SnapshotState.DELETING))
            if not state.sweep_mask:
                state.sweep_mask, state.sweep_cursor = 1 << bit, 0
        return replace(info, state="deleting")

    def set_priority(self, tag: int, priority: int) -> SnapshotInfo:
        """Set a snapshot's priority (-128..127)."""
        check_priority(priority)
        return self._txn.request(lambda: self._update(tag, priority=priority))

    def change_use_count(self, tag: int, delta: int) -> SnapshotInfo:
        """Add `delta` to a snapshot's use count (0 reads it)."""
        return self._txn.request(lambda: self._update(tag, delta=delta))

    def _update(self, tag: int, *, priority: int | None = None, delta: int = 0) -> SnapshotInfo:
        state = self._state
        bit = self.bit(tag)
        record = state.snapshots[bit]
        assert record is not None
        count = record.use_count + delta
        if not 0 <= count <= 0xFFFF_FFFF:
            raise InvalidRequestError(
                f"use count of snapshot {tag} would become {count} (0..4294967295)"
            )
        state.set_snapshot(
            bit,
            replace(
                record,
                use_count=count,
                priority=record.priority if priority is None else priority,
            ),
        )
        return self.info(bit)

    # -- lookup ------------------------------------------------------------------

    def bit(self, tag: int) -> int:
        """The share bit of the snapshot with `tag`."""
        bit = self._state.bit_of(tag)
        if bit is None:
            raise SnapshotNotFoundError(f"there is no snapshot with tag {tag}")
        return bit

    def io_bit(self, tag: int) -> int:
        """The share bit of the snapshot with `tag`, which must be able to serve I/O."""
        bit = self.bit(tag)
        record = self._state.snapshots[bit]
        if record is not None and record.state == SnapshotState.SQUASHED:
            raise SnapshotUnavailableError(f"snapshot {tag} was squashed; its data is gone")
        return bit

    def view_chunks(self, tag: int | None) -> int:
        """Chunks of the origin (None) or of the snapshot tagged `tag`.

        A snapshot keeps the origin's size at the time it was taken; an
        unknown tag answers the origin's, so that the request's own lookup
        reports it.
        """
        bit = None if tag is None else self._state.bit_of(tag)
        record = None if bit is None else self._state.snapshots[bit]
        return self._geometry.origin_chunks if record is None else record.origin_chunks

    def info(self, bit: int) -> SnapshotInfo:
        """The snapshot with share `bit`, as the administrator sees it."""
        state = self._state
        record = state.snapshots[bit]
        assert record is not None
        return SnapshotInfo(
            tag=record.tag,
            bit=bit,
            state=record.state.name.lower(),
            priority=record.priority,
            use_count=record.use_count,
            created_ns=record.created_ns,
            origin_chunks=record.origin_chunks,
            unique_chunks=state.unique[bit],
            shared_chunks=state.shared[bit],
        )

    def snapshot(self, tag: int) -> SnapshotInfo:
        """One snapshot by tag."""
        self._txn.check_usable()
        return self.info(self.bit(tag))

    def snapshots(self) -> list[SnapshotInfo]:
        """Live (and squashed) snapshots, oldest first."""
        self._txn.check_usable()
        infos = [
            self.info(bit)
            for bit, record in enumerate(self._state.snapshots)
            if record is not None and record.state != SnapshotState.DELETING
        ]
        return sorted(infos, key=lambda info: (info.created_ns, info.bit))

    def status(self, sequence: int) -> StoreStatus:
        """Store totals and every snapshot, without walking the btree.

        `sequence` is that of the newest commit.
        """
        self._txn.check_usable()
        state, g = self._state, self._geometry
        deleting = [
            self.info(bit)
            for bit, record in enumerate(state.snapshots)
            if record is not None and record.state == SnapshotState.DELETING
        ]
        return StoreStatus(
            uuid=g.uuid,
            created_ns=g.created_ns,
            chunk_size=g.chunk_size,
            block_size=g.block_size,
            store_chunks=g.store_chunks,
            origin_chunks=g.origin_chunks,
            data_chunks=g.data_chunks,
            data_free=state.data_free,
            meta_blocks=g.meta_blocks,
            meta_free=state.meta_free,
            exceptions=state.exceptions,
            clean=state.clean,
            sequence=sequence,
            snapshots=tuple(self.snapshots()),
            deleting=tuple(deleting),
            sweep_cursor=state.sweep_cursor,
        )
