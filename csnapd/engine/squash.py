"""The store-full policy: squashing expendable snapshots to make room.

Owns the choice of the snapshot to squash and the loop that makes room for a
copy-out refused for want of data chunks (docs/rules.md, "full store squashes
first"):

  * A refused copy-out first waits for the space a sweep in progress is
    reclaiming: sweep steps are committed until enough chunks are free or
    nothing is left to reclaim.
  * Then the lowest-priority live snapshot (the oldest among equals) whose
    use count is zero and that the caller does not spare is squashed: its
    state becomes squashed in a transaction of its own, its tag stays, and
    its exceptions join the sweep. Squashing also shrinks what a copy-out
    must copy, since squashed snapshots are no longer served.
  * The copy-out is tried again after each step; it fails with store_full
    only when no snapshot is expendable and nothing is left to reclaim.

The free-space reserve squashes by the same order, one snapshot per call,
as a request its caller commits (squash_for_reserve).

Squashes are policy, not the request's own effect: they stay committed even
when the request that caused them is refused in the end.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, replace
from typing import TypeVar

from csnap_format import SnapshotState
from csnapd.engine.errors import StoreCorruptError, StoreFullError
from csnapd.engine.state import StoreState
from csnapd.engine.sweep import Sweeper
from csnapd.engine.transaction import Transaction

__all__ = ["Room", "Squashed", "Squasher", "squash_order"]

_T = TypeVar("_T")

#: The store-full policy's terms for one request: tags never squashed for
#: it, and whether anything may be reclaimed (see Squasher.with_room).
Room = Callable[[], tuple[Collection[int], bool]]


@dataclass(frozen=True, slots=True)
class Squashed:
    """A snapshot squashed to make room, as it was just before."""

    tag: int
    priority: int
    unique_chunks: int
    shared_chunks: int
    #: Squashed to keep the free-space reserve, not for a refused copy-out.
    reserve: bool = False


def squash_order(state: StoreState, spare: Collection[int] = ()) -> list[int]:
    """Share bits of the expendable snapshots, the first to squash first.

    Expendable: live, use count zero, tag not in `spare`, not the snapshot
    a revert in progress copies from. Order: lowest
    priority first, oldest among equals (the share bit breaks exact ties).
    """
    candidates = [
        (record.priority, record.created_ns, bit)
        for bit, record in enumerate(state.snapshots)
        if record is not None
        and record.state == SnapshotState.LIVE
        and record.use_count == 0
        and record.tag not in spare
        and (state.revert is None or state.revert.bit != bit)
    ]
    return [bit for _, _, bit in sorted(candidates)]


class Squasher:
    """Makes room for refused copy-outs by reclaiming and squashing."""

    def __init__(self, state: StoreState, sweeper: Sweeper, transaction: Transaction):
        self._state = state
        self._sweeper = sweeper
        self._txn = transaction
        #: Snapshots squashed and not yet taken by `take_squashed`, in order.
        self._squashed: list[Squashed] = []

    def take_squashed(self) -> list[Squashed]:
        """Snapshots squashed since the last call, in the order they were squashed."""
        squashed, self._squashed = self._squashed, []
        return squashed

    def with_room(self, work: Callable[[], _T], room: Room) -> _T:
        """Run `work`; while it fails for want of data chunks, make room and retry.

        `room()` says, once the store is full (asked then and only then:
        most requests never need it), which tags are never squashed for
        this request, and whether anything may be reclaimed at all (not
        while the caller's clients of deleted snapshots may still read
        their chunks).

        Raises:
            StoreFullError: nothing more can be reclaimed or squashed.
        """
        terms: tuple[Collection[int], bool] | None = None
        while True:
            try:
                return work()
            except StoreFullError as exc:
                if terms is None:
                    terms = room()
                spare, reclaim = terms
                if not reclaim or not self._make_room(exc.wanted, spare):
                    raise

    def _make_room(self, wanted: int, spare: Collection[int]) -> bool:
        """One step towards `wanted` free chunks; False when none is possible."""
        state = self._state
        if self._sweeper.pending:
            before = (state.data_free, state.reclaim_mask, state.sweep_cursor)
            self.reclaim(wanted)
            if (state.data_free, state.reclaim_mask, state.sweep_cursor) == before:
                raise StoreCorruptError(
                    "the sweep makes no progress while a copy-out waits for room: run csnap-check"
                )
            if state.data_free >= wanted or self._sweeper.pending:
                return True
        order = squash_order(state, spare)
        if not order:
            return False
        self.squash(order[0])
        return True

    def reclaim(self, wanted: int) -> None:
        """Commit sweep steps until `wanted` chunks are free or nothing is left to sweep."""
        if self._txn.pending:
            self._txn.commit()
        while self._sweeper.pending and self._state.data_free < wanted:
            self._sweeper.sweep()
            self._txn.commit()

    def squash(self, bit: int) -> Squashed:
        """Squash the snapshot with share `bit` in a transaction of its own."""
        squashed = self._txn.request(lambda: self._squash(bit))
        self._txn.commit()
        self._squashed.append(squashed)
        return squashed

    def squash_for_reserve(self, spare: Collection[int]) -> Squashed | None:
        """Squash the first expendable snapshot, as a request of the open transaction.

        For the free-space reserve: the caller commits. Returns None when no
        snapshot is expendable.
        """
        order = squash_order(self._state, spare)
        if not order:
            return None
        squashed = replace(self._txn.request(lambda: self._squash(order[0])), reserve=True)
        self._squashed.append(squashed)
        return squashed

    def _squash(self, bit: int) -> Squashed:
        state = self._state
        record = state.snapshots[bit]
        assert record is not None and record.state == SnapshotState.LIVE
        squashed = Squashed(record.tag, record.priority, state.unique[bit], state.shared[bit])
        state.set_snapshot(bit, replace(record, state=SnapshotState.SQUASHED))
        if state.unique[bit] or state.shared[bit]:
            # The pass in progress starts again from chunk 0 with this bit
            # added: clearing is idempotent, so the bits it already swept
            # below its cursor cost a second look and nothing more.
            state.sweep_mask |= 1 << bit
            state.sweep_cursor = 0
        return squashed
