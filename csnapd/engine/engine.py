# The engine facade: every operation on a store, as atomic requests grouped
# into durable transactions.
#
# Theory of operation:
#   * A request (origin write, snapshot write, create, delete, ...) changes
#     pages and the store state of the open transaction. If it fails, every
#     change it made is rolled back and the transaction goes on without it.
#   * `commit()` makes every request applied since the last commit durable
#     with one journal transaction and (at most) two syncs: group commit. A
#     caller must not report a request's result before the commit that
#     carries it returns (rule 1).
#   * A request that would overflow the transaction commits the earlier ones
#     first. A write too big for one transaction on its own is carried by
#     several: it is applied in pieces of chunks, each piece committed before
#     the next starts, and only the last left pending for the caller's commit
#     (docs/protocol.md, "Requests larger than one transaction"). Its first,
#     whole attempt ran to the end before it was rolled back, so the space
#     and the reads the pieces need are known to be there.
#   * Ranges are checked before anything is done: inside the origin, at least
#     one chunk, and no chunk named twice (a chunk copied twice would give
#     two exceptions of one chunk the same share bit).
#   * If a commit fails, the engine refuses all further work
#     (EngineFailedError): after a failed sync nothing is known to be durable,
#     and the only safe way on is to reopen the store and replay the journal.
#   * Copy-out data goes only into chunks allocated by the request (rule 4),
#     consecutive chunks in one read and one write.
from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import TypeVar

from csnap_format import (
    MAX_TAG,
    MIN_BLOCK_SIZE,
    FormatError,
    Geometry,
    SnapshotRecord,
    SnapshotState,
    decode_geometry,
    decode_superblock,
    encode_superblock,
    registry_capacity,
)
from csnapd.engine.allocator import Allocator, data_space, metadata_space
from csnapd.engine.btree import ExceptionTree
from csnapd.engine.device import BlockDevice, FileDevice
from csnapd.engine.errors import (
    EngineFailedError,
    InvalidRequestError,
    MetadataFullError,
    OverlappingRangesError,
    RequestTooLargeError,
    SnapshotBusyError,
    SnapshotExistsError,
    SnapshotNotFoundError,
    SnapshotUnavailableError,
    StoreFullError,
    StoreIOError,
    StoreOpenError,
    TooManySnapshotsError,
)
from csnapd.engine.journal import Journal, RecoveryReport
from csnapd.engine.pager import Pager
from csnapd.engine.pages import RegistryPage, encode_page
from csnapd.engine.results import (
    OriginWriteResult,
    ReadSegment,
    SnapshotInfo,
    StoreStatus,
    WriteSegment,
)
from csnapd.engine.state import StoreState, bits_of

__all__ = [
    "Engine",
    "EngineStats",
    "Ranges",
    "DEFAULT_CACHE_BYTES",
    "MAX_REQUEST_CHUNKS",
]

log = logging.getLogger("csnapd.engine")

#: Most btree leaves one sweep step visits (a step is one transaction and,
#: in csnapd, a pause for every client: a few milliseconds at most).
SWEEP_LEAVES_PER_STEP = 16

#: Default bound on cached metadata (64 MiB of 4 KiB blocks: 16384 pages).
DEFAULT_CACHE_BYTES = 64 << 20
#: Copy-out reads and writes are done in pieces of at most this many bytes.
COPY_IO_BYTES = 8 << 20
#: Most chunks one request may name (bounds the memory a request can cost).
MAX_REQUEST_CHUNKS = 1 << 16

#: (first logical chunk, number of chunks) pairs.
Ranges = Sequence[tuple[int, int]]

_T = TypeVar("_T")

#: Fraction of a transaction one piece of a split write aims to fill: room
#: for pieces whose chunks need more metadata than the average.
_PIECE_FILL = 0.75


class _TransactionOverflowError(RequestTooLargeError):
    """A request alone changes more metadata blocks than one transaction holds."""

    def __init__(self, message: str, *, blocks: int):
        super().__init__(message)
        #: Metadata blocks (superblock included) the whole request changed.
        self.blocks = blocks


