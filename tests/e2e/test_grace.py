"""The post-restart grace period with real processes: an origin writer that
stayed connected across a csnapd crash gets no write granted while a reader
that held a read lock before the crash may still re-declare it; the write
goes through once the grace period ends.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from csnap_client import open_admin, open_client
from csnap_format.mkcsnap import format_store
from tests.credentials import connector
from tests.e2e.processes import start_csnapd, start_csnapd_on_kept_port
from tests.server.support import label, pread, pwrite

pytestmark = pytest.mark.e2e

GRACE = 10


async def test_a_writer_connected_across_a_restart_waits_for_the_grace_period(
    tmp_path: Path,
) -> None:
    store, origin = tmp_path / "store", tmp_path / "origin"
    format_store(str(store), str(origin), store_size=64 << 20, origin_size=16 << 20)
    for chunk in (7, 9):
        pwrite(origin, chunk, label(chunk, 1))
    log = tmp_path / "csnapd.log"
    daemon, host, port = await start_csnapd_on_kept_port(store, origin, log)
    connect = connector(host, port, store)
    async with open_admin(connect) as admin:
        await admin.create_snapshot(3)
    with trio.fail_after(120):
        async with open_client(connect) as writer:
            async with writer.origin_write([(1, 1)]):
                pass  # identified and granted before the crash
            # A reader holds a lock on chunk 7 when csnapd dies, and never
            # comes back to re-declare it.
            async with (
                open_client(connect, snapshot=3, reconnect=False) as reader,
                reader.snapshot_read([(7, 1)]) as plan,
            ):
                assert plan.origin == ((7, 1),)
                await daemon.kill()
            daemon, _, _ = await start_csnapd(
                store, origin, log, "--listen", f"{host}:{port}", "--grace", str(GRACE)
            )
            granted = trio.Event()

            async def write(chunk: int) -> None:
                async with writer.origin_write([(chunk, 1)]):
                    pwrite(origin, chunk, label(chunk, 2))
                granted.set()

            async with trio.open_nursery() as nursery:
                # Chunk 9 was locked by nobody, chunk 7 by the lost reader:
                # neither may be written before the locks are known.
                nursery.start_soon(write, 9)
                with trio.move_on_after(2):
                    await granted.wait()
                assert not granted.is_set(), "an origin write was granted during the grace period"
                async with open_admin(connect) as admin:
                    assert (await admin.server_info())["state"] == "uploading"
                assert pread(origin, 9) == label(9, 1)
                with trio.fail_after(GRACE + 20):
                    await granted.wait()
            assert writer.reconnects >= 1
            granted = trio.Event()
            await write(7)
            async with open_admin(connect) as admin:
                assert (await admin.server_info())["state"] == "active"
    assert pread(origin, 9) == label(9, 2) and pread(origin, 7) == label(7, 2)
    assert await daemon.stop() == 0
    assert "grace period over; still missing lock uploads from 1 clients" in log.read_text()
