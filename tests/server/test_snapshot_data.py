"""Snapshot writes that bring their bytes (write_snapshot_data) against a real
csnapd: written into the copy with one sync when the chunk needs one, handed
out like query_write's otherwise, refused on an origin connection, and too
large ones going the query_write way (docs/protocol.md, "Snapshot writes
with their data").
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from csnap_client import ServerError
from csnap_protocol import MAX_WRITE_DATA, ErrorCode
from csnapd.engine import FileDevice
from csnapd.engine.check import check_store
from csnapd.server import QUEUED_DATA_LIMIT
from tests.server.support import (
    CHUNK,
    label,
    make_store,
    pread,
    read_snapshot,
    running,
    write_origin,
)

pytestmark = pytest.mark.slow


def pwrite_at(path: Path, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def _laid(old: bytes, at: int, new: bytes) -> bytes:
    return old[:at] + new + old[at + len(new) :]


async def test_snapshot_data_writes_land_in_the_snapshot_alone(tmp_path: Path) -> None:
    config = make_store(tmp_path)
    with trio.fail_after(60):
        async with running(config) as server, server.admin() as admin, server.client() as origin:
            for chunk in range(8):
                await write_origin(origin, server.origin, chunk, 1)
            await admin.create_snapshot(1)
            async with server.client(1) as snap:
                # Journal records written: a commit, and a seal when one follows.
                before = (await admin.status()).store.sequence
                async with snap.snapshot_write([(7, 1)]):
                    pass
                granted = (await admin.status()).store.sequence
                assert granted - before == 2  # the copy's commit, then the seal
                # Chunk 2 is shared with the origin: csnapd writes the bytes.
                async with snap.snapshot_write_data(2 * CHUNK + 100, b"a" * 300) as given:
                    assert given is None
                # One record for the write and its copy: no seal after it.
                assert (await admin.status()).store.sequence - granted == 1
                first = _laid(label(2, 1), 100, b"a" * 300)
                assert await read_snapshot(snap, server, 2) == [first]
                # Now the snapshot owns chunk 2: the client writes itself.
                async with snap.snapshot_write_data(2 * CHUNK + 1000, b"b" * 50) as given:
                    assert given is not None
                    [(chunk, count, store_chunk)] = given
                    assert (chunk, count) == (2, 1)
                    pwrite_at(server.store, store_chunk * CHUNK + 1000, b"b" * 50)
                second = _laid(first, 1000, b"b" * 50)
                assert await read_snapshot(snap, server, 2) == [second]
                # Across two chunks, both shared.
                async with snap.snapshot_write_data(5 * CHUNK - 10, b"c" * 20) as given:
                    assert given is None
                assert await read_snapshot(snap, server, 4, 2) == [
                    _laid(label(4, 1), CHUNK - 10, b"c" * 10),
                    _laid(label(5, 1), 0, b"c" * 10),
                ]
                # The most one message carries, over chunks all shared: one record.
                big = bytes(range(251)) * (MAX_WRITE_DATA // 251 + 1)
                at = 64 * CHUNK + 7
                before = (await admin.status()).store.sequence
                async with snap.snapshot_write_data(at, big[:MAX_WRITE_DATA]) as given:
                    assert given is None
                assert (await admin.status()).store.sequence - before == 1
                count = MAX_WRITE_DATA // CHUNK + 1
                view = b"".join(await read_snapshot(snap, server, 64, count))
                assert view == _laid(pread(server.origin, 64, count), 7, big[:MAX_WRITE_DATA])
                # More than one message carries goes the query_write way,
                # though these chunks too are all shared.
                at = 512 * CHUNK
                async with snap.snapshot_write_data(at, big[: MAX_WRITE_DATA + 1]) as given:
                    assert given is not None
                    assert sum(count for _, count, _ in given) == MAX_WRITE_DATA // CHUNK + 1
            # The origin never changed; a new connection reads the same.
            assert pread(server.origin, 0, 8) == b"".join(label(c, 1) for c in range(8))
            async with server.client(1) as snap:
                assert (await read_snapshot(snap, server, 2)) == [second]
            with pytest.raises(ServerError) as refused:
                async with origin.snapshot_write_data(0, b"x"):
                    pass
            assert refused.value.error is ErrorCode.INVALID_REQUEST
            assert "snapshot connections" in refused.value.message
    device = FileDevice(Path(config.store), writable=False)
    try:
        assert check_store(device).exit_code == 0
    finally:
        device.close()


async def test_a_connection_queues_no_more_data_than_its_limit(tmp_path: Path) -> None:
    """While the engine task cannot commit, a connection pipelining data
    writes has at most QUEUED_DATA_LIMIT of them (and the one that crossed
    it) waiting in csnapd; csnapd reads the rest once the engine takes some,
    and every write lands."""
    config = make_store(tmp_path)
    data = (bytes(range(251)) * (MAX_WRITE_DATA // 251 + 1))[:MAX_WRITE_DATA]
    writes = 3 * QUEUED_DATA_LIMIT // MAX_WRITE_DATA
    written: list[int] = []
    with trio.fail_after(60):
        async with running(config) as server, server.admin() as admin:
            await admin.create_snapshot(1)
            async with server.client(1) as snap:

                async def write(n: int) -> None:
                    async with snap.snapshot_write_data(n * MAX_WRITE_DATA, data) as given:
                        assert given is None
                    written.append(n)

                queued = server.server.connections
                peak = 0
                # The first write's batch waits for the lock; the rest queue.
                # The lock is released before the nursery waits for the writes.
                async with trio.open_nursery() as nursery, server.server.engine_lock:
                    for n in range(writes):
                        nursery.start_soon(write, n)
                    with trio.move_on_after(1.0):
                        while True:
                            peak = max(peak, queued.queued_data)
                            await trio.sleep(0.005)
                    assert not written
                assert QUEUED_DATA_LIMIT <= peak < QUEUED_DATA_LIMIT + MAX_WRITE_DATA
                assert queued.queued_data == 0
                assert sorted(written) == list(range(writes))
                chunks = MAX_WRITE_DATA // CHUNK
                for n in (0, writes - 1):
                    view = await read_snapshot(snap, server, n * chunks, chunks)
                    assert b"".join(view) == data
