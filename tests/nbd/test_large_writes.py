"""A write the gateway accepts succeeds whatever csnapd's limits: the gateway
splits by the max_chunks csnapd announces, and a piece csnapd still finds
too large for one transaction (a small journal, many chunks to copy out)
is halved until it fits. Checked through qemu-io with the largest write
the gateway advertises, and against an in-process csnapd with a small
max_chunks, counting the requests it received.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from csnap_format.mkcsnap import format_store
from csnap_nbd.backing import Backing
from csnap_nbd.exports import Exports, Geometry
from csnapd.server import ServerConfig
from tests.compare import assert_same_bytes
from tests.nbd.support import csnap_check, gateway, nbdcopy_to_bytes, need, qemu_io, run, stop
from tests.server.support import running

pytestmark = [pytest.mark.e2e]

MIB = 1 << 20
#: The gateway's maximum block size, and the origin's size here.
LARGEST = 32 * MIB


async def test_largest_writes_succeed_with_a_small_journal_and_many_snapshots(
    tmp_path: Path,
) -> None:
    need("qemu-io", "nbdcopy")
    # 4 KiB chunks and the smallest journal: one transaction holds far fewer
    # copy-outs than csnapd's max_chunks, so csnapd refuses whole pieces.
    rounds = 3
    async with gateway(
        tmp_path,
        origin_size=LARGEST,
        store_size=(rounds + 2) * LARGEST + 32 * MIB,
        journal_size=256 << 10,
    ) as gw:
        expected = {1: gw.origin.read_bytes()}
        await gw.create(1)
        for pattern in range(1, rounds + 1):
            await run(*qemu_io(gw.url(), f"write -P {pattern} 0 {LARGEST}"), seconds=120)
            await gw.create(pattern + 1)
            expected[pattern + 1] = bytes([pattern]) * LARGEST
        # A snapshot's own writes allocate store chunks: as much metadata.
        await run(*qemu_io(gw.url("snap-2"), f"write -P 0x99 0 {LARGEST}"), seconds=120)
        expected[2] = b"\x99" * LARGEST
        for tag, image in expected.items():
            copy = await nbdcopy_to_bytes(gw.url(f"snap-{tag}"), tmp_path)
            assert_same_bytes(copy, image, f"snap-{tag}")
        assert_same_bytes(gw.origin.read_bytes(), bytes([rounds]) * LARGEST, "the origin")
        assert await stop(gw.nbd) == 0
        assert await stop(gw.csnapd) == 0
        await csnap_check(gw.store)


async def test_requests_to_csnapd_never_name_more_than_its_max_chunks(tmp_path: Path) -> None:
    store, origin = tmp_path / "store", tmp_path / "origin"
    format_store(str(store), str(origin), store_size=64 * MIB, origin_size=16 * MIB)
    config = ServerConfig(store=str(store), origin=str(origin))
    chunk = 4096
    async with running(config, max_chunks=16) as server:
        backing = Backing(str(origin), str(store), read_only=False)
        try:
            async with trio.open_nursery() as nursery:
                exports = Exports(
                    server.connector(), server.connector(), Geometry(chunk, 4096), backing
                )
                await nursery.start(exports.run)
                async with server.admin() as admin:
                    await admin.create_snapshot(1)

                    async def requests() -> int:
                        return int((await admin.server_info())["requests"])

                    async with exports.use(None) as origin_path, exports.use(1) as snapshot:
                        # 100 chunks touched, both ends partial: 7 pieces of at most 16.
                        data = memoryview(b"\xab" * (99 * chunk))
                        before = await requests()
                        await origin_path.write(chunk // 2, data, fua=False)
                        assert await requests() - before == 7 + 1  # +1: this server_info
                        before = await requests()
                        await snapshot.write(chunk // 2, data, fua=False)
                        assert await requests() - before == 7 + 1
                        assert await snapshot.read(chunk // 2, len(data)) == data
                nursery.cancel_scope.cancel()
        finally:
            backing.close()
