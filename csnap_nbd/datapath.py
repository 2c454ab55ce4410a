"""The data path of one export: NBD reads, writes, zeroes, flushes and block
status turned into csnapd requests and file I/O.

  origin read      straight from the origin file (no server round trip)
  origin write     origin_write grant for the chunks touched, then write
                   the origin inside it; the grant closes after the data
                   is written, because a snapshot create waits for it
  snapshot read    snapshot_read plan: store chunks or the origin (the
                   latter read-locked until the block ends); origin data
                   that arrived past the locks' lease deadline is read
                   again under a new plan (docs/protocol.md, "Liveness").
                   Chunks the client's owned map places (store chunks the
                   snapshot owns alone, or chunks it last saw shared with
                   the origin, read unlocked and confirmed after) need no
                   plan from csnapd (docs/rules.md, "stable owned
                   addresses", "verified origin reads")
  snapshot write   snapshot_write segments: the server has already copied
                   each chunk's old contents into the store chunk it gives,
                   so only the bytes asked for are written there. A small
                   write to chunks the owned map does not place carries its
                   bytes (write_snapshot_data): csnapd writes them into the
                   copies itself, or gives segments as above

Requests are split into pieces of at most max_chunks chunks (csnapd's
announced limit), one grant at a time: holding one grant while asking for
the next could wait forever on a create barrier that itself waits for the
first grant. A write piece csnapd still refuses as too large (its
metadata would not fit one transaction) is halved and asked again, down
to one chunk: whatever a request names, the gateway gets it through.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import NamedTuple

from csnap_client import DataClient, ReadPlan, ServerError
from csnap_common.limits import MAX_REQUEST_CHUNKS
from csnap_nbd.backing import CACHED_INLINE_BYTES, INLINE_BYTES, Backing, Transfer
from csnap_nbd.buffers import BUFFERS
from csnap_nbd.failures import TRANSLATED as _translated
from csnap_nbd.failures import ExportGoneError, IOFailedError
from csnap_nbd.geometry import (
    ZEROES,
    Piece,
    Placement,
    chunk_runs,
    extents,
    halves,
    join_extent,
    origin_placements,
    pieces,
    store_placements,
    zero_placements,
)
from csnap_nbd.holes import origin_allocation, snapshot_allocation
from csnap_nbd.wire.constants import Errno
from csnap_protocol import ErrorCode

__all__ = [
    "DataPath",
    "OriginPath",
    "SnapshotPath",
    "IOFailedError",
    "ExportGoneError",
    "UnconfirmedRead",
    "EXCEPTIONS_FLAG",
    "DIFF_FLAG",
    "STATUS_PIECES",
]

#: csnap:exceptions status bit: the chunk has a copy in the store.
EXCEPTIONS_FLAG = 1
#: csnap:diff:TAG status bit: the chunk may differ from snapshot TAG's.
DIFF_FLAG = 1
#: Most server queries one BLOCK_STATUS answers with; clients ask again for the rest.
STATUS_PIECES = 4
#: Plans one snapshot read piece may take whose origin data came past the
#: lease deadline before the read fails with EIO.
READ_ATTEMPTS = 4


def _read_here(backing: Backing, transfers: list[Transfer], into: bytearray) -> bytearray | None:
    """`into` filled on this thread: small reads always, larger ones from the
    page cache only; None if that would wait for the disk (O_DIRECT always does)."""
    if backing.goes_direct(transfers):
        return None
    if len(into) <= INLINE_BYTES:
        backing.read_now(transfers, into)
        return into
    return into if backing.read_cached(transfers, into) else None


def _check_covers(piece: Piece, transfers: list[Transfer], what: str) -> None:
    """csnapd must place every byte of a piece; a gap would lose data silently."""
    placed = sum(p.size for t in transfers for p in t.placements)
    if placed != piece.end - piece.start:
        raise IOFailedError(
            Errno.EIO,
            f"{what} for chunks {piece.first}+{piece.count} placed {placed} of"
            f" {piece.end - piece.start} bytes",
        )


class UnconfirmedRead(NamedTuple):
    """Data read at once under a local plan, and the plan: it counts only once confirmed."""

    data: bytearray
    plan: ReadPlan


class DataPath:
    """What every export does the same way; subclasses place the data."""

    #: Whether writes land in the store (snapshot) or the origin.
    writes_store = False

    def __init__(self, client: DataClient, backing: Backing):
        self.client = client
        self.backing = backing
        self.chunk_size = client.chunk_size

    @property
    def size(self) -> int:
        """The export's size now: a snapshot's is fixed, the origin's grows
        when csnapd's does (csnap resize; Exports.use tells the client)."""
        return self.client.origin_chunks * self.client.chunk_size

    def _pieces(self, offset: int, length: int) -> Iterator[Piece]:
        # Read at each call: a csnapd restarted in between may announce another limit.
        limit = min(max(1, self.client.max_chunks), MAX_REQUEST_CHUNKS)
        return pieces(offset, length, self.chunk_size, limit)

    async def _each_write_piece(
        self, offset: int, length: int, write: Callable[[Piece], Awaitable[None]]
    ) -> None:
        for piece in self._pieces(offset, length):
            await self._write_in_parts(piece, write)

    async def _write_in_parts(
        self, piece: Piece, write: Callable[[Piece], Awaitable[None]]
    ) -> None:
        """`write(piece)`; halves of it, recursively, if csnapd finds it too large.

        A refusal means csnapd did nothing for the request, so asking again
        for the halves neither copies nor allocates twice.
        """
        try:
            await write(piece)
        except ServerError as exc:
            if exc.error is not ErrorCode.REQUEST_TOO_LARGE or piece.count == 1:
                raise
            for half in halves(piece, self.chunk_size):
                await self._write_in_parts(half, write)

    def read_now(self, offset: int, length: int) -> bytearray | None:
        """The data at once, when it needs neither csnapd nor a thread; else None."""
        return None

    def write_now(self, offset: int, data: bytearray, *, fua: bool) -> bool:
        """Write at once, when it needs neither csnapd nor a thread; else False
        (nothing written)."""
        return False

    def gathers(self, offset: int, length: int, *, fua: bool) -> bool:
        """Whether this WRITE may wait to share a grant with others
        (write_gathered) instead of being served alone."""
        return False

    def chunks_of(self, offset: int, length: int) -> range:
        """The chunks bytes offset..offset+length-1 touch (length > 0)."""
        return range(offset // self.chunk_size, (offset + length - 1) // self.chunk_size + 1)

    def gather_limit(self) -> int:
        """The most chunks one write_gathered may touch."""
        return min(max(1, self.client.max_chunks), MAX_REQUEST_CHUNKS)

    async def write_gathered(self, writes: Sequence[tuple[int, bytearray]]) -> None:
        """Write each (offset, data) under one grant of every chunk they touch
        (at most gather_limit()). Raises IOFailedError as write() does; some
        of them may have been written then."""
        raise NotImplementedError

    async def sync_gathered(self) -> None:
        """Make what write_gathered wrote durable (FUA writes among them)."""
        with _translated:
            await self._sync_written()

    def read_unconfirmed(self, offset: int, length: int) -> UnconfirmedRead | None:
        """The data read at once, without csnapd or a thread, that counts only
        once confirm_reads says so; None if it cannot be read so."""
        return None

    async def confirm_reads(self, reads: Sequence[UnconfirmedRead]) -> list[bool]:
        """Whether each read_unconfirmed read holds the export's bytes (else read
        it again through read()); ends each read's grant either way."""
        raise NotImplementedError

    async def read(
        self, offset: int, length: int, deliver: Callable[[bytearray], None] | None = None
    ) -> bytearray:
        """The export's bytes offset..offset+length-1.

        `deliver`, if given, may be called with the data before the read has
        finished with csnapd (the reply can leave while read locks are being
        released); the same data is returned either way.
        """
        raise NotImplementedError

    async def _write_piece(self, piece: Piece, offset: int, data: memoryview, zeroes: bool) -> None:
        raise NotImplementedError

    async def write(self, offset: int, data: memoryview, *, fua: bool) -> None:
        async def write(piece: Piece) -> None:
            await self._write_piece(piece, offset, data, False)

        with _translated:
            await self._each_write_piece(offset, len(data), write)
            if fua:
                await self._sync_written()

    async def zero(self, offset: int, length: int, *, fua: bool) -> None:
        async def zero(piece: Piece) -> None:
            await self._write_piece(piece, offset, ZEROES, True)

        with _translated:
            await self._each_write_piece(offset, length, zero)
            if fua:
                await self._sync_written()

    async def _sync_written(self) -> None:
        await self.backing.sync(origin=not self.writes_store, store=self.writes_store)

    async def flush(self) -> None:
        """Both files: a flush covers every write replied to, on any export."""
        with _translated:
            await self.backing.sync()

    async def exceptions(self, offset: int, length: int, *, req_one: bool) -> list[tuple[int, int]]:
        """csnap:exceptions descriptors from the start of the request.

        Answers at most STATUS_PIECES server queries' worth; the spec lets a
        server describe less than asked, and clients ask again from where
        the answer stopped.
        """
        out: list[tuple[int, int]] = []
        with _translated:
            for number, piece in enumerate(self._pieces(offset, length)):
                if number == STATUS_PIECES or (req_one and out):
                    break
                copied = await self.client.copied_ranges([(piece.first, piece.count)])
                for length, flags in extents(piece, copied, self.chunk_size, EXCEPTIONS_FLAG):
                    join_extent(out, length, flags)
        return out[:1] if req_one else out

    async def differences(
        self, base: int, offset: int, length: int, *, req_one: bool
    ) -> list[tuple[int, int]]:
        """csnap:diff:`base` descriptors from the start of the request.

        Each query_changes answer covers the chunks up to where it stopped;
        at most STATUS_PIECES of them are asked, and the descriptors end
        where the last answer did (clients ask again from there).
        """
        out: list[tuple[int, int]] = []
        if length <= 0:
            return out
        cs = self.chunk_size
        end = offset + length
        chunk, last = offset // cs, (end - 1) // cs
        with _translated:
            for _ in range(STATUS_PIECES):
                ranges, resume = await self.client.changes(base, chunk, last - chunk + 1)
                stop = last + 1 if resume is None else min(resume, last + 1)
                piece = Piece(chunk, stop - chunk, max(offset, chunk * cs), min(end, stop * cs))
                for extent in extents(piece, ranges, cs, DIFF_FLAG):
                    if out and out[-1][1] == extent[1]:
                        out[-1] = (out[-1][0] + extent[0], extent[1])
                    else:
                        out.append(extent)
                if stop > last or (req_one and out):
                    break
                chunk = stop
        return out[:1] if req_one else out

    async def allocation(self, offset: int, length: int, *, req_one: bool) -> list[tuple[int, int]]:
        """base:allocation descriptors from the start of the request: holes
        and zeroes where the origin file's holes prove them (csnap_nbd.holes),
        data everywhere else."""
        fd = self.backing.origin
        with _translated:
            if not self.writes_store:
                return await origin_allocation(fd, offset, length, req_one=req_one)
            return await snapshot_allocation(
                fd,
                offset,
                length,
                self._pieces(offset, length),
                self.client.copied_ranges,
                self.chunk_size,
                req_one=req_one,
                most_queries=STATUS_PIECES,
            )


class OriginPath(DataPath):
    """The origin volume: reads need nobody, writes need a grant."""

    def read_now(self, offset: int, length: int) -> bytearray | None:
        if length > CACHED_INLINE_BYTES:
            return None
        into = BUFFERS.take(length)
        transfers = [Transfer(self.backing.origin, "origin", [Placement(offset, 0, length)])]
        with _translated:
            return _read_here(self.backing, transfers, into)

    async def read(
        self, offset: int, length: int, deliver: Callable[[bytearray], None] | None = None
    ) -> bytearray:
        into = BUFFERS.take(length)
        placement = [Placement(offset, 0, length)]
        with _translated:
            await self.backing.read([Transfer(self.backing.origin, "origin", placement)], into)
        return into

    def write_now(self, offset: int, data: bytearray, *, fua: bool) -> bool:
        # A small rewrite of chunks the client knows unique: no csnapd, no task;
        # not with O_DIRECT, which waits for the disk (a thread's job).
        if fua or len(data) > INLINE_BYTES or self.backing.origin in self.backing.direct:
            return False
        if not data:
            return False
        chunks = self.chunks_of(offset, len(data))
        if len(chunks) > self.client.max_chunks:
            return False
        if not self.client.may_write_now([(chunks.start, len(chunks))]):
            return False
        # No await from the answer to the end of the write (may_write_now).
        with _translated:
            self.backing.write_origin_now(offset, memoryview(data))
        return True

    async def _write_piece(self, piece: Piece, offset: int, data: memoryview, zeroes: bool) -> None:
        placements = [Placement(piece.start, piece.start - offset, piece.end - piece.start)]
        if zeroes:
            placements = zero_placements(placements)
        transfer = Transfer(self.backing.origin, "origin", placements)
        async with self.client.origin_write([(piece.first, piece.count)]):
            await self.backing.write([transfer], data)

    def gathers(self, offset: int, length: int, *, fua: bool) -> bool:
        # Written without awaiting inside the grant: small, and not with
        # O_DIRECT, which waits for the disk (a thread's job); and within
        # what one query may name, or csnapd would refuse it each time.
        if not 0 < length <= INLINE_BYTES or self.backing.origin in self.backing.direct:
            return False
        chunks = self.chunks_of(offset, length)
        if len(chunks) > self.gather_limit():
            return False
        # A FUA rewrite needs no grant, only its sync: it goes alone, and
        # its write overlaps the sync before it (Backing.sync shares them).
        return not fua or not self.client.knows_unique([(chunks.start, len(chunks))])

    async def write_gathered(self, writes: Sequence[tuple[int, bytearray]]) -> None:
        ranges = chunk_runs(c for offset, data in writes for c in self.chunks_of(offset, len(data)))
        origin = self.backing.origin
        with _translated:
            async with self.client.origin_write(ranges):
                # No await until every write is done: the grant covers them all.
                for offset, data in writes:
                    placement = [Placement(offset, 0, len(data))]
                    self.backing.write_now(
                        [Transfer(origin, "origin", placement)], memoryview(data)
                    )


class SnapshotPath(DataPath):
    """One snapshot: csnapd says where every chunk is."""

    writes_store = True

    def read_now(self, offset: int, length: int) -> bytearray | None:
        # Reads of chunks the client's owned map already places need neither
        # csnapd nor a task: read them from the store here.
        if length > CACHED_INLINE_BYTES:
            return None
        cs = self.chunk_size
        first, within = divmod(offset, cs)
        if length > 0 and within + length <= cs and self.backing.store not in self.backing.direct:
            # Within one chunk (most small reads): the shortest way.
            store = self.client.owned_store_chunk(first)
            if store >= 0:
                into = BUFFERS.take(length)
                with _translated:
                    self.backing.read_span_now(
                        self.backing.store, "store", store * cs + within, into
                    )
                if self.client.owned_still_trusted():
                    return into
                BUFFERS.give(into)
                return None  # past the lease deadline: the full path asks csnapd
        first = offset // self.chunk_size
        count = (offset + length - 1) // self.chunk_size - first + 1
        if count > self.client.max_chunks:
            return None
        piece = Piece(first, count, offset, offset + length)
        with self.client.owned_read(piece.first, piece.count) as plan:
            if plan is None:
                return None
            placements = store_placements(plan.store, piece, offset, self.chunk_size)
            transfers = [Transfer(self.backing.store, "store", placements)]
            _check_covers(piece, transfers, "owned map")
            into = BUFFERS.take(length)
            with _translated:
                if _read_here(self.backing, transfers, into) is None:
                    return None
            if not self.client.read_trusted(plan):
                return None  # past the lease deadline: the full path asks csnapd
            return into

    def read_unconfirmed(self, offset: int, length: int) -> UnconfirmedRead | None:
        # Chunks the owned map places in the store or last saw shared with
        # the origin: read here, unlocked; the origin part counts once a
        # query_map after the read says those chunks are still shared (rule:
        # verified origin reads), which confirm_reads asks for many at once.
        if length > CACHED_INLINE_BYTES:
            return None
        first = offset // self.chunk_size
        count = (offset + length - 1) // self.chunk_size - first + 1
        if count > self.client.max_chunks:
            return None
        plan = self.client.open_owned_plan(first, count)
        if plan is None:
            return None
        into: bytearray | None = None
        try:
            piece = Piece(first, count, offset, offset + length)
            cs = self.chunk_size
            transfers = [
                Transfer(
                    self.backing.store, "store", store_placements(plan.store, piece, offset, cs)
                ),
                Transfer(
                    self.backing.origin, "origin", origin_placements(plan.origin, piece, offset, cs)
                ),
            ]
            _check_covers(piece, transfers, "owned map")
            into = BUFFERS.take(length)
            with _translated:
                if _read_here(self.backing, transfers, into) is not None and (
                    self.client.read_trusted(plan)
                ):
                    read = UnconfirmedRead(into, plan)
                    into = plan = None
                    return read
            return None
        finally:
            if plan is not None:
                self.client.close_plan(plan)
            if into is not None:
                BUFFERS.give(into)

    async def confirm_reads(self, reads: Sequence[UnconfirmedRead]) -> list[bool]:
        try:
            with _translated:
                return await self.client.confirm_reads([r.plan for r in reads])
        finally:
            for r in reads:
                self.client.close_plan(r.plan)

    async def read(
        self, offset: int, length: int, deliver: Callable[[bytearray], None] | None = None
    ) -> bytearray:
        into = BUFFERS.take(length)
        cs = self.chunk_size
        todo = list(self._pieces(offset, length))
        with _translated:
            for number, piece in enumerate(todo, 1):
                for _ in range(READ_ATTEMPTS):
                    async with self.client.read_plan(piece.first, piece.count) as plan:
                        transfers = [
                            Transfer(
                                self.backing.store,
                                "store",
                                store_placements(plan.store, piece, offset, cs),
                            ),
                            Transfer(
                                self.backing.origin,
                                "origin",
                                origin_placements(plan.origin, piece, offset, cs),
                            ),
                        ]
                        _check_covers(piece, transfers, "snapshot_read")
                        await self.backing.read(transfers, into)
                        # Origin data that came after the locks' lease
                        # deadline may be an origin write's, and origin data
                        # read unlocked counts only once csnapd confirms
                        # the chunks still shared: else ask again.
                        if not await self.client.confirm_read(plan):
                            continue
                        if number == len(todo) and deliver is not None:
                            # Every byte is read: the reply need not wait for
                            # the read locks' release, one more round trip.
                            deliver(into)
                        break
                else:
                    raise IOFailedError(
                        Errno.EIO,
                        f"chunks {piece.first}+{piece.count}: origin data came past the"
                        f" read locks' lease deadline {READ_ATTEMPTS} times",
                    )
        return into

    async def _write_piece(self, piece: Piece, offset: int, data: memoryview, zeroes: bool) -> None:
        if self._sends_data(piece):
            start, end = piece.start - offset, piece.end - offset
            own = bytes(end - start) if zeroes else bytes(data[start:end])
            async with self.client.snapshot_write_data(piece.start, own) as given:
                if given is not None:
                    await self._write_into(given, piece, offset, data, zeroes)
            return
        async with self.client.snapshot_write([(piece.first, piece.count)]) as segments:
            await self._write_into(segments, piece, offset, data, zeroes)

    def _sends_data(self, piece: Piece) -> bool:
        """Whether the piece's bytes (or its zeroes) go to csnapd with the
        request: a write of at most MAX_WRITE_DATA whose first chunk the
        owned map does not place (it most likely needs a copy, which csnapd
        then writes the bytes into, with one sync and no seal:
        docs/protocol.md, "Snapshot writes with their data")."""
        fits = self.client.data_write_fits(piece.end - piece.start)
        return fits and not self.client.knows_owned(piece.first)

    async def _write_into(
        self,
        segments: Sequence[tuple[int, int, int]],
        piece: Piece,
        offset: int,
        data: memoryview,
        zeroes: bool,
    ) -> None:
        """Write the piece's bytes (or zeroes) where csnapd's segments place its chunks."""
        placements = store_placements(segments, piece, offset, self.chunk_size)
        transfer = Transfer(self.backing.store, "store", placements)
        _check_covers(piece, [transfer], "snapshot_write")
        if zeroes:
            transfer = Transfer(self.backing.store, "store", zero_placements(placements))
        await self.backing.write([transfer], data)
