"""Writing a delta: csnapd's changelist between two snapshots, their chunks
read from the store and origin files under csnapd's read plans.

Two data clients, one identified to each snapshot: the one on TO asks
query_changes against FROM, step by step, and reads TO's bytes; the one on
FROM reads FROM's bytes under the same extents, whose digest lets an apply
check its target. Memory holds one changes answer and one extent. The file
is written beside its final name and renamed into place once synced, so a
delta file that exists is whole.
"""

from __future__ import annotations

import bisect
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO

import trio

from csnap_client import Connector, DataClient, open_admin, open_client
from csnap_delta.devices import Device
from csnap_delta.layout import (
    FLAG_FULL,
    FLAG_ZSTD,
    DeltaEnd,
    DeltaHeader,
    ExtentHeader,
    SequenceDigest,
    compress,
    digest,
    extent_chunks,
)
from csnap_protocol import MAX_RANGES, StatusReply

__all__ = ["DeltaWriteError", "WriteReport", "write_delta", "READ_ATTEMPTS"]

#: Reads of one extent whose origin data came past the lease deadline before giving up.
READ_ATTEMPTS = 4


class DeltaWriteError(Exception):
    """The delta could not be written; no file was left under its name."""


@dataclass(frozen=True, slots=True)
class WriteReport:
    """What was written: the header, extents, chunks and bytes."""

    header: DeltaHeader
    extents: int
    chunks: int
    data_bytes: int
    file_bytes: int
    #: Whether the store and the origin were read with O_DIRECT.
    store_direct: bool = False
    origin_direct: bool = False


class _Files:
    """The store and origin files, opened read-only (O_DIRECT as `direct` says,
    see Device.open)."""

    def __init__(self, store: str, origin: str, direct: bool | None = None):
        try:
            self.store = Device.open(store, writable=False, direct=direct)
        except OSError as exc:
            raise DeltaWriteError(f"cannot open the store {store}: {exc.strerror}") from exc
        try:
            self.origin = Device.open(origin, writable=False, direct=direct)
        except OSError as exc:
            self.store.close()
            raise DeltaWriteError(f"cannot open the origin {origin}: {exc.strerror}") from exc

    def close(self) -> None:
        self.store.close()
        self.origin.close()


def _read_into(fd: Device, into: bytearray, at: int, size: int, position: int, what: str) -> None:
    try:
        data = fd.pread(size, position)
    except OSError as exc:
        raise DeltaWriteError(f"reading the {what} at {position}: {exc.strerror}") from exc
    if len(data) != size:
        raise DeltaWriteError(f"the {what} file ended early reading {size} bytes at {position}")
    into[at : at + size] = data


class _Batch:
    """Extents read together: ascending, disjoint (chunk, count) pairs."""

    def __init__(self, extents: list[tuple[int, int]]):
        self.extents = extents
        self.firsts = [first for first, _ in extents]
        self.before: list[int] = []
        total = 0
        for _, count in extents:
            self.before.append(total)
            total += count
        self.chunks = total

    def index(self, chunk: int) -> int:
        """Position of `chunk` among the batch's chunks (consecutive chunks, consecutive places)."""
        i = bisect.bisect_right(self.firsts, chunk) - 1
        first, count = self.extents[i]
        if not first <= chunk < first + count:
            raise DeltaWriteError(f"csnapd placed chunk {chunk}, which was not asked for")
        return self.before[i] + chunk - first


def _batches(ranges: Sequence[tuple[int, int]], most: int) -> Iterator[_Batch]:
    """The ranges as extents of at most `most` chunks, grouped `most` chunks at a time."""
    group: list[tuple[int, int]] = []
    room = most
    for first, count in ranges:
        at = first
        while at < first + count:
            n = min(most, first + count - at, room)
            group.append((at, n))
            at += n
            room -= n
            if room == 0:
                yield _Batch(group)
                group, room = [], most
    if group:
        yield _Batch(group)


