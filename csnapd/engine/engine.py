"""The engine facade: every operation on a store, as atomic requests grouped
into durable transactions.

Owns the store's lifecycle (open, marking it busy and clean, close) and the
assembly of the objects that each keep one part of it:

  * the transaction (csnapd.engine.transaction): atomic requests, group
    commit, requests split over several transactions, refusing work after a
    failed commit;
  * the snapshot table (csnapd.engine.snapshots): create, delete, priority,
    use count, lookup and status;
  * the copy-out path (csnapd.engine.copyout): origin and snapshot writes;
  * the chunk reads (csnapd.engine.reads): snapshot reads and origin maps;
  * the changelist (csnapd.engine.changes): chunks that may differ between
    two views;
  * the client registry (csnapd.engine.clients);
  * the sweep (csnapd.engine.sweep): reclaiming deleted snapshots' space;
  * the store-full policy (csnapd.engine.squash): squashing expendable
    snapshots when a copy-out finds the store full;
  * the revert (csnapd.engine.revert): making the origin equal to a snapshot.

Callers use only `Engine`; its methods hand each request to its owner. The
engine's requests on whole snapshots are in csnapd.engine.snapshot_requests,
its online resize in csnapd.engine.online_resize, and what opening a store
does before the engine exists in csnapd.engine.opening.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Collection

from csnap_format import FormatError, Geometry, decode_superblock
from csnapd.engine.allocator import Allocator, data_space, metadata_space
from csnapd.engine.btree import ExceptionTree
from csnapd.engine.changes import CHANGES_LEAVES_PER_STEP, ChangeList, Changes
from csnapd.engine.clients import ClientRegistry
from csnapd.engine.copyout import CopyOut
from csnapd.engine.device import BlockDevice
from csnapd.engine.errors import FencedError, StoreIOError
from csnapd.engine.journal import Journal, JournalStats, RecoveryReport
from csnapd.engine.online_resize import OnlineResize
from csnapd.engine.opening import open_devices, read_geometry, recover_store
from csnapd.engine.pager import CacheStats, Pager
from csnapd.engine.reads import ChunkReads
from csnapd.engine.resize import write_geometry_backup
from csnapd.engine.results import OriginWriteResult, ReadSegment, WriteSegment
from csnapd.engine.revert import Reverter
from csnapd.engine.snapshot_requests import SnapshotRequests
from csnapd.engine.snapshots import SnapshotTable
from csnapd.engine.squash import Room, Squashed, Squasher
from csnapd.engine.state import StoreState
from csnapd.engine.stats import EngineStats
from csnapd.engine.sweep import SWEEP_LEAVES_PER_STEP, Sweeper
from csnapd.engine.transaction import CommitWrite, Transaction
from csnapd.engine.validation import Ranges

__all__ = [
    "CommitWrite",
    "Engine",
    "EngineStats",
    "Ranges",
    "DEFAULT_CACHE_BYTES",
    "SWEEP_LEAVES_PER_STEP",
    "read_geometry",
]

log = logging.getLogger("csnapd.engine")

#: Default bound on cached metadata (64 MiB of 4 KiB blocks: 16384 pages).
DEFAULT_CACHE_BYTES = 64 << 20


class Engine(SnapshotRequests, OnlineResize):
    """A csnap store, opened: all metadata operations, synchronous."""

    def __init__(
        self,
        store: BlockDevice,
        origin: BlockDevice,
        geometry: Geometry,
        journal: Journal,
        recovery: RecoveryReport,
        state: StoreState,
        *,
        cache_bytes: int,
        clock: Callable[[], int],
        owns_devices: bool,
        step_timer: Callable[[], float] = time.monotonic,
    ):
        #: What opening the store replayed from the journal.
        self.recovery = recovery
        #: Whether the store was marked clean when opened: its last server
        #: stopped cleanly (else this open recovered from a crash).
        self.opened_clean = state.clean
        self.stats = EngineStats()
        self._store = store
        self._origin = origin
        self._clock = clock
        #: Seconds for the time bound of a background step (a sweep's).
        self._step_timer = step_timer
        self._owns_devices = owns_devices
        self._journal = journal
        self._state = state
        self._cache_pages = cache_bytes // geometry.block_size
        #: Squashes noted by a squasher `resize` replaced, not yet taken.
        self._squashed_earlier: list[Squashed] = []
        self._assemble(geometry)

    def _assemble(self, geometry: Geometry) -> None:
        """Build the parts that keep one piece of the store, for `geometry`.

        Called again by `resize` (at a transaction boundary) with the new one.
        """
        self.geometry = geometry
        store, origin, state, journal = self._store, self._origin, self._state, self._journal
        self._pager = Pager(store, geometry, self._cache_pages)
        meta = Allocator(self._pager, state, metadata_space(geometry))
        data = Allocator(self._pager, state, data_space(geometry))
        tree = self._tree = ExceptionTree(self._pager, state, geometry, meta)
        txn = Transaction(journal, self._pager, state, geometry, (meta, data), self.stats)
        self._txn = txn
        self._snapshots = SnapshotTable(state, geometry, txn, self._clock)
        self._copy = CopyOut(
            devices=(store, origin),
            geometry=geometry,
            state=state,
            tree=tree,
            data=data,
            snapshots=self._snapshots,
            transaction=txn,
            stats=self.stats,
        )
        self._reads = ChunkReads(state, geometry, tree, self._snapshots, txn)
        self._changes = ChangeList(geometry, tree, self._snapshots, txn)
        self._registry = ClientRegistry(state, self._pager, meta, geometry, txn)
        self._sweeper = Sweeper(
            state, self._pager, tree, data, txn, self.stats, timer=self._step_timer
        )
        self._squasher = Squasher(state, self._sweeper, txn)
        self._reverter = Reverter(
            devices=(store, origin),
            geometry=geometry,
            state=state,
            tree=tree,
            snapshots=self._snapshots,
            copy=self._copy,
            squasher=self._squasher,
            transaction=txn,
        )

    # -- opening and closing ---------------------------------------------------

    @classmethod
    def open(
        cls,
        store: BlockDevice,
        origin: BlockDevice,
        *,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        clock: Callable[[], int] = time.time_ns,
        owns_devices: bool = False,
        step_timer: Callable[[], float] = time.monotonic,
    ) -> Engine:
        """Open a store: replay its journal, read its superblock, mark it busy.

        `clock` stamps what the store records (ns since the epoch);
        `step_timer` bounds background steps in time (a test that must
        replay exactly passes one that stands still).

        Raises:
            StoreOpenError: not a store, damaged, or the origin is too small.
            StoreIOError: the store cannot be read or written.
        """
        opened = recover_store(store, origin)
        engine = cls(
            store,
            origin,
            opened.geometry,
            opened.journal,
            opened.recovery,
            opened.state,
            cache_bytes=cache_bytes,
            clock=clock,
            owns_devices=owns_devices,
            step_timer=step_timer,
        )
        if engine._state.clean or opened.upgraded:
            engine._state.clean = False
            engine._txn.rewrite_superblock()
            engine.commit()
        if opened.upgraded:
            write_geometry_backup(store, opened.geometry)
            log.info("store upgraded to feature flags %#x", opened.geometry.features)
        return engine

    @classmethod
    def open_files(
        cls,
        store_path: str | os.PathLike[str],
        origin_path: str | os.PathLike[str],
        *,
        lock: bool = True,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        clock: Callable[[], int] = time.time_ns,
        origin_writable: bool = False,
        direct: bool | None = None,
    ) -> Engine:
        """Open a store kept in files or block devices, taking its lock.

        The origin is opened for writing only with `origin_writable` (a
        server, which reverts it); otherwise a revert fails with an I/O error.
        `direct`: O_DIRECT for block devices only (None), for files too
        (True), or never (False); see FileDevice.

        Raises:
            StoreLockedError: another server holds the store (rule: one server per store).
            StoreOpenError, StoreIOError: as for `open`.
        """
        store, origin = open_devices(
            store_path, origin_path, lock=lock, origin_writable=origin_writable, direct=direct
        )
        try:
            return cls.open(store, origin, cache_bytes=cache_bytes, clock=clock, owns_devices=True)
        except BaseException:
            store.close()
            origin.close()
            raise

    def close(self) -> None:
        """Commit what is pending, mark the store clean, and release it."""
        try:
            if not self._txn.failed:
                self.commit()
                self._state.clean = True
                self.commit()
                self._journal.sync()
        except OSError as exc:
            raise StoreIOError(f"closing the store: {exc.strerror or exc}") from exc
        finally:
            if self._owns_devices:
                self._store.close()
                self._origin.close()

    def abandon(self) -> None:
        """Release the store without writing anything: this server was fenced.

        The store stays busy; what was committed is in the journal, and the
        server elected since owns the store.
        """
        if self._owns_devices:
            self._store.close()
            self._origin.close()

    # -- properties ------------------------------------------------------------

    @property
    def chunk_size(self) -> int:
        return self.geometry.chunk_size

    @property
    def origin_chunks(self) -> int:
        return self.geometry.origin_chunks

    @property
    def max_transaction_blocks(self) -> int:
        """Most metadata blocks (superblock included) one transaction carries."""
        return self._txn.max_blocks

    @property
    def failed(self) -> bool:
        """Whether a commit failed; nothing more is accepted."""
        return self._txn.failed

    @property
    def pending(self) -> bool:
        """Whether requests were applied that no commit has made durable."""
        return self._txn.pending

    @property
    def sweep_pending(self) -> bool:
        """Whether deleted snapshots still have space to reclaim."""
        return self._sweeper.pending

    @property
    def live_mask(self) -> int:
        """Share bits of the live snapshots."""
        return self._state.live_mask

    @property
    def journal_stats(self) -> JournalStats:
        return self._journal.stats

    @property
    def cache_stats(self) -> CacheStats:
        return self._pager.stats

    @property
    def cached_pages(self) -> int:
        return len(self._pager)

    # -- transactions ------------------------------------------------------------

    def commit(self) -> int | None:
        """Make every request applied so far durable; returns the sequence.

        Returns None when there was nothing to commit.

        Raises:
            EngineFailedError: the commit failed; the engine is now unusable.
        """
        return self._txn.commit()

    def prepare_commit(self) -> CommitWrite:
        """commit() in three steps, for a caller that writes in a worker thread:
        prepare here, `CommitWrite.write()` there (blocking: the journal's
        writes and sync), then `settle_commit` here. In between, only
        requests that change nothing may be applied (lookups and reads);
        one that changes the store raises RuntimeError."""
        return self._txn.prepare_commit()

    def settle_commit(self, commit: CommitWrite) -> int | None:
        """The end of a commit prepared by prepare_commit; returns the sequence.

        Raises:
            EngineFailedError: the commit failed; the engine is now unusable.
        """
        return self._txn.settle_commit(commit)

    # -- data-path requests ------------------------------------------------------

    def origin_write(
        self,
        ranges: Ranges,
        *,
        spare: Collection[int] = (),
        reclaim: bool = True,
        room: Room | None = None,
    ) -> OriginWriteResult:
        """Prepare origin chunks to be overwritten (see CopyOut.origin_write).

        A full store squashes expendable snapshots first (see Squasher):
        never those tagged in `spare`, and none at all without `reclaim`;
        or, given `room`, on the terms it returns, asked only once the
        store is full.
        """
        return self._squasher.with_room(
            lambda: self._copy.origin_write(ranges), room or (lambda: (spare, reclaim))
        )

    def snapshot_write(
        self,
        tag: int,
        ranges: Ranges,
        *,
        spare: Collection[int] = (),
        reclaim: bool = True,
        room: Room | None = None,
    ) -> list[WriteSegment]:
        """Give snapshot `tag` its own copy of each chunk (see CopyOut.snapshot_write).

        A full store squashes as for origin_write, never snapshot `tag` itself.
        """
        self._reverter.refuse_if_reverting(tag, "writing the snapshot")
        return self._squasher.with_room(
            lambda: self._copy.snapshot_write(tag, ranges), _sparing(tag, spare, reclaim, room)
        )

    def snapshot_write_data(
        self,
        tag: int,
        offset: int,
        data: bytes,
        *,
        spare: Collection[int] = (),
        reclaim: bool = True,
        room: Room | None = None,
    ) -> tuple[list[WriteSegment], bool]:
        """Write `data` at byte `offset` of snapshot `tag` into its new copies,
        or hand the chunks out as snapshot_write does (see
        CopyOut.snapshot_write_data): the segments, and whether it wrote.

        A full store squashes as for snapshot_write.
        """
        self._reverter.refuse_if_reverting(tag, "writing the snapshot")
        return self._squasher.with_room(
            lambda: self._copy.snapshot_write_data(tag, offset, data),
            _sparing(tag, spare, reclaim, room),
        )

    def snapshot_read(self, tag: int, ranges: Ranges) -> list[ReadSegment]:
        """Where snapshot `tag`'s chunks are (see ChunkReads.snapshot_read)."""
        return self._reads.snapshot_read(tag, ranges)

    def snapshot_owned(
        self, tag: int, ranges: Ranges
    ) -> tuple[list[tuple[int, int, int]], list[tuple[int, int]]]:
        """Chunks snapshot `tag` owns alone, and those it shares with the origin
        (see ChunkReads.snapshot_owned)."""
        return self._reads.snapshot_owned(tag, ranges)

    def origin_shared(self, ranges: Ranges) -> list[tuple[int, int]]:
        """Ranges of origin chunks that some live snapshot still shares."""
        return self._reads.origin_shared(ranges)

    def origin_copied(self, ranges: Ranges) -> list[tuple[int, int]]:
        """Ranges of origin chunks that some live snapshot holds a copy of."""
        return self._reads.origin_copied(ranges)

    def exceptions(self, start: int, count: int) -> list[tuple[int, int, int]]:
        """Every exception of logical chunks start..start+count-1, in order."""
        return self._reads.exceptions(start, count)

    # -- fencing ---------------------------------------------------------------

    @property
    def fence_token(self) -> int:
        """The fencing token this store carries (0: never served under a cluster)."""
        return self._state.fence_token

    def claim_fence(self, token: int) -> None:
        """Journal `token` as the store's fencing token, before serving under it.

        From the commit on, a server holding an older token that looks at
        the store sees this one and stops writing.

        Raises:
            FencedError: the store carries a newer token than `token`.
            EngineFailedError: the commit failed.
        """
        if token < self._state.fence_token:
            raise FencedError(
                f"the store carries fencing token {self._state.fence_token},"
                f" newer than this server's {token}"
            )
        self._state.fence_token = token
        self._state.fence_ns = self._clock()
        self.commit()

    def fence_token_on_disk(self) -> int | None:
        """The fencing token in the superblock on the device now, past every cache.

        None when the superblock cannot be read or decoded at this instant
        (a write of it in progress): the caller looks again later.
        """
        try:
            sb = decode_superblock(self._store.read(0, self.geometry.block_size))
        except (OSError, FormatError):
            return None
        return sb.fence_token

    # -- changelists -------------------------------------------------------------

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
        """Chunks that may differ between two views (see ChangeList.changes)."""
        return self._changes.changes(
            base, target, start, count, max_runs=max_runs, max_leaves=max_leaves
        )

    # -- the client registry -------------------------------------------------------

    def registered_clients(self) -> tuple[frozenset[int], bool]:
        """The snapshot clients the registry names, and whether it overflowed.

        Read when a server starts: after a crash these are the clients that
        may still hold read locks on origin chunks.
        """
        return self._registry.clients()

    def set_registered_clients(self, clients: frozenset[int]) -> None:
        """Record which snapshot clients are connected (a request)."""
        self._registry.set_clients(clients)

    # -- background deletion -------------------------------------------------

    def sweep(self) -> bool:
        """Reclaim deleted snapshots' space for one transaction's worth.

        Starts a fresh transaction (committing pending requests first) and
        leaves its changes pending; the caller commits. Returns whether more
        remains to do.
        """
        return self._sweeper.sweep()


def _sparing(tag: int, spare: Collection[int], reclaim: bool, room: Room | None) -> Room:
    """The room terms of a write to snapshot `tag`: never squash `tag` itself."""
    terms = room or (lambda: (spare, reclaim))

    def sparing_tag() -> tuple[Collection[int], bool]:
        others, may_reclaim = terms()
        return {tag, *others}, may_reclaim

    return sparing_tag
