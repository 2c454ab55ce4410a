"""Revert: making the origin's content equal to a snapshot's, in journaled steps.

Owns the revert's progress in the store state (docs/format.md, "State":
the snapshot, the cursor, chunks restored and to restore) and the steps that
advance it (docs/rules.md, "revert in journaled steps"):

  * `start` records the revert in the superblock (a request of the open
    transaction); from its commit on, a store opened again carries it, and
    csnapd resumes it (`finish` runs it to its end in one go).
  * Each `step` takes the next chunks, from the cursor up, where the
    snapshot holds an exception of its own: no more than
    RESTORE_CHUNKS_PER_STEP, and no more leaves than VISIT_LEAVES_PER_STEP.
    Where the snapshot shares the origin, the two are already equal.
  * Every other live snapshot that still shares one of those origin chunks
    gets its copy first, exactly as for an origin write, and that copy-out
    is committed (durable) before the origin is touched.
  * Then the snapshot's data is written onto the origin and the origin
    synced; only then does the cursor move past the chunks (a request the
    caller commits). A crash anywhere in a step repeats the whole step: the
    copy-out finds nothing left to copy, and the origin writes are the same
    again.
  * The snapshot survives and keeps its exceptions: after the revert it
    reads the same data from its own copies as the origin holds.
  * A chunk whose copy a repair marked lost (docs/format.md, "Lost copies")
    cannot be restored: the origin keeps its data there, the chunk is
    logged, and the revert goes on (the snapshot reads it as an error).

While a revert runs nothing may change what it copies or where it copies
from: creating a snapshot, a second revert, writing, deleting or squashing
the snapshot being reverted are refused (RevertInProgressError), and the
server holds origin writes (csnapd.write_gate).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from dataclasses import replace

from csnap_format import LOST_CHUNK, Geometry, RevertProgress
from csnap_format.runs import append_mapped_run, append_run
from csnapd.engine.btree import ExceptionTree
from csnapd.engine.copyout import COPY_IO_BYTES, CopyOut
from csnapd.engine.device import BlockDevice
from csnapd.engine.errors import RevertInProgressError, StoreIOError
from csnapd.engine.snapshots import SnapshotTable
from csnapd.engine.squash import Squasher
from csnapd.engine.state import StoreState
from csnapd.engine.transaction import Transaction
from csnapd.engine.validation import Ranges

__all__ = ["RESTORE_CHUNKS_PER_STEP", "VISIT_LEAVES_PER_STEP", "Reverter"]

log = logging.getLogger("csnapd.engine")

#: Most chunks one revert step copies onto the origin.
RESTORE_CHUNKS_PER_STEP = 256
#: Most btree leaves one revert step looks at for the snapshot's exceptions.
VISIT_LEAVES_PER_STEP = 64


class Reverter:
    """Starts reverts and advances the one in progress, a step at a time."""

    def __init__(
        self,
        *,
        devices: tuple[BlockDevice, BlockDevice],
        geometry: Geometry,
        state: StoreState,
        tree: ExceptionTree,
        snapshots: SnapshotTable,
        copy: CopyOut,
        squasher: Squasher,
        transaction: Transaction,
    ):
        self._store, self._origin = devices
        self._geometry = geometry
        self._state = state
        self._tree = tree
        self._snapshots = snapshots
        self._copy = copy
        self._squasher = squasher
        self._txn = transaction

    @property
    def progress(self) -> RevertProgress | None:
        """The revert in progress (as the open transaction has it), if any."""
        return self._state.revert

    def refuse_if_running(self, what: str) -> None:
        """Refuse `what` while a revert runs."""
        revert = self._state.revert
        if revert is not None:
            raise RevertInProgressError(
                f"{what} is refused while the origin is being reverted to snapshot"
                f" {revert.tag} ({revert.restored} of {revert.total} chunks restored)"
            )

    def refuse_if_reverting(self, tag: int, what: str) -> None:
        """Refuse `what` to snapshot `tag` if it is the one being reverted to."""
        revert = self._state.revert
        if revert is not None and revert.tag == tag:
            self.refuse_if_running(what)

    def start(self, tag: int) -> RevertProgress:
        """Begin reverting the origin to snapshot `tag` (a request; the caller commits)."""
        return self._txn.request(lambda: self._start(tag))

    def _start(self, tag: int) -> RevertProgress:
        state = self._state
        self.refuse_if_running("another revert")
        bit = self._snapshots.io_bit(tag)
        total = state.unique[bit] + state.shared[bit]
        state.revert = RevertProgress(tag=tag, bit=bit, cursor=0, restored=0, total=total)
        return state.revert

    def step(
        self,
        *,
        locked: Callable[[Ranges], bool] = lambda ranges: False,
        spare: Collection[int] = (),
        reclaim: bool = True,
    ) -> bool:
        """Advance the revert in progress by one step; whether any of it remains.

        Commits what is pending first, and the copy-out for other snapshots
        before the origin is written; leaves the cursor's advance pending for
        the caller's commit. Does nothing (and returns True) while `locked`
        says a snapshot reader holds one of the step's origin chunks.
        """
        self._txn.check_usable()
        revert = self._state.revert
        if revert is None:
            return False
        if self._txn.pending:
            self._txn.commit()
        chunks, targets, lost, end = self._window(revert)
        runs: list[tuple[int, int]] = []
        for chunk in chunks:
            append_run(runs, chunk, 1)
        if runs:
            if locked(runs):
                return True
            # Others sharing these origin chunks get their copies first, as
            # for an origin write; never by squashing the snapshot itself.
            self._squasher.with_room(
                lambda: self._copy.origin_write(runs),
                lambda: ({revert.tag, *spare}, reclaim),
            )
            self._txn.commit()
            self._restore(chunks, targets)
        done = end >= self._geometry.origin_chunks

        def advance() -> None:
            self._state.revert = (
                None
                if done
                else replace(revert, cursor=end, restored=revert.restored + len(chunks) + len(lost))
            )

        self._txn.request(advance)
        for chunk in lost:
            log.error(
                "revert to snapshot %d: chunk %d's copy was lost (csnap-check --repair"
                " marked it); the origin keeps its own data there",
                revert.tag,
                chunk,
                extra={"event": "revert.lost", "snapshot": revert.tag, "chunk": chunk},
            )
        return not done

    def finish(self, progress: Callable[[RevertProgress], None] | None = None) -> None:
        """Run the revert in progress to its end, committing each step."""
        while self.step():
            self._txn.commit()
            if progress is not None and self._state.revert is not None:
                progress(self._state.revert)
        self._txn.commit()

    def _window(self, revert: RevertProgress) -> tuple[list[int], list[int], list[int], int]:
        """The next chunks from the cursor where the snapshot holds an exception,
        their store chunks, those among them whose copy is lost, and where the
        cursor goes after them."""
        bit = 1 << revert.bit
        end = self._geometry.origin_chunks
        chunks: list[int] = []
        targets: list[int] = []
        lost: list[int] = []
        chunk = revert.cursor
        for _ in range(VISIT_LEAVES_PER_STEP):
            # Subtrees whose summary lacks the snapshot's bit hold nothing to restore.
            found = self._tree.seek(chunk, bit) if chunk < end else None
            if found is None:
                return chunks, targets, lost, end
            chunk = found
            leaf, _, hi = self._tree.descend(chunk)
            i, _ = leaf.find(chunk)
            at = sum(leaf.counts[:i])
            while i < len(leaf.chunks):
                logical, n = leaf.chunks[i], leaf.counts[i]
                for j in range(at, at + n):
                    if leaf.shares[j] & bit:
                        if len(chunks) + len(lost) == RESTORE_CHUNKS_PER_STEP:
                            return chunks, targets, lost, logical
                        if leaf.targets[j] == LOST_CHUNK:
                            lost.append(logical)
                            break
                        chunks.append(logical)
                        targets.append(leaf.targets[j])
                        break
                at += n
                i += 1
            chunk = hi
        return chunks, targets, lost, min(chunk, end)

    def _restore(self, chunks: list[int], targets: list[int]) -> None:
        """Write each store chunk of `targets` onto origin chunk `chunks`, and sync."""
        size = self._geometry.chunk_size
        most = max(1, COPY_IO_BYTES // size)
        runs: list[tuple[int, int, int]] = []
        for chunk, target in zip(chunks, targets, strict=True):
            append_mapped_run(runs, chunk, 1, target)
        try:
            for chunk, count, target in runs:
                for k in range(0, count, most):
                    n = min(most, count - k)
                    data = self._store.read((target + k) * size, n * size)
                    self._origin.write((chunk + k) * size, data)
            self._origin.sync()
        except OSError as exc:
            raise StoreIOError(
                f"restoring origin chunks {chunks[0]}..{chunks[-1]}: {exc.strerror or exc}"
            ) from exc