async def _read_batch(client: DataClient, files: _Files, batch: _Batch) -> bytearray:
    """The snapshot's bytes of every chunk of `batch`, in order, as its read plan places them."""
    cs = client.chunk_size
    for _ in range(READ_ATTEMPTS):
        into = bytearray(batch.chunks * cs)
        async with client.snapshot_read(batch.extents) as plan:
            placed = 0
            for chunk, n, store_chunk in plan.store:
                at = batch.index(chunk) * cs
                _read_into(files.store, into, at, n * cs, store_chunk * cs, "store")
                placed += n
            for chunk, n in plan.origin:
                at = batch.index(chunk) * cs
                _read_into(files.origin, into, at, n * cs, chunk * cs, "origin")
                placed += n
            if placed != batch.chunks:
                raise DeltaWriteError(f"csnapd placed {placed} of {batch.chunks} chunks asked for")
            if client.read_trusted(plan):
                return into
    raise DeltaWriteError(
        f"chunks from {batch.extents[0][0]}: origin data came past the read locks' lease"
        f" {READ_ATTEMPTS} times"
    )


def _header(status: StatusReply, base: int | None, target: int, *, compressed: bool) -> DeltaHeader:
    """The header of the delta from `base` to `target`, as the store's status describes them.

    Raises:
        DeltaWriteError: a snapshot is not live, or the two differ in size.
    """
    tags = {s.tag: s for s in status.snapshots if s.state == "live"}
    for tag in (base, target):
        if tag is not None and tag not in tags:
            raise DeltaWriteError(f"there is no live snapshot {tag}")
    # Each snapshot keeps the origin size it was taken at (csnap resize).
    size = tags[target].origin_chunks
    if base is not None and tags[base].origin_chunks != size:
        raise DeltaWriteError(
            f"snapshots {base} and {target} were taken of origins of different sizes"
            f" ({tags[base].origin_chunks} and {size} chunks): a delta joins snapshots of"
            " one size; write a full delta (FROM none) instead"
        )
    return DeltaHeader(
        flags=(FLAG_ZSTD if compressed else 0) | (FLAG_FULL if base is None else 0),
        chunk_size=status.store.chunk_size,
        store_uuid=status.store.uuid,
        origin_chunks=size,
        from_tag=0 if base is None else base,
        to_tag=target,
        from_created_ns=0 if base is None else tags[base].created_ns,
        to_created_ns=tags[target].created_ns,
        written_ns=time.time_ns(),
    )


async def write_delta(
    connect: Connector,
    admin_connect: Connector,
    base: int | None,
    target: int,
    output: str | os.PathLike[str],
    *,
    compressed: bool = False,
    store: str | None = None,
    origin: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    direct: bool | None = None,
) -> WriteReport:
    """Write the delta from snapshot `base` to snapshot `target` into `output`.

    With `base` None the delta is full: every chunk of `target`, from an
    all-zero image.

    `store` and `origin` are the files to read chunks from; by default the
    paths csnapd reports (server_info), which must be reachable from here.
    `direct` as for Device.open: None is O_DIRECT for block devices only.

    Raises:
        DeltaWriteError: a snapshot is missing, a file short, a read not trusted.
        ServerError, ConnectionLostError, OSError: from csnapd or the files.
    """
    async with open_admin(admin_connect) as admin:
        status = await admin.status()
        info = await admin.server_info()
    header = _header(status, base, target, compressed=compressed)
    final = Path(output)
    partial = final.with_name(final.name + ".partial")
    files = _Files(store or str(info["store"]), origin or str(info["origin"]), direct)
    try:
        try:
            # Blocking file I/O in this task is fine: besides keepalives, which
            # a read of one extent does not delay for long, nothing else runs.
            out = open(partial, "wb")  # noqa: SIM115, ASYNC230 - closed below, also on error
        except OSError as exc:
            raise DeltaWriteError(f"cannot create {partial}: {exc.strerror}") from exc
        with out:
            report = await _write(connect, header, files, out, progress)
            try:
                out.flush()
                os.fsync(out.fileno())
            except OSError as exc:
                raise DeltaWriteError(f"writing {partial}: {exc.strerror}") from exc
        try:
            os.replace(partial, final)
        except OSError as exc:
            raise DeltaWriteError(f"renaming {partial} to {final}: {exc.strerror}") from exc
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    finally:
        files.close()
    return replace(
        report,
        store_direct=files.store.direct is not None,
        origin_direct=files.origin.direct is not None,
    )


