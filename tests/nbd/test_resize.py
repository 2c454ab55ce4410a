"""Growing the origin and the store online through csnap-nbd: qemu-io keeps
writing the origin while `resize` grows both; the new space is usable at
once (NBD connections made after the resize see the new origin size, and
copies land in the grown store); a snapshot taken before keeps its size
(nbdinfo) and its data; a refused shrink changes nothing; csnap-check finds
nothing wrong.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from csnap_client import ServerError
from csnap_delta import DeltaWriteError, write_delta
from csnap_protocol import ErrorCode
from tests.credentials import connector
from tests.nbd.support import (
    ORIGIN_SIZE,
    csnap_check,
    gateway,
    need,
    qemu_io,
    run,
    stop,
)

pytestmark = [pytest.mark.e2e]

MIB = 1 << 20
#: Room for one full copy of the 16 MiB origin, not two.
STORE_SIZE = 24 * MIB


async def export_size(url: str) -> int:
    return int((await run("nbdinfo", "--size", url)).stdout)


async def test_grow_origin_and_store_while_qemu_io_writes(tmp_path: Path) -> None:
    need("qemu-io", "nbdinfo")
    async with gateway(tmp_path, store_size=STORE_SIZE, max_store_size=64 * MIB) as gw:
        async with gw.admin() as admin:
            await admin.create_snapshot(1, 0)
            await admin.change_use_count(1, 1)  # never squashed: space must come from growth
        writes = [f"write -P 0x{0x40 + n % 64:02x} {n % 256 * 64 * 1024} 64k" for n in range(1000)]
        writer_done = trio.Event()
        writer: list[object] = []

        async def keep_writing() -> None:
            writer.append(await run(*qemu_io(gw.url(), *writes), seconds=60))
            writer_done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(keep_writing)
            await trio.sleep(0.2)
            os.truncate(gw.origin, 2 * ORIGIN_SIZE)  # the administrator grows the origin
            async with gw.admin() as admin:
                resized = await admin.resize(
                    origin_bytes=2 * ORIGIN_SIZE, store_bytes=60 * MIB, grow_files=True
                )
            # The resize was served while the writer's connection stayed busy.
            assert not writer_done.is_set()
            assert resized["origin_chunks"] * 4096 == 2 * ORIGIN_SIZE
            assert resized["store_chunks"] * 4096 == 60 * MIB
            assert resized["grown_files"] == ["store"]
        assert writer_done.is_set()

        # New connections see the grown origin; the snapshot keeps its size.
        assert await export_size(gw.url()) == 2 * ORIGIN_SIZE
        assert await export_size(gw.url("snap-1")) == ORIGIN_SIZE
        # The new origin space is usable at once.
        await run(*qemu_io(gw.url(), f"write -P 0x5a {ORIGIN_SIZE + MIB} 1M"))
        await run(*qemu_io(gw.url(), f"read -P 0x5a {ORIGIN_SIZE + MIB} 1M", read_only=True))
        beyond = await run(
            *qemu_io(gw.url("snap-1"), f"read 0 {ORIGIN_SIZE + 4096}", read_only=True),
            check=False,
        )
        assert beyond.returncode != 0 or "error" in (beyond.stdout + beyond.stderr).lower()

        # A snapshot of the grown origin, then a full rewrite: its 32 MiB of
        # copies, with snapshot 1's 16 MiB, need twice what the old store
        # held, and nothing may be squashed.
        async with gw.admin() as admin:
            await admin.create_snapshot(2, 0)
            await admin.change_use_count(2, 1)
        assert await export_size(gw.url("snap-2")) == 2 * ORIGIN_SIZE
        await run(*qemu_io(gw.url(), f"write -P 0x77 0 {2 * ORIGIN_SIZE}"))
        await run(*qemu_io(gw.url("snap-2"), f"read -P 0x5a {ORIGIN_SIZE + MIB} 1M"))
        await run(*qemu_io(gw.url("snap-2"), f"read -P 0 {ORIGIN_SIZE} 1M"))

        # A delta joins snapshots of one size.
        connect = connector("127.0.0.1", gw.csnapd_port, gw.store)
        with pytest.raises(DeltaWriteError, match="different sizes"):
            await write_delta(connect, connect, 1, 2, tmp_path / "1-2.delta")

        # Refused shrinks change nothing.
        async with gw.admin() as admin:
            before = await admin.status()
            for sizes, code in (
                ({"origin_bytes": ORIGIN_SIZE, "store_bytes": None}, ErrorCode.SHRINK_REFUSED),
                ({"origin_bytes": None, "store_bytes": 8 * MIB}, ErrorCode.SHRINK_REFUSED),
                ({"origin_bytes": None, "store_bytes": 1 << 40}, ErrorCode.BEYOND_CAPACITY),
            ):
                with pytest.raises(ServerError) as refused:
                    await admin.resize(**sizes)  # type: ignore[arg-type]
                assert refused.value.error is code
            after = await admin.status()
            assert after.store == before.store
            states = {s["tag"]: s["state"] for s in await admin.list_snapshots()}
            assert states == {1: "live", 2: "live"}
        await stop(gw.nbd)
        await stop(gw.csnapd)
        await csnap_check(gw.store)