@dataclass(slots=True)
class EngineStats:
    """Counters since the store was opened."""

    requests: int = 0
    failed_requests: int = 0
    commits: int = 0
    copied_chunks: int = 0
    copy_reads: int = 0
    copy_writes: int = 0
    deferred_commits: int = 0
    #: Writes too big for one transaction, carried by several.
    split_requests: int = 0


def read_geometry(store: BlockDevice) -> Geometry:
    """The store's geometry, from block 0 or, failing that, its backup.

    Raises:
        StoreOpenError: neither copy is readable.
    """
    try:
        return decode_geometry(store.read(0, min(MIN_BLOCK_SIZE, store.size)))
    except OSError as exc:
        raise StoreIOError(f"reading the superblock: {exc.strerror or exc}") from exc
    except FormatError as first:
        size = MIN_BLOCK_SIZE
        while size <= 1 << 20 and 2 * size <= store.size:
            try:
                geometry = decode_geometry(store.read(size, MIN_BLOCK_SIZE))
            except (OSError, FormatError):
                geometry = None
            if geometry is not None and geometry.block_size == size:
                log.warning("superblock geometry unreadable (%s); using the backup", first)
                return geometry
            size *= 2
        raise StoreOpenError(f"not a usable csnap store: {first}") from first


class Engine:
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
    ):
        self.geometry = geometry
        #: What opening the store replayed from the journal.
        self.recovery = recovery
        self._store = store
        self._origin = origin
        self._owns_devices = owns_devices
        self._journal = journal
        self._state = state
        self._committed = state.copy()
        self._pager = Pager(store, geometry, cache_bytes // geometry.block_size)
        self._meta = Allocator(self._pager, state, metadata_space(geometry))
        self._data = Allocator(self._pager, state, data_space(geometry))
        self._tree = ExceptionTree(self._pager, state, geometry, self._meta)
        self._clock = clock
        self._failure: BaseException | None = None
        self._data_written = False
        self._pending_requests = 0
        self.stats = EngineStats()
        #: Most metadata blocks (superblock included) one transaction carries:
        #: three such transactions fit the journal, so checkpoints are rare.
        self.max_transaction_blocks = min(
            journal.max_blocks, max(8, (geometry.journal_blocks - 4) // 3 - 1)
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
    ) -> Engine:
        """Open a store: replay its journal, read its superblock, mark it busy.

        Raises:
            StoreOpenError: not a store, damaged, or the origin is too small.
            StoreIOError: the store cannot be read or written.
        """
        geometry = read_geometry(store)
        if store.size < geometry.store_bytes:
            raise StoreOpenError(
                f"the store device has {store.size} bytes but was formatted"
                f" for {geometry.store_bytes}"
            )
        if origin.size < geometry.origin_bytes:
            raise StoreOpenError(
                f"the origin has {origin.size} bytes but the store was formatted"
                f" for an origin of {geometry.origin_bytes}: wrong origin?"
            )
        journal, report = Journal.recover(store, geometry)
        if report.problem:
            log.error("journal replay incomplete: %s", report.problem)
        try:
            sb = decode_superblock(store.read(0, geometry.block_size))
        except OSError as exc:
            raise StoreIOError(f"reading the superblock: {exc.strerror or exc}") from exc
        except FormatError as exc:
            raise StoreOpenError(f"the superblock is damaged after replay: {exc}") from exc
        engine = cls(
            store,
            origin,
            geometry,
            journal,
            report,
            StoreState.from_superblock(sb),
            cache_bytes=cache_bytes,
            clock=clock,
            owns_devices=owns_devices,
        )
        if engine._state.clean:
            engine._state.clean = False
            engine.commit()
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
    ) -> Engine:
        """Open a store kept in files or block devices, taking its lock.

        Raises:
            StoreLockedError: another server holds the store (rule 7).
            StoreOpenError, StoreIOError: as for `open`.
        """
        try:
            store = FileDevice(store_path, writable=True, lock=lock)
        except OSError as exc:
            raise StoreOpenError(f"cannot open store {store_path}: {exc.strerror}") from exc
        try:
            origin = FileDevice(origin_path, writable=False)
        except OSError as exc:
            store.close()
            raise StoreOpenError(f"cannot open origin {origin_path}: {exc.strerror}") from exc
        try:
            return cls.open(store, origin, cache_bytes=cache_bytes, clock=clock, owns_devices=True)
        except BaseException:
            store.close()
            origin.close()
            raise

    def close(self) -> None:
        """Commit what is pending, mark the store clean, and release it."""
        try:
            if self._failure is None:
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

    # -- properties ------------------------------------------------------------

    @property
    def chunk_size(self) -> int:
        return self.geometry.chunk_size

    @property
    def origin_chunks(self) -> int:
        return self.geometry.origin_chunks

    @property
    def failed(self) -> bool:
        """Whether a commit failed; nothing more is accepted."""
        return self._failure is not None

    @property
    def pending(self) -> bool:
        """Whether requests were applied that no commit has made durable."""
        return bool(self._pager.dirty) or self._state != self._committed

    @property
    def sweep_pending(self) -> bool:
        """Whether deleted snapshots still have space to reclaim."""
        return bool(self._state.mask_in(SnapshotState.DELETING))

    @property
    def live_mask(self) -> int:
        """Share bits of the live snapshots."""
        return self._state.live_mask

    @property
    def journal_stats(self) -> object:
        return self._journal.stats

    @property
    def cache_stats(self) -> object:
        return self._pager.stats

    @property
    def cached_pages(self) -> int:
        return len(self._pager)

    # -- requests ----------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._failure is not None:
            raise EngineFailedError(f"an earlier commit failed ({self._failure}); reopen the store")

    def _request(self, work: Callable[[], _T]) -> _T:
        """Apply `work` as one atomic request of the open transaction."""
        self._check_usable()
        self.stats.requests += 1
        for attempt in (1, 2):
            saved = self._state.copy()
            data_written = self._data_written
            self._pager.begin_request()
            try:
                result = work()
            except (StoreFullError, MetadataFullError) as exc:
                self._rollback(saved, data_written)
                if attempt == 1 and exc.pending_frees:
                    # Space freed by the open transaction becomes usable once
                    # it is durable: commit, then try once more.
                    self.commit()
                    continue
                self.stats.failed_requests += 1
                raise
            except BaseException:
                self._rollback(saved, data_written)
                self.stats.failed_requests += 1
                raise
            blocks = len(self._pager.dirty) + 1
            if blocks <= self.max_transaction_blocks:
                self._pager.end_request()
                self._pending_requests += 1
                return result
            self._rollback(saved, data_written)
            if attempt == 2 or self._pending_requests == 0:
                self.stats.failed_requests += 1
                raise _TransactionOverflowError(
                    f"the request changes {blocks} metadata blocks; one transaction"
                    f" holds {self.max_transaction_blocks}",
                    blocks=blocks,
                )
            self.stats.deferred_commits += 1
            self.commit()
        raise AssertionError("unreachable")  # pragma: no cover

    def _rollback(self, saved: StoreState, data_written: bool) -> None:
        self._pager.rollback_request()
        self._state.assign(saved)
        self._data_written = data_written

    def commit(self) -> int | None:
        """Make every request applied so far durable; returns the sequence.

        Returns None when there was nothing to commit.

        Raises:
            EngineFailedError: the commit failed; the engine is now unusable.
        """
        self._check_usable()
        state_changed = self._state != self._committed
        pages = list(self._pager.dirty.values())
        if not pages and not state_changed:
            return None
        geometry = self.geometry
        state = self._state

        def encode(sequence: int) -> list[tuple[int, bytes]]:
            images = [(page.address, encode_page(page, sequence, geometry)) for page in pages]
            if state_changed:
                sb = state.to_superblock(geometry, sequence)
                images.append((0, encode_superblock(sb)))
            return images

        try:
            sequence = self._journal.commit(
                len(pages) + state_changed, encode, data_written=self._data_written
            )
        except OSError as exc:
            self._failure = exc
            self._pager.drop_all()
            log.critical("commit failed, refusing all further work: %s", exc)
            raise EngineFailedError(
                f"commit failed: {exc.strerror or exc}; the store must be reopened"
                " (journal replay) before it is used again"
            ) from exc
        self._data_written = False
        self._meta.committed()
        self._data.committed()
        self._pager.committed()
        self._committed = self._state.copy()
        self._pending_requests = 0
        self.stats.commits += 1
        return sequence

    # -- validation ------------------------------------------------------------

    def _check_ranges(self, ranges: Ranges) -> None:
        """Refuse ranges outside the origin, naming no chunk, or naming one twice."""
        total = 0
        end = self.geometry.origin_chunks
        for start, count in ranges:
            if count < 1 or start < 0 or start + count > end:
                raise InvalidRequestError(
                    f"chunks {start}..{start + count - 1} are not inside the origin"
                    f" (chunks 0..{end - 1})"
                )
            total += count
        if total == 0:
            raise InvalidRequestError("the request names no chunks")
        if total > MAX_REQUEST_CHUNKS:
            raise RequestTooLargeError(
                f"the request names {total} chunks; at most {MAX_REQUEST_CHUNKS}"
            )
        following = 0
        for start, count in sorted(ranges):
            if start < following:
                raise OverlappingRangesError(
                    f"chunk {start} is named twice (ranges repeat or overlap)"
                )
            following = start + count

    def _bit(self, tag: int) -> int:
        bit = self._state.bit_of(tag)
        if bit is None:
            raise SnapshotNotFoundError(f"there is no snapshot with tag {tag}")
        return bit

    def _io_bit(self, tag: int) -> int:
        bit = self._bit(tag)
        record = self._state.snapshots[bit]
        if record is not None and record.state == SnapshotState.SQUASHED:
            raise SnapshotUnavailableError(f"snapshot {tag} was squashed; its data is gone")
        return bit

    # -- data movement -----------------------------------------------------------

    def _allocate_chunks(self, count: int) -> list[int]:
        chunks: list[int] = []
        for first, length in self._data.allocate(count):
            chunks.extend(range(first, first + length))
        return chunks

    def _move(self, pairs: Sequence[tuple[int, int]], source: BlockDevice, name: str) -> None:
        """Copy chunk `src` of `source` to store chunk `dst` for each pair.

        Consecutive sources are read together and consecutive targets written
        together, in pieces of at most COPY_IO_BYTES.
        """
        size = self.geometry.chunk_size
        most = max(1, COPY_IO_BYTES // size)
        i = 0
        while i < len(pairs):
            j = i + 1
            while j < len(pairs) and j - i < most and pairs[j][0] == pairs[j - 1][0] + 1:
                j += 1
            src = pairs[i][0]
            try:
                data = memoryview(source.read(src * size, (j - i) * size))
            except OSError as exc:
                raise StoreIOError(
                    f"reading {name} chunks {src}..{src + j - i - 1}: {exc.strerror or exc}"
                ) from exc
            self.stats.copy_reads += 1
            self._data_written = True
            k = i
            while k < j:
                m = k + 1
                while m < j and pairs[m][1] == pairs[m - 1][1] + 1:
                    m += 1
                dst = pairs[k][1]
                try:
                    self._store.write(dst * size, data[(k - i) * size : (m - i) * size])
                except OSError as exc:
                    raise StoreIOError(
                        f"writing copies to store chunks {dst}..{dst + m - k - 1}:"
                        f" {exc.strerror or exc}"
                    ) from exc
                self.stats.copy_writes += 1
                k = m
            i = j
        self.stats.copied_chunks += len(pairs)

    # -- requests larger than one transaction --------------------------------

    def _split_request(self, ranges: Ranges, work: Callable[[Ranges], _T]) -> list[_T]:
        """Apply `work` to `ranges` as one request, or in pieces if it must be.

        Returns the result of each piece, in ascending chunk order. Every
        piece but the last is committed before the next starts; the last is
        left pending for the caller's commit, as any request is.
        """
        try:
            return [self._request(lambda: work(ranges))]
        except _TransactionOverflowError as exc:
            overflow = exc
        # The whole attempt ran to its end before it was rolled back: every
        # chunk it allocated was free and every copy it read was readable.
        # The pieces do the same work, with commits between them that can
        # only add free space (frees of the open transaction become usable).
        self.stats.split_requests += 1
        total = sum(count for _, count in ranges)
        budget = int(self.max_transaction_blocks * _PIECE_FILL)
        size = max(1, total * budget // overflow.blocks)
        todo = sorted(ranges)
        results: list[_T] = []
        while todo:
            piece, rest = _take(todo, size)
            if self.pending:
                self.commit()
            try:
                results.append(self._request(partial(work, piece)))
            except _TransactionOverflowError:
                if size == 1:
                    raise RequestTooLargeError(
                        "one chunk changes more metadata than one transaction holds"
                        f" ({self.max_transaction_blocks} blocks): the journal is too small"
                    ) from None
                size = max(1, size // 2)
                continue
            todo = rest
        return results

    # -- data-path requests ------------------------------------------------------

    def origin_write(self, ranges: Ranges) -> OriginWriteResult:
        """Prepare origin chunks to be overwritten.

        Every chunk that some live snapshot still shares with the origin is
        copied out into new store chunks, with an exception shared by every
        live snapshot that lacks its own. After the commit that carries this
        request, the origin chunks may be written.
        """
        self._check_ranges(ranges)
        results = self._split_request(ranges, self._origin_write)
        return OriginWriteResult(sum(result.copied for result in results))

    def _origin_write(self, ranges: Ranges) -> OriginWriteResult:
        live = self._state.live_mask
        if not live:
            return OriginWriteResult(0)
        todo: list[tuple[int, int]] = []
        for start, count in ranges:
            for chunk, leaf, i, found in self._tree.entries(start, count):
                missing = live & ~leaf.using(i) if found else live
                if missing:
                    todo.append((chunk, missing))
        if not todo:
            return OriginWriteResult(0)
        targets = self._allocate_chunks(len(todo))
        self._move(
            [(c, t) for (c, _), t in zip(todo, targets, strict=True)],
            self._origin,
            "origin",
        )
        state = self._state
        for (chunk, missing), target in zip(todo, targets, strict=True):
            leaf = self._tree.leaf_for_update(chunk)
            i, found = leaf.find(chunk)
            leaf.add(i, found, chunk, missing, target)
            state.count_exception(missing, 1)
            state.exceptions += 1
        return OriginWriteResult(len(todo))

    def snapshot_write(self, tag: int, ranges: Ranges) -> list[WriteSegment]:
        """Give snapshot `tag` its own copy of each chunk; return where they are.

        A chunk the snapshot already owns alone is returned as it is; a chunk
        it shares (with the origin or with other snapshots) is copied into a
        new store chunk first.
        """
        self._check_ranges(ranges)
        pieces = self._split_request(ranges, lambda piece: self._snapshot_write(tag, piece))
        if len(pieces) == 1:
            return pieces[0]
        return _joined([segment for piece in pieces for segment in piece])

    def _snapshot_write(self, tag: int, ranges: Ranges) -> list[WriteSegment]:
        state = self._state
        bit = 1 << self._io_bit(tag)
        others = state.live_mask & ~bit
        where: dict[int, int] = {}
        from_origin: list[int] = []
        from_store: list[tuple[int, int]] = []
        for start, count in ranges:
            for chunk, leaf, i, found in self._tree.entries(start, count):
                j = leaf.exception_of(i, bit) if found else -1
                if j < 0:
                    from_origin.append(chunk)
                elif leaf.shares[j] & others:
                    from_store.append((chunk, leaf.targets[j]))
                else:
                    where[chunk] = leaf.targets[j]
        targets = self._allocate_chunks(len(from_origin) + len(from_store))
        origin_targets, store_targets = (
            targets[: len(from_origin)],
            targets[len(from_origin) :],
        )
        if from_origin:
            self._move(
                list(zip(from_origin, origin_targets, strict=True)),
                self._origin,
                "origin",
            )
        if from_store:
            pairs = [(src, dst) for (_, src), dst in zip(from_store, store_targets, strict=True)]
            self._move(pairs, self._store, "store")
        for chunk, target in zip(from_origin, origin_targets, strict=True):
            self._add_own(chunk, bit, target, shared=False)
            where[chunk] = target
        for (chunk, _), target in zip(from_store, store_targets, strict=True):
            self._add_own(chunk, bit, target, shared=True)
            where[chunk] = target
        return _segments(where)

    def _add_own(self, chunk: int, bit: int, target: int, *, shared: bool) -> None:
        """Give the snapshot with share `bit` its own exception for `chunk`."""
        state = self._state
        leaf = self._tree.leaf_for_update(chunk)
        i, found = leaf.find(chunk)
        if shared:
            j = leaf.exception_of(i, bit)
            old = leaf.shares[j]
            state.count_exception(old, -1)
            leaf.shares[j] = old & ~bit
            state.count_exception(old & ~bit, 1)
        leaf.add(i, found, chunk, bit, target)
        state.count_exception(bit, 1)
        state.exceptions += 1

    def snapshot_read(self, tag: int, ranges: Ranges) -> list[ReadSegment]:
        """Where snapshot `tag`'s chunks are: store chunks, or the origin.

        Segments with `store_chunk` None are shared with the origin; the
        caller must hold them against origin writes while it reads them.
        """
        self._check_ranges(ranges)
        return self._request(lambda: self._snapshot_read(tag, ranges))

    def _snapshot_read(self, tag: int, ranges: Ranges) -> list[ReadSegment]:
        bit = 1 << self._io_bit(tag)
        segments: list[ReadSegment] = []
        for start, count in ranges:
            for chunk, leaf, i, found in self._tree.entries(start, count):
                j = leaf.exception_of(i, bit) if found else -1
                target = leaf.targets[j] if j >= 0 else None
                if segments:
                    last = segments[-1]
                    follows = last.chunk + last.count == chunk
                    if follows and (
                        (target is None and last.store_chunk is None)
                        or (
                            target is not None
                            and last.store_chunk is not None
                            and last.store_chunk + last.count == target
                        )
                    ):
                        segments[-1] = ReadSegment(last.chunk, last.count + 1, last.store_chunk)
                        continue
                segments.append(ReadSegment(chunk, 1, target))
        return segments

    def origin_shared(self, ranges: Ranges) -> list[tuple[int, int]]:
        """Ranges of origin chunks that some live snapshot still shares.

        These are the chunks an origin write would copy out first.
        """
        self._check_ranges(ranges)
        return self._request(lambda: self._origin_shared(ranges))

    def _origin_shared(self, ranges: Ranges) -> list[tuple[int, int]]:
        # Shared: some live snapshot has no exception of its own there.
        return self._origin_where(ranges, lambda found, using, live: not found or live & ~using)

    def origin_copied(self, ranges: Ranges) -> list[tuple[int, int]]:
        """Ranges of origin chunks that some live snapshot holds a copy of."""
        self._check_ranges(ranges)
        return self._request(lambda: self._origin_copied(ranges))

    def _origin_copied(self, ranges: Ranges) -> list[tuple[int, int]]:
        # Copied: some live snapshot uses an exception there.
        return self._origin_where(ranges, lambda found, using, live: found and live & using)

    def _origin_where(
        self, ranges: Ranges, wanted: Callable[[bool, int, int], object]
    ) -> list[tuple[int, int]]:
        """Ranges of the origin chunks for which wanted(found, share mask, live mask)."""
        live = self._state.live_mask
        out: list[tuple[int, int]] = []
        if not live:
            return out
        for start, count in ranges:
            for chunk, leaf, i, found in self._tree.entries(start, count):
                if not wanted(found, leaf.using(i) if found else 0, live):
                    continue
                if out and out[-1][0] + out[-1][1] == chunk:
                    out[-1] = (out[-1][0], out[-1][1] + 1)
                else:
                    out.append((chunk, 1))
        return out

    def exceptions(self, start: int, count: int) -> list[tuple[int, int, int]]:
        """Every exception of logical chunks start..start+count-1, in order.

        Returns (logical chunk, share mask, store chunk) triples: the btree as
        it is, including bits of snapshots still being deleted. Costs one
        descent per leaf whatever the range, so it can list a whole origin.
        """
        end = self.geometry.origin_chunks
        if count < 1 or start < 0 or start + count > end:
            raise InvalidRequestError(
                f"chunks {start}..{start + count - 1} are not inside the origin"
            )
        return self._request(lambda: self._exceptions(start, start + count))

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

    # -- the client registry -------------------------------------------------------

    def registered_clients(self) -> tuple[frozenset[int], bool]:
        """The snapshot clients the registry names, and whether it overflowed.

        Read when a server starts: after a crash these are the clients that
        may still hold read locks on origin chunks.
        """
        self._check_usable()
        if not self._state.registry:
            return frozenset(), False
        page = self._pager.registry(self._state.registry)
        return frozenset(page.clients), page.overflow

    def set_registered_clients(self, clients: frozenset[int]) -> None:
        """Record which snapshot clients are connected (a request)."""
        self._request(lambda: self._set_registry(clients))

    def _set_registry(self, clients: frozenset[int]) -> None:
        ids = tuple(sorted(clients))
        capacity = registry_capacity(self.geometry.block_size)
        overflow = len(ids) > capacity
        ids = ids[:capacity]
        state = self._state
        if not state.registry:
            if ids or overflow:
                address = self._meta.allocate_one()
                self._pager.create(RegistryPage(address, ids, overflow))
                state.registry = address
            return
        page = self._pager.registry(state.registry)
        if (page.clients, page.overflow) != (ids, overflow):
            page = self._pager.modify(page)
            page.clients, page.overflow = ids, overflow

    # -- snapshots ---------------------------------------------------------------

    def create_snapshot(self, tag: int, priority: int = 0) -> SnapshotInfo:
        """Create a snapshot of the origin as it is now."""
        _check_tag(tag)
        _check_priority(priority)
        return self._request(lambda: self._create(tag, priority))

    def _create(self, tag: int, priority: int) -> SnapshotInfo:
        state = self._state
        if state.bit_of(tag) is not None:
            raise SnapshotExistsError(f"a snapshot with tag {tag} already exists")
        bit = state.free_bit()
        if bit is None:
            deleting = len(bits_of(state.mask_in(SnapshotState.DELETING)))
            more = f" ({deleting} still being deleted)" if deleting else ""
            raise TooManySnapshotsError(f"all 64 snapshot slots are in use{more}")
        state.snapshots[bit] = SnapshotRecord(
            tag=tag,
            state=SnapshotState.LIVE,
            priority=priority,
            use_count=0,
            created_ns=self._clock(),
            origin_chunks=self.geometry.origin_chunks,
        )
        state.unique[bit] = state.shared[bit] = 0
        return self._info(bit)

    def delete_snapshot(self, tag: int) -> SnapshotInfo:
        """Delete a snapshot: its tag goes at once, its space in the background."""
        return self._request(lambda: self._delete(tag))

    def _delete(self, tag: int) -> SnapshotInfo:
        state = self._state
        bit = self._bit(tag)
        record = state.snapshots[bit]
        assert record is not None
        if record.use_count:
            raise SnapshotBusyError(
                f"snapshot {tag} has use count {record.use_count}; set it to 0 to delete it"
            )
        info = self._info(bit)
        if not state.unique[bit] and not state.shared[bit]:
            # No exception carries this bit: the slot is free at once.
            state.snapshots[bit] = None
        else:
            state.snapshots[bit] = replace(record, state=SnapshotState.DELETING)
            if not state.sweep_mask:
                state.sweep_mask, state.sweep_cursor = 1 << bit, 0
        return replace(info, state="deleting")

    def set_priority(self, tag: int, priority: int) -> SnapshotInfo:
        """Set a snapshot's priority (-128..127)."""
        _check_priority(priority)
        return self._request(lambda: self._update(tag, priority=priority))

    def change_use_count(self, tag: int, delta: int) -> SnapshotInfo:
        """Add `delta` to a snapshot's use count (0 reads it)."""
        return self._request(lambda: self._update(tag, delta=delta))

    def _update(self, tag: int, *, priority: int | None = None, delta: int = 0) -> SnapshotInfo:
        state = self._state
        bit = self._bit(tag)
        record = state.snapshots[bit]
        assert record is not None
        count = record.use_count + delta
        if not 0 <= count <= 0xFFFF_FFFF:
            raise InvalidRequestError(
                f"use count of snapshot {tag} would become {count} (0..4294967295)"
            )
        state.snapshots[bit] = replace(
            record,
            use_count=count,
            priority=record.priority if priority is None else priority,
        )
        return self._info(bit)

    def _info(self, bit: int) -> SnapshotInfo:
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
        self._check_usable()
        return self._info(self._bit(tag))

    def snapshots(self) -> list[SnapshotInfo]:
        """Live (and squashed) snapshots, oldest first."""
        self._check_usable()
        state = self._state
        infos = [
            self._info(bit)
            for bit, record in enumerate(state.snapshots)
            if record is not None and record.state != SnapshotState.DELETING
        ]
        return sorted(infos, key=lambda info: (info.created_ns, info.bit))

    def status(self) -> StoreStatus:
        """Store totals and every snapshot, without walking the btree."""
        self._check_usable()
        state, g = self._state, self.geometry
        deleting = [
            self._info(bit)
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
            sequence=self._journal.next_sequence - 1,
            snapshots=tuple(self.snapshots()),
            deleting=tuple(deleting),
            sweep_cursor=state.sweep_cursor,
        )

    # -- background deletion -------------------------------------------------

    def sweep(self) -> bool:
        """Reclaim deleted snapshots' space for one transaction's worth.

        Starts a fresh transaction (committing pending requests first) and
        leaves its changes pending; the caller commits. Returns whether more
        remains to do.
        """
        self._check_usable()
        if not self.sweep_pending:
            return False
        if self._pager.dirty:
            self.commit()
        self._request(self._sweep_step)
        return self.sweep_pending

    def _sweep_step(self) -> None:
        state = self._state
        if not state.sweep_mask:
            state.sweep_mask = state.mask_in(SnapshotState.DELETING)
            state.sweep_cursor = 0
        # Room for merges and root changes beyond the leaf being swept.
        limit = self.max_transaction_blocks - 1 - 2 * (state.depth + 2) - 2

        def may_continue() -> bool:
            return len(self._pager.dirty) < limit

        chunk = state.sweep_cursor
        # Bounded in leaves too: leaves emptied and merged away leave nothing
        # dirty, and a server answers nobody while a step runs.
        for _ in range(SWEEP_LEAVES_PER_STEP):
            after = self._tree.sweep_leaf(chunk, state.sweep_mask, self._data.free, may_continue)
            if after is None:
                self._finish_sweep()
                return
            state.sweep_cursor = chunk = after
            if not may_continue():
                return

    def _finish_sweep(self) -> None:
        state = self._state
        for bit in bits_of(state.sweep_mask):
            if state.unique[bit] or state.shared[bit]:
                log.error(
                    "sweep of share bit %d done but %d unique and %d shared exceptions"
                    " are still counted; run csnap-check",
                    bit,
                    state.unique[bit],
                    state.shared[bit],
                )
            state.snapshots[bit] = None
            state.unique[bit] = state.shared[bit] = 0
        state.sweep_mask = state.mask_in(SnapshotState.DELETING)
        state.sweep_cursor = 0


def _segments(where: dict[int, int]) -> list[WriteSegment]:
    out: list[WriteSegment] = []
    for chunk in sorted(where):
        target = where[chunk]
        if (
            out
            and out[-1].chunk + out[-1].count == chunk
            and out[-1].store_chunk + out[-1].count == target
        ):
            last = out[-1]
            out[-1] = WriteSegment(last.chunk, last.count + 1, last.store_chunk)
        else:
            out.append(WriteSegment(chunk, 1, target))
    return out


def _joined(segments: list[WriteSegment]) -> list[WriteSegment]:
    """Segments in ascending chunk order, neighbours that continue each other joined."""
    out: list[WriteSegment] = []
    for segment in sorted(segments, key=lambda s: s.chunk):
        last = out[-1] if out else None
        if (
            last is not None
            and last.chunk + last.count == segment.chunk
            and last.store_chunk + last.count == segment.store_chunk
        ):
            out[-1] = WriteSegment(last.chunk, last.count + segment.count, last.store_chunk)
        else:
            out.append(segment)
    return out


def _take(ranges: list[tuple[int, int]], size: int) -> tuple[Ranges, list[tuple[int, int]]]:
    """The first `size` chunks of `ranges`, and the ranges left after them."""
    piece: list[tuple[int, int]] = []
    for n, (start, count) in enumerate(ranges):
        if count >= size:
            piece.append((start, size))
            rest = ranges[n + 1 :]
            if count > size:
                rest = [(start + size, count - size), *rest]
            return piece, rest
        piece.append((start, count))
        size -= count
    return piece, []


def _check_tag(tag: int) -> None:
    if not 0 <= tag <= MAX_TAG:
        raise InvalidRequestError(f"snapshot tag {tag} is not in 0..{MAX_TAG}")


def _check_priority(priority: int) -> None:
    if not -128 <= priority <= 127:
        raise InvalidRequestError(f"priority {priority} is not in -128..127")
