"""Delta commands on shared devices: `csnap delta`, `apply`, `receive` and
`send` open the store, origin and image as csnapd and csnap-nbd do,
O_DIRECT for block devices by default, for files with --direct, never with
--no-direct; the descriptors are O_DIRECT when they say so, and a delta
read and applied that way still makes the snapshot byte for byte.

The block device is a loop device over a file of the test's own (root is
needed to attach it: the test fails, not skips, without it).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

from csnap_client import find_server
from csnap_delta.devices import Device
from tests.compare import assert_same_bytes
from tests.e2e.processes import csnap, start_agent
from tests.nbd.support import CHUNK, gateway, nbdcopy_to_bytes, need, qemu_io, run, stop
from tests.nbd.test_direct import is_direct, loop_device

pytestmark = [pytest.mark.e2e]


def test_devices_open_by_the_shared_device_rule(tmp_path: Path) -> None:
    image = tmp_path / "image.raw"
    image.write_bytes(bytes(range(256)) * 64)  # 16 KiB: a multiple of 4096
    odd = tmp_path / "odd.raw"
    odd.write_bytes(bytes(1000))
    with loop_device(image) as block:
        for path, direct, wanted in (
            (image, None, False),
            (image, True, True),
            (block, None, True),
            (block, True, True),
            (block, False, False),
        ):
            device = Device.open(path, writable=True, direct=direct)
            try:
                assert is_direct(device.fd) == wanted == (device.direct is not None), path
                # Unaligned reads and writes, and a short read at the end.
                assert device.pread(10, 300) == (bytes(range(256)) * 2)[44:54]
                assert device.pread(100, device.size - 7) == (bytes(range(256)))[-7:]
                assert device.pwrite(b"\x99" * 5, 4094) == 5
                assert device.pread(7, 4093) == bytes([253]) + b"\x99" * 5 + bytes([3])
            finally:
                device.close()
    # A file that cannot go direct is named, and nothing stays open.
    with pytest.raises(OSError, match="multiple of 4096"):
        Device.open(odd, writable=False, direct=True)


async def test_delta_and_apply_go_direct_and_still_make_the_snapshot(tmp_path: Path) -> None:
    need("qemu-io", "nbdcopy")
    sock = tmp_path / "agent.sock"
    agent = await start_agent(sock, tmp_path / "agent.log")
    try:
        async with gateway(tmp_path, "--direct", csnapd_args=["--agent", str(sock)]) as gw:
            with trio.fail_after(30):
                await find_server(str(sock), wait=True)
            await run(*qemu_io(gw.url("origin"), f"write -P 0x11 0 {2 * CHUNK}"))
            assert (await csnap(sock, "create", "1")).returncode == 0
            writes = [f"write -P 0x22 {3 * CHUNK} {CHUNK}", f"write -P 0x23 {90 * CHUNK + 5} 77"]
            await run(*qemu_io(gw.url("origin"), *writes))
            assert (await csnap(sock, "create", "2")).returncode == 0
            await run(*qemu_io(gw.url("origin"), f"write -P 0x33 {3 * CHUNK} 10"))
            older = await nbdcopy_to_bytes(gw.url("snap-1"), tmp_path, "copy-1.raw")
            newer = await nbdcopy_to_bytes(gw.url("snap-2"), tmp_path, "copy-2.raw")

            delta = tmp_path / "1-2.delta"
            made = await csnap(sock, "--json", "delta", "1", "2", "-o", str(delta), "--direct")
            assert made.returncode == 0, made.stderr
            assert json.loads(made.stdout)["direct"] == {"store": True, "origin": True}
            buffered = tmp_path / "1-2-buffered.delta"
            made = await csnap(sock, "--json", "delta", "1", "2", "-o", str(buffered))
            assert made.returncode == 0, made.stderr
            assert json.loads(made.stdout)["direct"] == {"store": False, "origin": False}

            # Onto a block device: O_DIRECT by default, and the image becomes snapshot 2.
            image = tmp_path / "image.raw"
            image.write_bytes(older)
            with loop_device(image) as block:
                applied = await csnap(sock, "--json", "apply", str(delta), "--to", block)
                assert applied.returncode == 0, applied.stderr
                assert json.loads(applied.stdout)["direct"] is True
                again = await csnap(
                    sock, "--json", "apply", str(buffered), "--to", block, "--no-direct"
                )
                assert again.returncode == 0, again.stderr
                report = json.loads(again.stdout)
                assert (report["direct"], report["written_chunks"]) == (False, 0)
            assert_same_bytes(image.read_bytes(), newer, "delta applied to the block device")
    finally:
        with trio.CancelScope(shield=True):
            await stop(agent)
