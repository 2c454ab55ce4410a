"""A real csnapd killed with SIGKILL under load and restarted: clients
reconnect and re-declare their read locks, and no acknowledged write is lost.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import trio
import trio.lowlevel

from csnap_client import open_admin, open_client
from csnap_format.mkcsnap import format_store
from csnapd.engine import FileDevice
from csnapd.engine.check import check_store
from tests.credentials import connector
from tests.e2e.processes import start_csnapd, start_csnapd_on_kept_port
from tests.server.support import CHUNK, label, pread, pwrite

pytestmark = pytest.mark.e2e

CHUNKS = 128
CYCLES = int(os.environ.get("CSNAP_KILL_CYCLES", "20"))


def make(tmp_path: Path) -> tuple[Path, Path]:
    store, origin = tmp_path / "store", tmp_path / "origin"
    format_store(str(store), str(origin), store_size=64 << 20, origin_size=16 << 20)
    return store, origin


async def read_chunk(client: object, store: Path, origin: Path, chunk: int) -> bytes:
    async with client.snapshot_read([(chunk, 1)]) as plan:  # type: ignore[attr-defined]
        if plan.store:
            return pread(store, plan.store[0][2])
        return pread(origin, chunk)


async def test_kill_9_under_load_loses_no_acknowledged_write(tmp_path: Path) -> None:
    store, origin = make(tmp_path)
    log = tmp_path / "csnapd.log"
    for chunk in range(CHUNKS):
        pwrite(origin, chunk, label(chunk, 1))
    daemon, host, port = await start_csnapd_on_kept_port(store, origin, log, "--grace", "5")
    connect = connector(host, port, store)
    async with open_admin(connect) as admin:
        await admin.create_snapshot(1)
    acked: dict[int, int] = {}
    mismatches: list[str] = []
    stop = trio.Event()

    async def writer(number: int) -> None:
        rng = random.Random(number)
        version = number * 1_000_000
        async with open_client(connect) as client:
            while not stop.is_set():
                chunk = rng.randrange(CHUNKS)
                version += 1
                async with client.origin_write([(chunk, 1)]):
                    pwrite(origin, chunk, label(chunk, version))
                acked[chunk] = version

    async def reader(number: int) -> None:
        rng = random.Random(-number)
        async with open_client(connect, snapshot=1) as client:
            while not stop.is_set():
                chunk = rng.randrange(CHUNKS)
                data = await read_chunk(client, store, origin, chunk)
                if data != label(chunk, 1):
                    mismatches.append(f"snapshot chunk {chunk} changed")
                await trio.lowlevel.checkpoint()

    with trio.fail_after(240):
        async with trio.open_nursery() as nursery:
            for n in range(3):
                nursery.start_soon(writer, n + 1)
                nursery.start_soon(reader, n + 1)
            for _ in range(CYCLES):
                await trio.sleep(random.uniform(0.3, 0.8))
                await daemon.kill()
                daemon, _, _ = await start_csnapd(
                    store, origin, log, "--listen", f"{host}:{port}", "--grace", "5"
                )
            await trio.sleep(0.5)
            stop.set()
    assert not mismatches, mismatches[:5]
    # Every acknowledged write: its copy-out is there, the snapshot reads the
    # pre-write data, and the origin holds the last acknowledged version.
    async with open_client(connect, snapshot=1) as client:
        for chunk in range(CHUNKS):
            assert await read_chunk(client, store, origin, chunk) == label(chunk, 1)
            if chunk in acked:
                assert pread(origin, chunk) == label(chunk, acked[chunk])
    assert await daemon.stop() == 0
    device = FileDevice(store, writable=False)
    try:
        report = check_store(device)
    finally:
        device.close()
    assert report.exit_code == 0, report.problems[:3]
    assert len(acked) > CHUNKS // 2


async def test_a_read_lock_held_across_a_crash_still_holds(tmp_path: Path) -> None:
    store, origin = make(tmp_path)
    log = tmp_path / "csnapd.log"
    pwrite(origin, 4, label(4, 1))
    daemon, host, port = await start_csnapd_on_kept_port(store, origin, log)
    connect = connector(host, port, store)
    async with open_admin(connect) as admin:
        await admin.create_snapshot(3)
    granted = trio.Event()
    with trio.fail_after(60):
        async with (
            open_client(connect) as writer_client,
            open_client(connect, snapshot=3) as reader,
        ):

            async def writer() -> None:
                async with writer_client.origin_write([(4, 1)]):
                    pwrite(origin, 4, label(4, 2))
                granted.set()

            async with trio.open_nursery() as nursery:
                async with reader.snapshot_read([(4, 1)]) as plan:
                    assert plan.origin == ((4, 1),)
                    await daemon.kill()
                    daemon, _, _ = await start_csnapd(
                        store, origin, log, "--listen", f"{host}:{port}", "--grace", "30"
                    )
                    nursery.start_soon(writer)
                    with trio.move_on_after(1.0):
                        await granted.wait()
                    # The reader re-declared its lock: the write still waits.
                    assert not granted.is_set()
                    assert pread(origin, 4) == label(4, 1)
                with trio.fail_after(10):
                    await granted.wait()
    assert await daemon.stop() == 0


async def test_grace_ends_when_a_reader_never_comes_back(tmp_path: Path) -> None:
    store, origin = make(tmp_path)
    log = tmp_path / "csnapd.log"
    daemon, host, port = await start_csnapd_on_kept_port(store, origin, log)
    connect = connector(host, port, store)
    async with open_admin(connect) as admin:
        await admin.create_snapshot(3)
    with trio.fail_after(60):
        # A reader connects and holds a lock; then the reader and the server
        # die together.
        async with (
            open_client(connect, snapshot=3, reconnect=False) as reader,
            reader.snapshot_read([(7, 1)]),
        ):
            await daemon.kill()
        daemon, _, _ = await start_csnapd(
            store, origin, log, "--listen", f"{host}:{port}", "--grace", "2"
        )
        async with open_client(connect) as writer, open_admin(connect) as admin:
            info = await admin.server_info()
            assert info["state"] == "uploading"
            async with writer.origin_write([(7, 1)]):
                pass
            assert (await admin.server_info())["state"] == "active"
    assert await daemon.stop() == 0
    assert "still missing lock uploads from 1 clients" in log.read_text()
    _ = CHUNK
