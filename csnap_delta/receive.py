"""Receiving a delta into a csnap store: its origin becomes TO, then snapshot TO is taken.

The receiving store must hold snapshot FROM, and its origin must not have
changed since FROM was taken (a full delta, from nothing, needs instead an
origin of zeroes, as a new store on a new device has, or one partly TO's
from a receive that was cut short): csnapd's changelist between the origin and
FROM says so without reading data. The only changes allowed are extents
of this delta already holding TO's bytes, left by a receive that was cut
short, so receiving again finishes it. As for apply, the whole delta and
the origin's bytes under every extent are checked before anything is
written; then each extent still holding FROM's bytes is written through an
origin write grant (csnapd copies the old bytes out for the store's
snapshots first), the origin is synced, and snapshot TO is created.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from csnap_client import Connector, DataClient, open_admin, open_client
from csnap_delta.apply import DeltaRefusedError, read_extents
from csnap_delta.devices import Device
from csnap_delta.layout import DeltaHeader, digest
from csnap_protocol import StatusReply

__all__ = ["ReceiveReport", "receive_delta", "MAX_BATCH_CHUNKS"]

#: Most chunks written under one origin write grant (and held in memory).
MAX_BATCH_CHUNKS = 1024


@dataclass(frozen=True, slots=True)
class ReceiveReport:
    """What receiving did: extents and chunks, chunks written, and the snapshot made."""

    header: DeltaHeader
    extents: int
    chunks: int
    written_chunks: int
    already_chunks: int
    #: Whether the origin was read and written with O_DIRECT.
    direct: bool = False


def _pread(fd: Device, size: int, position: int) -> bytes:
    data = fd.pread(size, position)
    if len(data) != size:
        raise DeltaRefusedError(f"the origin ended early reading {size} bytes at {position}")
    return data


def _plan(
    path: Path, fd: Device
) -> tuple[DeltaHeader, list[tuple[int, int]], list[tuple[int, int]]]:
    """Check the delta and the origin under it; the extents to write, and those in place."""
    to_write: list[tuple[int, int]] = []
    in_place: list[tuple[int, int]] = []
    with open(path, "rb") as source:
        header = DeltaHeader.decode(source.read(DeltaHeader.SIZE))
        source.seek(0)
        for header, extent, data in read_extents(source):
            now = digest(_pread(fd, len(data), extent.first * header.chunk_size))
            if now == extent.base_digest:
                to_write.append((extent.first, extent.count))
            elif now == extent.data_digest:
                in_place.append((extent.first, extent.count))
            else:
                last = extent.first + extent.count - 1
                raise DeltaRefusedError(
                    f"chunks {extent.first}..{last} of the origin hold neither the bytes of"
                    f" {header.base_name} nor snapshot {header.to_tag}'s: this store's origin"
                    f" is not {header.base_name} of the same source; nothing was written"
                )
    return header, to_write, in_place


def _read_header(path: Path) -> DeltaHeader:
    with open(path, "rb") as source:
        return DeltaHeader.decode(source.read(DeltaHeader.SIZE))


def _extents(path: Path, wanted: list[tuple[int, int]]) -> Iterator[tuple[int, int, bytes]]:
    """(first, count, data) of the delta's extents named in `wanted` (ascending)."""
    chosen = set(wanted)
    with open(path, "rb") as source:
        for _, extent, data in read_extents(source):
            if (extent.first, extent.count) in chosen:
                yield extent.first, extent.count, data


async def _write_batch(
    client: DataClient, fd: Device, chunk_size: int, batch: list[tuple[int, int, bytes]]
) -> None:
    """Write extents into the origin under one grant: csnapd copies their old bytes out first."""
    async with client.origin_write([(first, count) for first, count, _ in batch]):
        for first, _, data in batch:
            done = fd.pwrite(data, first * chunk_size)
            if done != len(data):
                raise OSError(f"short write of {done} of {len(data)} bytes at chunk {first}")


async def _changed_since(client: DataClient, base: int) -> list[tuple[int, int]]:
    """Runs of origin chunks that may differ from snapshot `base`."""
    out: list[tuple[int, int]] = []
    end = client.origin_chunks
    start: int | None = 0
    while start is not None:
        ranges, start = await client.changes(base, start, end - start)
        out.extend(ranges)
    return out


