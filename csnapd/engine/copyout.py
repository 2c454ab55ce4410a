"""The copy-out path: origin writes and snapshot writes, and the data they move.

Owns the movement of chunk data into the store's data area. Copy-out data goes
only into chunks allocated by the request itself, so a crash before the commit
leaves no committed chunk overwritten; consecutive chunks move in one read and
one write, in pieces of at most COPY_IO_BYTES. Each write's CRC goes to the
transaction, whose record carries it (rule: data before pointers), and the
chunks a snapshot write returns are handed out for the client to write.

A small snapshot write may bring its bytes along (snapshot_write_data):
when every chunk it touches needs a copy, the bytes are laid over the old
contents in the copy before it is written, so the copy's CRC covers them,
and nothing is handed out: the write is durable with the commit's one sync.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from csnap_format import LOST_CHUNK, Geometry
from csnap_format.runs import append_mapped_run
from csnapd.engine.allocator import Allocator
from csnapd.engine.btree import ExceptionTree
from csnapd.engine.device import BlockDevice
from csnapd.engine.errors import InvalidRequestError, StoreIOError, lost_chunk_error
from csnapd.engine.results import OriginWriteResult, WriteSegment
from csnapd.engine.snapshots import SnapshotTable
from csnapd.engine.state import StoreState
from csnapd.engine.stats import EngineStats
from csnapd.engine.transaction import Transaction
from csnapd.engine.validation import Ranges, check_ranges

__all__ = ["COPY_IO_BYTES", "CopyOut"]

#: Copy-out reads and writes are done in pieces of at most this many bytes.
COPY_IO_BYTES = 8 << 20
#: Reads of up to this many bytes go into one buffer kept for the next: a
#: new buffer of a megabyte is fresh memory the kernel zeroes page by page,
#: which cost csnapd a quarter of its CPU during gathered first writes
#: (docs/performance-log.md, "Copy-outs read into a kept buffer").
KEPT_READ_BYTES = 2 << 20


class CopyOut:
    """Gives snapshots their own copies of chunks before they change."""

    def __init__(
        self,
        *,
        devices: tuple[BlockDevice, BlockDevice],
        geometry: Geometry,
        state: StoreState,
        tree: ExceptionTree,
        data: Allocator,
        snapshots: SnapshotTable,
        transaction: Transaction,
        stats: EngineStats,
    ):
        self._store, self._origin = devices
        self._geometry = geometry
        self._state = state
        self._tree = tree
        self._data = data
        self._snapshots = snapshots
        self._txn = transaction
        self._stats = stats
        #: The buffer copy-out reads reuse (_read_buffer).
        self._kept = bytearray()

    # -- origin writes -------------------------------------------------------------

    def origin_write(self, ranges: Ranges) -> OriginWriteResult:
        """Prepare origin chunks to be overwritten.

        Every chunk that some live snapshot still shares with the origin is
        copied out into new store chunks, with an exception shared by every
        live snapshot that lacks its own. After the commit that carries this
        request, the origin chunks may be written.
        """
        check_ranges(ranges, self._geometry.origin_chunks)
        # Most origin writes find every chunk copied already: asked first
        # by a lookup, they change nothing and cost no copy of the state.
        if not self._txn.lookup(lambda: self._todo(ranges, first=True)):
            return OriginWriteResult(0)
        results = self._txn.split_request(ranges, self._origin_write)
        return OriginWriteResult(sum(result.copied for result in results))

    def _todo(self, ranges: Ranges, *, first: bool = False) -> list[tuple[int, int]]:
        """(chunk, bits of the live snapshots that lack their copy of it) for
        each chunk to copy out; with `first`, up to the first such chunk."""
        masks = self._state.live_masks
        todo: list[tuple[int, int]] = []
        if not masks.live:
            return todo
        for chunk, leaf, i, at in self._tree.entries_of(ranges):
            # Snapshots taken before the origin grew past `chunk` have no such chunk.
            live = masks.at(chunk)
            missing = live & ~leaf.using_at(i, at) if at >= 0 else live
            if missing:
                todo.append((chunk, missing))
                if first:
                    return todo
        return todo

    def _origin_write(self, ranges: Ranges) -> OriginWriteResult:
        todo = self._todo(ranges)
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
            leaf = self._tree.leaf_for_update(chunk, missing)
            i, found = leaf.find(chunk)
            leaf.add(i, found, chunk, missing, target)
            state.count_exception(missing, 1)
            state.exceptions += 1
        return OriginWriteResult(len(todo))

    # -- snapshot writes -----------------------------------------------------------

    def snapshot_write(self, tag: int, ranges: Ranges) -> list[WriteSegment]:
        """Give snapshot `tag` its own copy of each chunk; return where they are.

        A chunk the snapshot already owns alone is returned as it is; a chunk
        it shares (with the origin or with other snapshots) is copied into a
        new store chunk first.
        """
        check_ranges(ranges, self._snapshots.view_chunks(tag))
        pieces = self._txn.split_request(ranges, lambda piece: self._snapshot_write(tag, piece))
        segments = (
            pieces[0] if len(pieces) == 1 else _joined([s for piece in pieces for s in piece])
        )
        # The client writes into these chunks once the reply is out.
        self._txn.hand_out((s.store_chunk, s.count) for s in segments)
        return segments

    def snapshot_write_data(
        self, tag: int, offset: int, data: bytes
    ) -> tuple[list[WriteSegment], bool]:
        """Write `data` at byte `offset` of snapshot `tag`'s view, if every
        chunk it touches needs a copy of its own: the bytes go into the new
        copies, over their old contents. Returns the segments and True.

        If the snapshot already owns one of the chunks alone, this is
        snapshot_write() of the chunks instead (nothing written, the segments
        handed out for the client to write into) and returns False with them.
        """
        if not data:
            raise InvalidRequestError("a snapshot data write carries no bytes")
        if offset < 0:
            raise InvalidRequestError(f"a snapshot data write at negative offset {offset}")
        size = self._geometry.chunk_size
        first = offset // size
        ranges = [(first, -(-(offset + len(data)) // size) - first)]
        check_ranges(ranges, self._snapshots.view_chunks(tag))
        if self._txn.lookup(lambda: bool(self._classify(tag, ranges)[0])):
            return self.snapshot_write(tag, ranges), False
        overlay = _Overlay(offset, data, size)
        pieces = self._txn.split_request(
            ranges, lambda piece: self._snapshot_write(tag, piece, overlay)
        )
        return _joined([s for piece in pieces for s in piece]), True

    def _classify(
        self, tag: int, ranges: Ranges
    ) -> tuple[dict[int, int], list[int], list[tuple[int, int]]]:
        """The chunks of `ranges` in snapshot `tag`'s view: those it owns alone
        (chunk -> store chunk), those it shares with the origin, and those it
        shares with other snapshots in the store ((chunk, store chunk))."""
        bit = 1 << self._snapshots.io_bit(tag)
        others = self._state.live_mask & ~bit
        where: dict[int, int] = {}
        from_origin: list[int] = []
        from_store: list[tuple[int, int]] = []
        for chunk, leaf, i, at in self._tree.entries_of(ranges):
            j = leaf.exception_at(i, at, bit) if at >= 0 else -1
            if j < 0:
                from_origin.append(chunk)
            elif leaf.targets[j] == LOST_CHUNK:
                raise lost_chunk_error(tag, chunk)
            elif leaf.shares[j] & others:
                from_store.append((chunk, leaf.targets[j]))
            else:
                where[chunk] = leaf.targets[j]
        return where, from_origin, from_store

    def _snapshot_write(
        self, tag: int, ranges: Ranges, overlay: _Overlay | None = None
    ) -> list[WriteSegment]:
        bit = 1 << self._snapshots.io_bit(tag)
        where, from_origin, from_store = self._classify(tag, ranges)
        if overlay is not None and where:
            # snapshot_write_data looked first, in the same request.
            raise RuntimeError("a snapshot data write found a chunk owned already")
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
                overlay,
                from_origin,
            )
        if from_store:
            pairs = [(src, dst) for (_, src), dst in zip(from_store, store_targets, strict=True)]
            chunks = [chunk for chunk, _ in from_store]
            self._move(pairs, self._store, "store", overlay, chunks)
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
        leaf = self._tree.leaf_for_update(chunk, bit)
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

    # -- data movement -----------------------------------------------------------

    def _allocate_chunks(self, count: int) -> list[int]:
        chunks: list[int] = []
        for first, length in self._data.allocate(count):
            chunks.extend(range(first, first + length))
        return chunks

    def _move(
        self,
        pairs: Sequence[tuple[int, int]],
        source: BlockDevice,
        name: str,
        overlay: _Overlay | None = None,
        chunks: Sequence[int] = (),
    ) -> None:
        """Copy chunk `src` of `source` to store chunk `dst` for each pair,
        with the bytes of `overlay` laid over the copies before they are
        written (the k-th pair copying view chunk chunks[k]).

        Consecutive sources are read together and consecutive targets written
        together, in pieces of at most COPY_IO_BYTES.
        """
        size = self._geometry.chunk_size
        most = max(1, COPY_IO_BYTES // size)
        i = 0
        while i < len(pairs):
            j = i + 1
            while j < len(pairs) and j - i < most and pairs[j][0] == pairs[j - 1][0] + 1:
                j += 1
            src = pairs[i][0]
            data = self._read_buffer((j - i) * size)
            if overlay is None:
                self._read_old(source, name, src, data)
            else:
                # Only chunks the bytes leave part of need their old
                # contents: at most the first and the last of the run.
                for k in overlay.partly_covered(chunks[i:j]):
                    self._read_old(source, name, src + k, data[k * size : (k + 1) * size])
                overlay.lay(chunks[i:j], data)
            self._write_copies(pairs[i:j], data)
            i = j
        self._stats.copied_chunks += len(pairs)

    def _read_old(self, source: BlockDevice, name: str, first: int, into: memoryview) -> None:
        """Read chunks from `first` of `source` into `into` (whole chunks)."""
        size = self._geometry.chunk_size
        try:
            source.read_into(first * size, into)
        except OSError as exc:
            last = first + len(into) // size - 1
            raise StoreIOError(
                f"reading {name} chunks {first}..{last}: {exc.strerror or exc}"
            ) from exc
        self._stats.copy_reads += 1

    def _read_buffer(self, length: int) -> memoryview:
        """Room for a read of `length` bytes, used before the next read: the
        kept buffer when it fits (its copies are written and their CRCs
        taken at once, and nothing keeps a reference to it)."""
        if length > KEPT_READ_BYTES:
            return memoryview(bytearray(length))
        if len(self._kept) < length:
            self._kept = bytearray(length)
        return memoryview(self._kept)[:length]

    def _write_copies(self, pairs: Sequence[tuple[int, int]], data: memoryview) -> None:
        """Write `data`, read for `pairs`, to their targets: consecutive ones together."""
        size = self._geometry.chunk_size
        k = 0
        while k < len(pairs):
            m = k + 1
            while m < len(pairs) and pairs[m][1] == pairs[m - 1][1] + 1:
                m += 1
            dst = pairs[k][1]
            piece = data[k * size : m * size]
            # Noted before the write: a failed write may have changed the chunk.
            self._txn.note_copy(dst, m - k, piece)
            try:
                self._store.write(dst * size, piece)
            except OSError as exc:
                raise StoreIOError(
                    f"writing copies to store chunks {dst}..{dst + m - k - 1}:"
                    f" {exc.strerror or exc}"
                ) from exc
            self._stats.copy_writes += 1
            k = m


def _segments(where: dict[int, int]) -> list[WriteSegment]:
    """Where each chunk went (chunk -> store chunk), as segments in chunk order."""
    runs: list[tuple[int, int, int]] = []
    for chunk in sorted(where):
        append_mapped_run(runs, chunk, 1, where[chunk])
    return [WriteSegment(*run) for run in runs]


def _joined(segments: list[WriteSegment]) -> list[WriteSegment]:
    """Segments in ascending chunk order, neighbours that continue each other joined."""
    runs: list[tuple[int, int, int]] = []
    for segment in sorted(segments, key=lambda s: s.chunk):
        append_mapped_run(runs, segment.chunk, segment.count, segment.store_chunk)
    return [WriteSegment(*run) for run in runs]


@dataclass(frozen=True, slots=True)
class _Overlay:
    """The bytes of a snapshot data write: `data` at byte `offset` of the view."""

    offset: int
    data: bytes
    chunk_size: int

    def partly_covered(self, chunks: Sequence[int]) -> list[int]:
        """The positions in `chunks` of the view chunks whose old contents
        the bytes do not overwrite whole."""
        size = self.chunk_size
        start, end = self.offset, self.offset + len(self.data)
        return [
            k for k, chunk in enumerate(chunks) if start > chunk * size or end < (chunk + 1) * size
        ]

    def lay(self, chunks: Sequence[int], data: memoryview) -> None:
        """Lay the bytes over `data`, the old contents of view chunks `chunks`, in turn."""
        size = self.chunk_size
        start, end = self.offset, self.offset + len(self.data)
        for k, chunk in enumerate(chunks):
            base = chunk * size
            low, high = max(start, base), min(end, base + size)
            if low < high:
                at = k * size + low - base
                data[at : at + high - low] = self.data[low - start : high - start]