class _Output:
    """The delta file as it is written: records, payloads, counts and the sequence digest."""

    def __init__(self, out: BinaryIO, header: DeltaHeader):
        self._out = out
        self.header = header
        self.sequence = SequenceDigest()
        self.extents = self.chunks = 0
        self.written = 0
        self._put(header.encode())

    def _put(self, data: bytes | bytearray) -> None:
        try:
            self._out.write(data)
        except OSError as exc:
            raise DeltaWriteError(f"writing the delta: {exc.strerror}") from exc
        self.written += len(data)

    def extent(self, first: int, data: bytearray, before: bytearray) -> None:
        payload: bytes | bytearray = data
        flags = 0
        if self.header.flags & FLAG_ZSTD:
            frame = compress(data)
            if frame is not None:
                payload, flags = frame, FLAG_ZSTD
        count = len(data) // self.header.chunk_size
        record = ExtentHeader(
            self.extents, first, count, len(payload), flags, digest(before), digest(data)
        ).encode()
        self._put(record)
        self._put(payload)
        self.sequence.add(record)
        self.extents += 1
        self.chunks += count

    def end(self) -> WriteReport:
        self._put(DeltaEnd(self.extents, self.chunks, self.sequence.digest()).encode())
        h = self.header
        return WriteReport(h, self.extents, self.chunks, self.chunks * h.chunk_size, self.written)


async def _next_ranges(
    client: DataClient, header: DeltaHeader, start: int, most: int
) -> tuple[Sequence[tuple[int, int]], int | None]:
    """The next ranges to carry and where to go on: the changelist's, or every chunk."""
    end = header.origin_chunks
    if header.full:
        # Every chunk, in bounded steps as the changelist would give them.
        step = min(end - start, most * 64)
        return [(start, step)], start + step if start + step < end else None
    ranges, resume = await client.changes(header.from_tag, start, end - start)
    if resume is not None and resume <= start:
        raise DeltaWriteError(f"csnapd's changelist did not advance from chunk {start}")
    return ranges, resume


async def _write(
    connect: Connector,
    header: DeltaHeader,
    files: _Files,
    out: BinaryIO,
    progress: Callable[[int, int], None] | None,
) -> WriteReport:
    output = _Output(out, header)
    end = header.origin_chunks
    cs = header.chunk_size
    # A full delta's base is nothing, read as zeroes: an origin client stands
    # in for the base's and is never asked for it.
    async with (
        open_client(connect, snapshot=header.to_tag) as new,
        open_client(connect, snapshot=None if header.full else header.from_tag) as old,
    ):
        if new.chunk_size != cs or new.origin_chunks != end:
            raise DeltaWriteError("csnapd's geometry changed while the delta was being written")
        # One batch is one snapshot_read: within csnapd's limit and its reply's.
        most = max(1, min(extent_chunks(cs), new.max_chunks, old.max_chunks, MAX_RANGES))
        start: int | None = 0
        while start is not None:
            ranges, start = await _next_ranges(new, header, start, most)
            for batch in _batches(ranges, most):
                new_bytes = await _read_batch(new, files, batch)
                if header.full:
                    old_bytes = bytearray(len(new_bytes))
                else:
                    old_bytes = await _read_batch(old, files, batch)
                for (at, n), offset in zip(batch.extents, batch.before, strict=True):
                    span = slice(offset * cs, (offset + n) * cs)
                    output.extent(at, new_bytes[span], old_bytes[span])
                    await trio.lowlevel.checkpoint()
            if progress is not None:
                progress(end if start is None else start, end)
    return output.end()
