"""The sweep: reclaiming deleted and squashed snapshots' space.

Owns the sweep's progress in the store state (the share bits being swept and
the next logical chunk to visit). It runs in the background, and on demand
when a copy-out waits for room (csnapd.engine.squash).

The sweep reads only the leaves that may hold a swept bit: it goes from
leaf to leaf through the index summaries (ExceptionTree.seek), skipping
every subtree whose summary lacks all the swept bits, and makes the
summaries on the path of each leaf it visits exact. Its cost follows the
swept snapshots' own exceptions (and the depth of the tree), not the size
of the tree. A bit that no summary of the root holds is used nowhere: its
slot is released at once, before the pass reaches its end.

A step is bounded in the leaves it changes (SWEEP_LEAVES_PER_STEP) and,
more loosely, in the leaves it only looks at (SWEEP_VISITS_PER_STEP) and in
time (SWEEP_STEP_SECONDS), so no step pauses a server's clients for long.
Each step is one request of a fresh transaction, bounded in dirty blocks
and in leaves visited, so that a server pauses its clients for a few
milliseconds at most.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from csnap_format import SnapshotState
from csnapd.engine.allocator import Allocator
from csnapd.engine.btree import ExceptionTree
from csnapd.engine.pager import Pager
from csnapd.engine.state import StoreState, bits_of
from csnapd.engine.stats import EngineStats
from csnapd.engine.transaction import Transaction

__all__ = ["SWEEP_LEAVES_PER_STEP", "SWEEP_STEP_SECONDS", "SWEEP_VISITS_PER_STEP", "Sweeper"]

log = logging.getLogger("csnapd.engine")

#: Most btree leaves one sweep step visits (a step is one transaction and,
#: in csnapd, a pause for every client: a few milliseconds at most).
SWEEP_LEAVES_PER_STEP = 16
#: Most btree leaves one sweep step looks at, changed or not: reading a leaf
#: without a swept bit costs a small fraction of changing one.
SWEEP_VISITS_PER_STEP = 128
#: A step looks at no further leaf once it has run this long (it always
#: finishes the leaf it is on): leaves read from disk cost far more than
#: cached ones.
SWEEP_STEP_SECONDS = 0.005


class Sweeper:
    """Clears deleted snapshots' share bits from the btree, a step at a time."""

    def __init__(
        self,
        state: StoreState,
        pager: Pager,
        tree: ExceptionTree,
        data: Allocator,
        transaction: Transaction,
        stats: EngineStats,
        *,
        timer: Callable[[], float] = time.monotonic,
    ):
        self._timer = timer
        self._stats = stats
        self._state = state
        self._pager = pager
        self._tree = tree
        self._data = data
        self._txn = transaction

    @property
    def pending(self) -> bool:
        """Whether deleted or squashed snapshots still have space to reclaim."""
        return bool(self._state.reclaim_mask)

    def sweep(self) -> bool:
        """Reclaim deleted snapshots' space for one transaction's worth.

        Starts a fresh transaction (committing pending requests first) and
        leaves its changes pending; the caller commits. Returns whether more
        remains to do.
        """
        self._txn.check_usable()
        if not self.pending:
            return False
        if self._pager.dirty:
            self._txn.commit()
        self._txn.request(self._step)
        return self.pending

    def _step(self) -> None:
        state = self._state
        if not state.sweep_mask:
            state.sweep_mask = state.reclaim_mask
            state.sweep_cursor = 0
        # Room for merges and root changes beyond the leaf being swept.
        limit = self._txn.max_blocks - 1 - 2 * (state.depth + 2) - 2

        def may_continue() -> bool:
            return len(self._pager.dirty) < limit

        self._visit(may_continue)
        if state.sweep_mask:
            # Bits no summary of the root holds are used nowhere.
            gone = state.sweep_mask & ~self._tree.root_union()
            if gone == state.sweep_mask:
                self._finish()
            elif gone:
                self._release(gone)
                state.sweep_mask &= ~gone

    def _visit(self, may_continue: Callable[[], bool]) -> None:
        """Sweep the leaves that may hold a swept bit, as far as one step goes."""
        state = self._state
        # Bounded in leaves too: leaves emptied and merged away leave nothing
        # dirty, and a server answers nobody while a step runs.
        changed = 0
        deadline = self._timer() + SWEEP_STEP_SECONDS
        for _ in range(SWEEP_VISITS_PER_STEP):
            if changed >= SWEEP_LEAVES_PER_STEP or self._timer() > deadline:
                return
            chunk = self._tree.seek(state.sweep_cursor, state.sweep_mask)
            if chunk is None:
                self._finish()
                return
            after, touched = self._tree.sweep_leaf(
                chunk, state.sweep_mask, self._data.free, may_continue
            )
            self._stats.sweep_leaves += 1
            changed += touched
            if after is None:
                self._finish()
                return
            state.sweep_cursor = after
            if not may_continue():
                return

    def _finish(self) -> None:
        state = self._state
        self._release(state.sweep_mask)
        state.sweep_mask = 0
        state.sweep_mask = state.reclaim_mask
        state.sweep_cursor = 0

    def _release(self, mask: int) -> None:
        """The bits of `mask` are used nowhere: free their slots (a squashed
        snapshot keeps its tag and slot until it is deleted)."""
        state = self._state
        for bit in bits_of(mask):
            if state.unique[bit] or state.shared[bit]:
                log.error(
                    "sweep of share bit %d done but %d unique and %d shared exceptions"
                    " are still counted; run csnap-check",
                    bit,
                    state.unique[bit],
                    state.shared[bit],
                )
            record = state.snapshots[bit]
            if record is None or record.state != SnapshotState.SQUASHED:
                # A deleted snapshot's slot is free now; a squashed one keeps
                # its tag (and its slot) until it is deleted.
                state.set_snapshot(bit, None)
            state.unique[bit] = state.shared[bit] = 0