def _covered(runs: list[tuple[int, int]], extents: list[tuple[int, int]]) -> bool:
    """Whether every chunk of `runs` lies inside `extents` (both ascending)."""
    chunks = {c for first, count in extents for c in range(first, first + count)}
    return all(c in chunks for first, count in runs for c in range(first, first + count))


def _check_store(header: DeltaHeader, status: StatusReply) -> None:
    """Refuse a store the delta does not start from.

    Raises:
        DeltaRefusedError: another geometry, no snapshot FROM, or one TO already.
    """
    store = status.store
    if (store.chunk_size, store.origin_chunks) != (header.chunk_size, header.origin_chunks):
        raise DeltaRefusedError(
            f"this store has {store.origin_chunks} chunks of {store.chunk_size} bytes; the"
            f" delta is for {header.origin_chunks} chunks of {header.chunk_size}"
        )
    tags = {s.tag for s in status.snapshots if s.state == "live"}
    if not header.full and header.from_tag not in tags:
        raise DeltaRefusedError(
            f"this store has no snapshot {header.from_tag}, where the delta starts"
        )
    if header.to_tag in tags:
        raise DeltaRefusedError(f"this store already has a snapshot {header.to_tag}")


async def _write_extents(
    client: DataClient,
    fd: Device,
    chunk_size: int,
    path: Path,
    to_write: list[tuple[int, int]],
) -> None:
    """Write the extents `to_write` of the delta at `path` into the origin."""
    # One grant (one copy-out commit in csnapd) per batch of extents.
    most = max(1, min(client.max_chunks, MAX_BATCH_CHUNKS))
    batch: list[tuple[int, int, bytes]] = []
    for extent in _extents(path, to_write):
        if batch and sum(n for _, n, _ in batch) + extent[1] > most:
            await _write_batch(client, fd, chunk_size, batch)
            batch = []
        batch.append(extent)
    if batch:
        await _write_batch(client, fd, chunk_size, batch)


async def receive_delta(
    connect: Connector,
    admin_connect: Connector,
    delta: str | os.PathLike[str],
    *,
    origin: str | None = None,
    priority: int = 0,
    direct: bool | None = None,
) -> ReceiveReport:
    """Receive the delta file `delta` into the store csnapd serves; creates snapshot TO.

    `origin` is the origin file to write; by default the path csnapd reports.
    `direct` as for Device.open: None is O_DIRECT for a block device only.

    Raises:
        DeltaFormatError: the delta is damaged; nothing was written.
        DeltaRefusedError: the store is not where the delta starts; nothing was written.
        ServerError, ConnectionLostError, OSError: from csnapd or the files.
    """
    path = Path(delta)
    header = _read_header(path)
    async with open_admin(admin_connect) as admin:
        status = await admin.status()
        info = await admin.server_info()
    _check_store(header, status)
    origin_path = origin or str(info["origin"])
    fd = Device.open(origin_path, writable=True, direct=direct)
    try:
        async with open_client(connect, snapshot=None) as client:
            # A full delta's base is an all-zero origin, which the digests
            # check under every extent (and a full delta covers every chunk).
            changed = [] if header.full else await _changed_since(client, header.from_tag)
            header, to_write, in_place = _plan(path, fd)
            if not _covered(changed, in_place):
                count = sum(n for _, n in changed)
                raise DeltaRefusedError(
                    f"the origin changed since snapshot {header.from_tag} was taken ({count}"
                    f" chunks may differ): receiving needs it as snapshot"
                    f" {header.from_tag} left it; nothing was written"
                )
            await _write_extents(client, fd, header.chunk_size, path, to_write)
            fd.fsync()
        async with open_admin(admin_connect) as admin:
            await admin.create_snapshot(header.to_tag, priority)
    finally:
        fd.close()
    written = sum(n for _, n in to_write)
    already = sum(n for _, n in in_place)
    chunks = written + already
    mode = fd.direct is not None
    return ReceiveReport(header, len(to_write) + len(in_place), chunks, written, already, mode)
