"""The store state the superblock carries, in a mutable form.

Every request may change it (free counts, cursors, root, snapshot table,
per-snapshot counters); a request that fails puts back the copy taken when
it began. Each transaction that changed it journals a new superblock.

The snapshot table is a tuple, replaced whole by `set_snapshot` and never
changed in place, so the share masks derived from it (`SnapshotMasks`) are
computed once per table and known current while the table is the same
object: every change of a snapshot's state or size, and every rollback or
replay that puts back another table, makes a new one.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from csnap_format import (
    MAX_SNAPSHOTS,
    Geometry,
    RevertProgress,
    SnapshotRecord,
    SnapshotState,
    Superblock,
)

__all__ = ["LiveMasks", "SnapshotMasks", "StoreState", "bits_of"]

#: A snapshot table: records indexed by share bit.
SnapshotRecords = tuple[SnapshotRecord | None, ...]


def bits_of(mask: int) -> list[int]:
    """The set bits of a share mask, lowest first."""
    bits = []
    while mask:
        low = mask & -mask
        bits.append(low.bit_length() - 1)
        mask ^= low
    return bits


class LiveMasks:
    """Share bits of the live snapshots that cover each origin chunk.

    A snapshot covers the chunks below the origin size it was taken at; an
    origin grown since has chunks no older snapshot has.
    """

    __slots__ = ("_gone", "_sizes", "live")

    def __init__(self, table: SnapshotRecords, live: int):
        self.live = live
        limits = sorted(
            (record.origin_chunks, bit)
            for bit, record in enumerate(table)
            if record is not None and record.state == SnapshotState.LIVE
        )
        self._sizes = [size for size, _ in limits]
        #: _gone[i]: bits of the i smallest snapshots.
        self._gone = [0]
        for _, bit in limits:
            self._gone.append(self._gone[-1] | 1 << bit)

    def at(self, chunk: int) -> int:
        """Bits of the live snapshots that have chunk `chunk`."""
        return self.live & ~self._gone[bisect.bisect_right(self._sizes, chunk)]


class SnapshotMasks:
    """The share masks of one snapshot table, computed once for it."""

    __slots__ = ("bits", "deleting", "live", "live_masks", "squashed", "table")

    def __init__(self, table: SnapshotRecords):
        #: The table these masks are of; held, so that no other table can
        #: later be the same object.
        self.table = table
        self.live = self.deleting = self.squashed = 0
        #: The share bit of each live or squashed snapshot's tag.
        self.bits: dict[int, int] = {}
        for bit, record in enumerate(table):
            if record is None:
                continue
            if record.state in (SnapshotState.LIVE, SnapshotState.SQUASHED):
                self.bits.setdefault(record.tag, bit)
            if record.state == SnapshotState.LIVE:
                self.live |= 1 << bit
            elif record.state == SnapshotState.DELETING:
                self.deleting |= 1 << bit
            elif record.state == SnapshotState.SQUASHED:
                self.squashed |= 1 << bit
        self.live_masks = LiveMasks(table, self.live)


@dataclass(slots=True)
class StoreState:
    """Everything in the superblock that changes after format."""

    clean: bool
    depth: int
    root: int
    meta_free: int
    data_free: int
    meta_cursor: int
    data_cursor: int
    sweep_cursor: int
    sweep_mask: int
    exceptions: int
    registry: int
    #: Snapshot records indexed by share bit; the counters live apart below.
    #: Replaced whole (set_snapshot), never changed in place (module comment).
    snapshots: SnapshotRecords
    unique: list[int]
    shared: list[int]
    #: The fencing token journaled last, and when (docs/format.md, "State").
    fence_token: int = 0
    fence_ns: int = 0
    #: The revert in progress, if any (csnapd.engine.revert).
    revert: RevertProgress | None = None
    #: When the last online resize was journaled (csnapd.engine.resize).
    resized_ns: int = 0
    #: The transaction that wrote the client registry block last (set by
    #: Transaction.commit; 0: unknown).
    registry_sequence: int = 0
    #: The masks of the table last asked about (`masks`).
    _masks: SnapshotMasks | None = field(default=None, init=False, compare=False, repr=False)

    @classmethod
    def from_superblock(cls, sb: Superblock) -> StoreState:
        return cls(
            clean=sb.clean,
            depth=sb.depth,
            root=sb.root,
            meta_free=sb.meta_free,
            data_free=sb.data_free,
            meta_cursor=sb.meta_cursor,
            data_cursor=sb.data_cursor,
            sweep_cursor=sb.sweep_cursor,
            sweep_mask=sb.sweep_mask,
            exceptions=sb.exceptions,
            registry=sb.registry,
            snapshots=tuple(sb.snapshots),
            unique=[r.unique_chunks if r else 0 for r in sb.snapshots],
            shared=[r.shared_chunks if r else 0 for r in sb.snapshots],
            fence_token=sb.fence_token,
            fence_ns=sb.fence_ns,
            revert=sb.revert,
            resized_ns=sb.resized_ns,
            registry_sequence=sb.registry_sequence,
        )

    def to_superblock(self, geometry: Geometry, sequence: int) -> Superblock:
        records: list[SnapshotRecord | None] = []
        for bit, record in enumerate(self.snapshots):
            if record is None:
                records.append(None)
                continue
            records.append(
                SnapshotRecord(
                    tag=record.tag,
                    state=record.state,
                    priority=record.priority,
                    use_count=record.use_count,
                    created_ns=record.created_ns,
                    origin_chunks=record.origin_chunks,
                    unique_chunks=self.unique[bit],
                    shared_chunks=self.shared[bit],
                )
            )
        return Superblock(
            geometry=geometry,
            sequence=sequence,
            clean=self.clean,
            depth=self.depth,
            root=self.root,
            meta_free=self.meta_free,
            data_free=self.data_free,
            meta_cursor=self.meta_cursor,
            data_cursor=self.data_cursor,
            sweep_cursor=self.sweep_cursor,
            sweep_mask=self.sweep_mask,
            exceptions=self.exceptions,
            registry=self.registry,
            snapshots=tuple(records),
            fence_token=self.fence_token,
            fence_ns=self.fence_ns,
            revert=self.revert,
            resized_ns=self.resized_ns,
            registry_sequence=self.registry_sequence,
        )

    def copy(self) -> StoreState:
        state = StoreState(
            self.clean,
            self.depth,
            self.root,
            self.meta_free,
            self.data_free,
            self.meta_cursor,
            self.data_cursor,
            self.sweep_cursor,
            self.sweep_mask,
            self.exceptions,
            self.registry,
            self.snapshots,
            list(self.unique),
            list(self.shared),
            self.fence_token,
            self.fence_ns,
            self.revert,
            self.resized_ns,
            self.registry_sequence,
        )
        # Masks belong to a table, not to a state: the copy has the same table.
        state._masks = self._masks
        return state

    def assign(self, other: StoreState) -> None:
        """Become a copy of `other` in place (holders of `self` see the change)."""
        for name in self.__slots__:
            value = getattr(other, name)
            setattr(self, name, list(value) if isinstance(value, list) else value)

    # -- snapshot table ---------------------------------------------------------

    def set_snapshot(self, bit: int, record: SnapshotRecord | None) -> None:
        """Put `record` in slot `bit` of the table (a new table)."""
        table = list(self.snapshots)
        table[bit] = record
        self.snapshots = tuple(table)

    @property
    def masks(self) -> SnapshotMasks:
        """The share masks of the current table."""
        masks = self._masks
        if masks is None or masks.table is not self.snapshots:
            masks = self._masks = SnapshotMasks(self.snapshots)
        return masks

    @property
    def live_masks(self) -> LiveMasks:
        """Which live snapshots cover each origin chunk."""
        return self.masks.live_masks

    def mask_in(self, *states: SnapshotState) -> int:
        """Share bits of the snapshots in any of `states`."""
        mask = 0
        for bit, record in enumerate(self.snapshots):
            if record is not None and record.state in states:
                mask |= 1 << bit
        return mask

    @property
    def live_mask(self) -> int:
        """Share bits of the live snapshots: those a copy-out must serve."""
        return self.masks.live

    @property
    def reclaim_mask(self) -> int:
        """Share bits whose exceptions the sweep must still clear.

        Those of deleting snapshots, of squashed snapshots that still count
        exceptions, and of the sweep pass in progress.
        """
        masks = self.masks
        mask = self.sweep_mask | masks.deleting
        if masks.squashed:
            for bit in bits_of(masks.squashed):
                if self.unique[bit] or self.shared[bit]:
                    mask |= 1 << bit
        return mask

    def bit_of(self, tag: int) -> int | None:
        """Share bit of the live or squashed snapshot tagged `tag`."""
        return self.masks.bits.get(tag)

    def free_bit(self) -> int | None:
        """Lowest free slot of the snapshot table."""
        for bit in range(MAX_SNAPSHOTS):
            if self.snapshots[bit] is None:
                return bit
        return None

    # -- per-snapshot counters --------------------------------------------------

    def count_exception(self, share: int, sign: int) -> None:
        """Add (sign=1) or remove (sign=-1) an exception with mask `share`."""
        if share & (share - 1) == 0:
            self.unique[share.bit_length() - 1] += sign
            return
        for bit in bits_of(share):
            self.shared[bit] += sign
