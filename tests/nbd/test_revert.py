"""Reverting the origin through csnapd while csnap-nbd stays connected as its
origin client: the reverted origin export equals the snapshot's export
(qemu-img compare), every other snapshot reads what it read before, an
origin write sent while a revert runs lands after it, and csnap-check finds
nothing (docs/protocol.md, "Reverting the origin").
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from csnap_client import AdminClient
from tests.nbd.support import (
    ORIGIN_SIZE,
    Gateway,
    csnap_check,
    gateway,
    nbdcopy_to_bytes,
    need,
    origin_image,
    qemu_io,
    run,
    stop,
)

pytestmark = [pytest.mark.e2e]

MIB = 1 << 20


async def _wait_reverted(admin: AdminClient, tag: int) -> list[int]:
    """Poll status until the revert to `tag` is done; the progress seen on the way."""
    seen: list[int] = []
    with trio.fail_after(60):
        while True:
            store = (await admin.status()).store
            if not store.reverting:
                return seen
            assert store.revert_tag == tag
            seen.append(store.revert_restored)
            await trio.sleep(0.05)


async def _compare(gw: Gateway, export: str) -> None:
    compared = await run(
        "qemu-img", "compare", "-f", "raw", "-F", "raw", gw.url(), gw.url(export), check=False
    )
    assert compared.returncode == 0, compared.stdout + compared.stderr


async def test_revert_online_with_the_gateway_connected(tmp_path: Path) -> None:
    need("qemu-io", "qemu-img", "nbdcopy")
    image = origin_image()
    async with gateway(tmp_path, image=image) as gw:

        async def write(export: str, byte: int, offset: int, length: int) -> None:
            await run(*qemu_io(gw.url(export), f"write -P {byte:#x} {offset} {length}"))

        await gw.create(1)
        await write("origin", 0x11, 0, 8 * MIB)
        await gw.create(2)
        await write("snap-1", 0x5A, 12 * MIB, MIB)  # snapshot 1's own data
        await write("origin", 0x22, 4 * MIB, 8 * MIB)
        await gw.create(3)
        snap1 = image[: 12 * MIB] + b"\x5a" * MIB + image[13 * MIB :]
        snap2 = b"\x11" * (8 * MIB) + image[8 * MIB :]
        before = b"\x11" * (4 * MIB) + b"\x22" * (8 * MIB) + image[12 * MIB :]
        assert await nbdcopy_to_bytes(gw.url(), tmp_path) == before

        async with gw.admin() as admin:
            started = await admin.revert_snapshot(1)
            # Snapshot 1 holds copies of 0..12 MiB and its own 12..13 MiB.
            assert started == {"tag": 1, "total": 13 * MIB // 4096}
            await _wait_reverted(admin, 1)
        await _compare(gw, "snap-1")
        assert await nbdcopy_to_bytes(gw.url("snap-2"), tmp_path) == snap2
        assert await nbdcopy_to_bytes(gw.url("snap-3"), tmp_path) == before
        assert await nbdcopy_to_bytes(gw.url("snap-1"), tmp_path) == snap1

        # A second revert, and an origin write sent while it runs: the write
        # waits for the revert, so it lands on the reverted origin.
        async with gw.admin() as admin:
            await admin.revert_snapshot(2)
            await write("origin", 0x77, 0, 64 << 10)
            seen = await _wait_reverted(admin, 2)
            assert not seen  # the write was granted only once the revert was done
        origin = await nbdcopy_to_bytes(gw.url(), tmp_path)
        assert origin == b"\x77" * (64 << 10) + snap2[64 << 10 :]
        assert await nbdcopy_to_bytes(gw.url("snap-2"), tmp_path) == snap2
        assert await nbdcopy_to_bytes(gw.url("snap-1"), tmp_path) == snap1
        assert await nbdcopy_to_bytes(gw.url("snap-3"), tmp_path) == before
        assert len(origin) == ORIGIN_SIZE

        await stop(gw.nbd)
        await stop(gw.csnapd)
        log = gw.csnapd.log.read_text()
        assert "origin reverted to snapshot 1" in log and "origin reverted to snapshot 2" in log
        await csnap_check(gw.store)
