"""The store state the superblock carries, in a mutable form.

Every request may change it (free counts, cursors, root, snapshot table,
per-snapshot counters); a request that fails puts back the copy taken when
it began. Each transaction that changed it journals a new superblock.
"""

from __future__ import annotations

from dataclasses import dataclass

from csnap_format import (
    MAX_SNAPSHOTS,
    Geometry,
    RevertProgress,
    SnapshotRecord,
    SnapshotState,
    Superblock,
)

__all__ = ["StoreState", "bits_of"]


def bits_of(mask: int) -> list[int]:
    """The set bits of a share mask, lowest first."""
    bits = []
    while mask:
        low = mask & -mask
        bits.append(low.bit_length() - 1)
        mask ^= low
    return bits


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
    snapshots: list[SnapshotRecord | None]
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
            snapshots=list(sb.snapshots),
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
        return StoreState(
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
            list(self.snapshots),
            list(self.unique),
            list(self.shared),
            self.fence_token,
            self.fence_ns,
            self.revert,
            self.resized_ns,
            self.registry_sequence,
        )

    def assign(self, other: StoreState) -> None:
        """Become a copy of `other` in place (holders of `self` see the change)."""
        for name in self.__slots__:
            value = getattr(other, name)
            setattr(self, name, list(value) if isinstance(value, list) else value)

    # -- snapshot table ---------------------------------------------------------

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
        return self.mask_in(SnapshotState.LIVE)

    @property
    def reclaim_mask(self) -> int:
        """Share bits whose exceptions the sweep must still clear.

        Those of deleting snapshots, of squashed snapshots that still count
        exceptions, and of the sweep pass in progress.
        """
        mask = self.sweep_mask
        for bit, record in enumerate(self.snapshots):
            if record is None:
                continue
            if record.state == SnapshotState.DELETING or (
                record.state == SnapshotState.SQUASHED and (self.unique[bit] or self.shared[bit])
            ):
                mask |= 1 << bit
        return mask

    def bit_of(self, tag: int) -> int | None:
        """Share bit of the live or squashed snapshot tagged `tag`."""
        for bit, record in enumerate(self.snapshots):
            if (
                record is not None
                and record.tag == tag
                and record.state in (SnapshotState.LIVE, SnapshotState.SQUASHED)
            ):
                return bit
        return None

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
