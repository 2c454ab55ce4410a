"""The gateway's export registry against an in-process csnapd: names, one
shared csnapd client per export in use, a snapshot's client lingering for a
reconnect and closed at the linger's end, at shutdown or when its snapshot
is deleted, one admin connection for the gateway's questions (opened again
after a csnapd restart), a refused snapshot, and the data paths'
partial-chunk writes as csnapd places them, and what a snapshot write costs
in journal records by its size.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from csnap_nbd.admin_link import AdminLink
from csnap_nbd.backing import Backing
from csnap_nbd.exports import (
    ADMIN_LINGER_SECONDS,
    LINGER_SECONDS,
    Exports,
    Geometry,
    UnknownExportError,
    parse_export_name,
    snapshot_export,
)
from csnap_protocol import MAX_WRITE_DATA
from tests.compare import assert_same_bytes
from tests.server.support import CHUNK, Running, label, make_store, pread, pwrite, running


def test_export_names() -> None:
    assert parse_export_name("") is None
    assert parse_export_name("origin") is None
    assert parse_export_name("snap-0") == 0
    assert parse_export_name("snap-4294967295") == (1 << 32) - 1
    assert snapshot_export(12) == "snap-12"
    for bad in (
        "snap-",
        "snap-01",
        "snap-+1",
        "snap-4294967296",
        "snap-1 ",
        "Origin",
        "snap-\N{ARABIC-INDIC DIGIT ONE}",
    ):
        with pytest.raises(UnknownExportError):
            parse_export_name(bad)


@asynccontextmanager
async def exports_of(
    tmp_path: Path, linger: float = LINGER_SECONDS
) -> AsyncIterator[tuple[Running, Exports]]:
    config = make_store(tmp_path)
    async with running(config) as server, exports_on(server, linger) as exports:
        yield server, exports


@asynccontextmanager
async def exports_on(server: Running, linger: float) -> AsyncIterator[Exports]:
    config = server.config
    backing = Backing(config.origin, config.store, read_only=False)
    try:
        async with trio.open_nursery() as nursery:
            exports = Exports(
                server.connector(),
                server.connector(),
                Geometry(CHUNK, 4096),
                backing,
                linger=linger,
            )
            await nursery.start(exports.run)
            yield exports
            nursery.cancel_scope.cancel()
    finally:
        backing.close()


async def clients(server: Running) -> tuple[int, int]:
    async with server.admin() as admin:
        info = await admin.server_info()
    return info["origin_clients"], info["snapshot_clients"]


async def test_one_client_per_export_in_use(tmp_path: Path) -> None:
    async with exports_of(tmp_path, linger=0) as (server, exports):
        async with server.admin() as admin:
            await admin.create_snapshot(3)
        assert [e.name for e in await exports.list_exports()] == ["origin", "snap-3"]
        assert (await exports.lookup("")).name == "origin"
        with pytest.raises(UnknownExportError):
            await exports.lookup("snap-4")

        async with exports.use(3) as first, exports.use(3) as second, exports.use(None) as origin:
            assert first is second and origin is not first
            assert await clients(server) == (1, 1)
        # Without a linger a snapshot's client closes with its last user; the origin's stays
        # open (it remembers which chunks may be rewritten without asking).
        with trio.fail_after(10):
            while True:
                if await clients(server) == (1, 0):
                    break
                await trio.sleep(0.01)
        async with exports.use(None) as again:
            assert again is origin

        with pytest.raises(UnknownExportError, match="no snapshot with tag 9"):
            async with exports.use(9):
                pass


async def until_clients(server: Running, expected: tuple[int, int], seconds: float) -> None:
    with trio.fail_after(seconds):
        while True:
            if await clients(server) == expected:
                return
            await trio.sleep(0.01)


async def test_a_snapshots_client_lingers_for_a_reconnect_then_closes(tmp_path: Path) -> None:
    """A reconnect within the linger reuses the snapshot's client, which sees
    what another gateway wrote meanwhile; the client closes when the linger
    after its last user runs out."""
    linger = 2.0
    async with exports_of(tmp_path, linger) as (server, exports):
        for chunk in range(4):
            pwrite(server.origin, chunk, label(chunk, 1))
        async with server.admin() as admin:
            await admin.create_snapshot(3)
        async with exports.use(3) as first:
            await first.write(0, memoryview(label(0, 2)), fua=False)  # owned from now on
            assert await first.read(0, 2 * CHUNK) == label(0, 2) + label(1, 1)
        assert await clients(server) == (0, 1)  # lingering

        # Another gateway writes the owned chunk (in place) and a shared one.
        async with exports_on(server, 0) as other, other.use(3) as theirs:
            await theirs.write(0, memoryview(label(0, 3)), fua=False)
            await theirs.write(CHUNK, memoryview(label(1, 3)), fua=False)
        await until_clients(server, (0, 1), 5)

        async with exports.use(3) as again:
            assert again is first
            assert await again.read(0, 2 * CHUNK) == label(0, 3) + label(1, 3)
        again_left = trio.current_time()
        await until_clients(server, (0, 0), linger + 5)
        assert trio.current_time() - again_left >= linger * 0.9

        # A new user after the linger opens a client of its own.
        async with exports.use(3) as fresh:
            assert fresh is not first
        assert await clients(server) == (0, 1)


async def test_a_deleted_snapshots_lingering_client_closes_at_once(tmp_path: Path) -> None:
    config = make_store(tmp_path)
    async with running(config) as server:
        async with exports_on(server, 600) as exports:
            async with server.admin() as admin:
                await admin.create_snapshot(3)
                await admin.create_snapshot(4)
            async with exports.use(3) as path:
                await path.write(0, memoryview(label(0, 2)), fua=False)
                assert await path.read(0, CHUNK) == label(0, 2)
                assert path.client.owned_store_chunk(0) >= 0
            async with exports.use(4):
                pass
            assert await clients(server) == (0, 2)

            async with server.admin() as admin:
                await admin.delete_snapshot(3)
            # Told snapshot_deleted, the lingering client forgot its owned
            # addresses and left, long before its linger would end.
            await until_clients(server, (0, 1), 5)
            assert path.client.owned_store_chunk(0) == -1
            with pytest.raises(UnknownExportError, match="not live"):
                await exports.lookup("snap-3")
            with pytest.raises(UnknownExportError, match="snapshot 3"):
                async with exports.use(3):
                    pass
        # Stopping the gateway closed snapshot 4's lingering client.
        await until_clients(server, (0, 0), 5)


async def test_questions_to_csnapd_share_one_admin_connection(tmp_path: Path) -> None:
    """Lookups, lists and origin sizes asked in a row go over one admin
    connection, closed when its linger runs out; a resize is seen at once."""
    async with exports_of(tmp_path) as (server, exports), server.admin() as admin:
        await admin.create_snapshot(3)
        alone = (await admin.server_info())["clients"]  # this admin connection
        for _ in range(3):
            assert (await exports.lookup("snap-3")).tag == 3
            assert len(await exports.list_exports()) == 2
            assert await exports.export_size(None) == 16 << 20
        assert (await admin.server_info())["clients"] == alone + 1
        os.truncate(server.origin, 32 << 20)
        await admin.resize(origin_bytes=32 << 20, store_bytes=None)
        assert await exports.export_size(None) == 32 << 20
        with trio.fail_after(ADMIN_LINGER_SECONDS + 5):
            while True:
                if (await admin.server_info())["clients"] == alone:
                    break
                await trio.sleep(0.01)


async def test_the_admin_connection_is_opened_again_after_csnapd_restarts(tmp_path: Path) -> None:
    config = make_store(tmp_path)
    async with trio.open_nursery() as nursery:
        async with running(config) as first:
            link = AdminLink(first.connector(), 600)
            await nursery.start(link.run)
            assert len(await link.ask(lambda admin: admin.list_snapshots())) == 0
            port = first.port
        async with running(config, port=port) as second:
            async with second.admin() as admin:
                await admin.create_snapshot(5)
            # The question finds the shared connection broken and asks again.
            snapshots = await link.ask(lambda admin: admin.list_snapshots())
            assert [s["tag"] for s in snapshots] == [5]
        nursery.cancel_scope.cancel()


async def test_partial_chunk_writes_keep_the_rest_of_the_chunk(tmp_path: Path) -> None:
    """csnapd copies a chunk's old contents before giving its store chunk, so
    a snapshot write of a few bytes keeps the rest: whether the old contents
    are the origin's or another snapshot's store copy."""
    async with exports_of(tmp_path) as (server, exports):
        for chunk in range(8):
            pwrite(server.origin, chunk, label(chunk, 1))
        async with server.admin() as admin:
            await admin.create_snapshot(1)
            await admin.create_snapshot(2)
        async with exports.use(None) as origin, exports.use(2) as snap2, exports.use(1) as snap1:
            # Chunk 5 is copied out for both snapshots by an origin write.
            await origin.write(5 * CHUNK, memoryview(label(5, 2)), fua=False)
            await snap2.write(100, memoryview(b"A" * 10), fua=True)  # from the origin
            await snap2.write(5 * CHUNK + 4000, memoryview(b"B" * 200), fua=False)  # from the store
            await snap2.zero(7 * CHUNK - 3, 6, fua=False)  # across two chunks

            expected = bytearray(b"".join(label(c, 1) for c in range(8)))
            expected[100:110] = b"A" * 10
            expected[5 * CHUNK + 4000 : 5 * CHUNK + 4200] = b"B" * 200
            expected[7 * CHUNK - 3 : 7 * CHUNK + 3] = bytes(6)
            assert_same_bytes(await snap2.read(0, 8 * CHUNK), expected, "snapshot 2")
            assert_same_bytes(
                await snap1.read(0, 8 * CHUNK),
                b"".join(label(c, 1) for c in range(8)),
                "snapshot 1",
            )
            assert await origin.read(5 * CHUNK, CHUNK) == label(5, 2)
            assert pread(server.origin, 0) == label(0, 1)  # snapshot writes left the origin
            # Chunks 0, 5, 6 and 7 have store copies for snapshot 2.
            assert await snap2.exceptions(0, 8 * CHUNK, req_one=False) == [
                (CHUNK, 1),
                (4 * CHUNK, 0),
                (3 * CHUNK, 1),
            ]
            assert await snap1.exceptions(0, 8 * CHUNK, req_one=True) == [(5 * CHUNK, 0)]


async def test_a_snapshot_write_or_zeroing_up_to_max_write_data_costs_one_record(
    tmp_path: Path,
) -> None:
    """A write or zeroing of a snapshot's shared chunks of at most
    MAX_WRITE_DATA goes to csnapd with its bytes: one journal record (the
    commit, one sync). A larger one takes the grant: the commit and its seal.
    Either way the snapshot reads what was written and nothing else moved."""
    async with exports_of(tmp_path) as (server, exports):
        for chunk in range(64):
            pwrite(server.origin, chunk, label(chunk, 1))
        async with server.admin() as admin:
            await admin.create_snapshot(1)

            async def records() -> int:
                sequence: int = (await admin.status()).store.sequence
                return sequence

            expected = bytearray(b"".join(label(c, 1) for c in range(64)))
            async with exports.use(1) as snap:
                pieces = [
                    # (offset, length, zeroes, records)
                    (2 * CHUNK + 100, 4096, True, 1),
                    (4 * CHUNK + 7, MAX_WRITE_DATA, True, 1),
                    (24 * CHUNK + 9, MAX_WRITE_DATA, False, 1),
                    (44 * CHUNK + 3, MAX_WRITE_DATA + 1, True, 2),
                ]
                for offset, length, zeroes, written in pieces:
                    before = await records()
                    if zeroes:
                        await snap.zero(offset, length, fua=False)
                        expected[offset : offset + length] = bytes(length)
                    else:
                        data = os.urandom(length)
                        await snap.write(offset, memoryview(data), fua=False)
                        expected[offset : offset + length] = data
                    assert await records() - before == written, (offset, length, zeroes)
                assert_same_bytes(await snap.read(0, 64 * CHUNK), expected, "snapshot 1")
        assert pread(server.origin, 0, 64) == b"".join(label(c, 1) for c in range(64))
