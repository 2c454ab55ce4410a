"""A full store through csnap-nbd: qemu-io writes the origin until the store
is full, csnapd squashes the expendable snapshots in the documented order
(docs/rules.md, "full store squashes first") and the origin writes keep
succeeding; with nothing expendable left, only the write that cannot be
served fails (ENOSPC) and the others go on; the protected snapshots read
back exactly, and csnap-check finds nothing.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.nbd.support import (
    ORIGIN_SIZE,
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
#: 40.3 MiB of data chunks: two and a half copies of the 16 MiB origin.
STORE_SIZE = 44 * MIB


async def test_origin_writes_through_nbd_squash_in_the_documented_order(tmp_path: Path) -> None:
    need("qemu-io", "nbdcopy")
    image = origin_image()
    async with gateway(tmp_path, image=image, store_size=STORE_SIZE) as gw:

        async def write_origin(byte: int, length: int = ORIGIN_SIZE) -> None:
            await run(*qemu_io(gw.url(), f"write -P {byte:#x} 0 {length}"))

        async with gw.admin() as admin:
            await admin.create_snapshot(1, 0)
            await admin.change_use_count(1, 1)  # in use: never squashed
        await write_origin(0x11)  # 16 MiB copied for snapshot 1
        async with gw.admin() as admin:
            await admin.create_snapshot(2, -100)
        await write_origin(0x22)  # 16 MiB for snapshot 2: 8 MiB left free
        async with gw.admin() as admin:
            await admin.create_snapshot(3, -100)
            await admin.create_snapshot(4, 50)
        # 16 MiB for 3 and 4 together: snapshot 2 (priority -100, older than
        # 3) is squashed and its 16 MiB reclaimed.
        await write_origin(0x33)
        async with gw.admin() as admin:
            await admin.create_snapshot(5, 0)
        # 16 MiB for snapshot 5: squashing 3 (priority -100) frees nothing,
        # as 4 shares its copies; 5 (priority 0, below 4's 50) goes next,
        # and then the write needs no copies at all.
        await write_origin(0x55)

        async with gw.admin() as admin:
            states = {s["tag"]: s["state"] for s in await admin.list_snapshots()}
            assert states == {1: "live", 2: "squashed", 3: "squashed", 4: "live", 5: "squashed"}
            # Nothing expendable from here on.
            await admin.change_use_count(4, 1)
            await admin.create_snapshot(6, -128)
            await admin.change_use_count(6, 1)
        await write_origin(0x66, 4 * MIB)  # 4 MiB for snapshot 6: fits
        # 12 MiB more for snapshot 6 do not fit, and nothing is expendable:
        # the write fails with ENOSPC, nothing more is squashed...
        refused = await run(*qemu_io(gw.url(), f"write -P 0x77 0 {ORIGIN_SIZE}"), check=False)
        assert "No space left on device" in refused.stdout + refused.stderr, refused
        # ...and writes that need no copy are served.
        await write_origin(0x88, 4 * MIB)

        async with gw.admin() as admin:
            states = {s["tag"]: s["state"] for s in await admin.list_snapshots()}
            assert states == {
                1: "live",
                2: "squashed",
                3: "squashed",
                4: "live",
                5: "squashed",
                6: "live",
            }
        assert await nbdcopy_to_bytes(gw.url("snap-1"), tmp_path) == image
        assert await nbdcopy_to_bytes(gw.url("snap-4"), tmp_path) == b"\x22" * ORIGIN_SIZE
        assert await nbdcopy_to_bytes(gw.url("snap-6"), tmp_path) == b"\x55" * ORIGIN_SIZE
        origin = await nbdcopy_to_bytes(gw.url(), tmp_path)
        assert origin[: 4 * MIB] == b"\x88" * (4 * MIB)

        # A squashed snapshot serves nothing, and the gateway says why.
        gone = await run(*qemu_io(gw.url("snap-2"), "read 0 4096", read_only=True), check=False)
        assert gone.returncode != 0, gone
        assert "snapshot 2 was squashed" in gw.log(), gw.log()

        await stop(gw.nbd)
        await stop(gw.csnapd)
        log = gw.csnapd.log.read_text()
        squashed = [int(tag) for tag in re.findall(r"snapshot (\d+) squashed to make room", log)]
        assert squashed == [2, 3, 5], log[-3000:]
        await csnap_check(gw.store)
