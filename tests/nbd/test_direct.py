"""Direct I/O (O_DIRECT) on shared devices: csnapd and csnap-nbd bypass the
page cache for block devices by default and for files with --direct, and
NBD clients' writes at any offset and length still land exactly.

Block devices here are loop devices over files of the test's own (root is
needed to attach them: the test fails, not skips, without it). A loop
device also stands in for a disk another host rewrites: writing its
backing file changes what the device holds without passing through the
device's page cache, as a second host's writes would.
"""

from __future__ import annotations

import os
import random
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio

from csnap_client import tcp_connector
from csnap_client.admin import open_admin
from csnap_common.credentials import ROLE_ADMIN, client_context, make_credentials
from csnap_common.direct_io import DirectFile, DirectIOError
from csnap_format.mkcsnap import format_store
from csnap_nbd.backing import Backing, Transfer
from csnap_nbd.geometry import Placement
from csnapd.engine.device import FileDevice
from csnapd.engine.engine import Engine
from csnapd.engine.errors import StoreOpenError
from tests.compare import assert_same_bytes
from tests.e2e.processes import Daemon, start_csnapd
from tests.nbd.support import (
    ORIGIN_SIZE,
    csnap_check,
    gateway,
    nbdcopy_to_bytes,
    need,
    origin_image,
    qemu_io,
    run,
    start_gateway,
    stop,
)

#: Writes an NBD client may send: sector-sized, sub-sector, across a
#: 4096-byte block boundary and across a chunk boundary; (offset, length, byte).
UNALIGNED_WRITES = [(512, 512, 0x5A), (4097, 100, 0x3C), (8190, 9, 0x77), (65536 - 700, 1500, 0x11)]


@contextmanager
def loop_device(backing: Path) -> Iterator[str]:
    """`backing` attached as a loop device (buffered: the device has its own page cache)."""
    attached = subprocess.run(
        ["losetup", "--find", "--show", "--direct-io=off", str(backing)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if attached.returncode != 0:
        pytest.fail(f"losetup (root needed) failed: {attached.stderr.strip()}")
    device = attached.stdout.strip()
    try:
        yield device
    finally:
        subprocess.run(["losetup", "--detach", device], timeout=30, check=False)


def direct_descriptors(pid: int, path: str) -> list[bool]:
    """For each descriptor of process `pid` open on `path`: whether it is O_DIRECT."""
    found = []
    real = os.path.realpath(path)
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue
        if target != real:
            continue
        found.append(is_direct(int(fd), pid))
    return found


def is_direct(fd: int, pid: int | str = "self") -> bool:
    """Whether descriptor `fd` of process `pid` is O_DIRECT, as the kernel says."""
    for line in Path(f"/proc/{pid}/fdinfo/{fd}").read_text().splitlines():
        if line.startswith("flags:"):
            return bool(int(line.split()[1], 8) & os.O_DIRECT)
    raise AssertionError(f"no flags in /proc/{pid}/fdinfo/{fd}")


def expected_after(image: bytes) -> bytes:
    out = bytearray(image)
    for offset, length, byte in UNALIGNED_WRITES:
        out[offset : offset + length] = bytes([byte]) * length
    return bytes(out)


def qemu_writes(url: str) -> list[str]:
    return qemu_io(url, *(f"write -P {b:#x} {o} {n}" for o, n, b in UNALIGNED_WRITES))


def test_a_disk_another_host_rewrote_is_read_fresh(tmp_path: Path) -> None:
    """What O_DIRECT is for: a page cache keeps serving bytes the disk no
    longer holds; the store device, direct by default on a block device,
    reads the disk."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"old!" * 4096)
    with loop_device(disk) as device:
        cached = os.open(device, os.O_RDONLY)
        try:
            assert os.pread(cached, 4, 0) == b"old!"  # now in this host's page cache
            # "Another host" writes the disk, beneath this host's cache.
            with open(disk, "r+b") as other:
                other.write(b"new!" * 4096)
                other.flush()
                os.fsync(other.fileno())
            assert os.pread(cached, 4, 0) == b"old!", "the page cache went stale"
        finally:
            os.close(cached)
        store = FileDevice(device, writable=False)
        try:
            assert store.direct is not None and store.direct.alignment == 512
            assert store.read(0, 4) == b"new!"
        finally:
            store.close()
        backing = Backing(device, device, read_only=True)
        try:
            assert set(backing.direct) == {backing.origin, backing.store}
            into = bytearray(6)
            backing.read_now([Transfer(backing.origin, "origin", [Placement(2, 0, 6)])], into)
            assert into == b"w!new!"
        finally:
            backing.close()
        cached_on_request = FileDevice(device, writable=False, direct=False)
        try:
            assert cached_on_request.direct is None
        finally:
            cached_on_request.close()


def test_files_go_direct_only_on_request(tmp_path: Path) -> None:
    store, origin = tmp_path / "store", tmp_path / "origin"
    format_store(str(store), str(origin), store_size=16 << 20, origin_size=4 << 20, progress=False)
    plain = FileDevice(store)
    try:
        assert plain.direct is None
    finally:
        plain.close()
    engine = Engine.open_files(store, origin, direct=True)
    engine.close()
    device = FileDevice(store, direct=True)
    try:
        assert device.direct is not None and device.direct.alignment == 4096
        assert direct_descriptors(os.getpid(), str(store)) == [True]
        # Any offset and length, through read-modify-write of the blocks it covers part of.
        device.write(4096 * 100 + 3, b"abc" * 700)
        device.sync()
        assert device.read(4096 * 100, 2105) == b"\0\0\0" + b"abc" * 700 + b"\0\0"
        assert device.direct.partial_writes == 1
    finally:
        device.close()
    # A file whose last block is partial cannot be written whole: a clear refusal.
    odd = tmp_path / "odd"
    odd.write_bytes(bytes(5000))
    with pytest.raises(DirectIOError, match="multiple of 4096"):
        FileDevice(odd, direct=True)
    with pytest.raises(StoreOpenError, match="multiple of 4096"):
        Engine.open_files(store, odd, direct=True)


async def test_gateway_and_csnapd_on_block_devices_go_direct(tmp_path: Path) -> None:
    """Both services on loop devices, without any flag: every descriptor on
    the devices is O_DIRECT, and unaligned NBD writes to the origin keep the
    snapshot and the origin exact."""
    need("qemu-io", "nbdcopy")
    store_file, origin_file = tmp_path / "store.img", tmp_path / "origin.img"
    format_store(
        str(store_file),
        str(origin_file),
        store_size=64 << 20,
        origin_size=ORIGIN_SIZE,
        progress=False,
    )
    image = origin_image()
    origin_file.write_bytes(image)
    keys = tmp_path / "keys"
    make_credentials(keys)
    with loop_device(store_file) as store, loop_device(origin_file) as origin:
        csnapd, host, port = await start_csnapd(
            Path(store), Path(origin), tmp_path / "csnapd.log", "--credentials", str(keys)
        )
        nbd: Daemon | None = None
        try:
            nbd, urls = await start_gateway(
                tmp_path,
                "--listen",
                "127.0.0.1:0",
                "--origin",
                origin,
                "--store",
                store,
                "--credentials",
                str(keys),
                server=f"{host}:{port}",
            )
            for daemon in (csnapd, nbd):
                for device in (store, origin):
                    flags = direct_descriptors(daemon.process.pid, device)
                    assert flags and all(flags), (daemon.first_line, device, flags)
            admin = tcp_connector(host, port, client_context(keys, ROLE_ADMIN))
            async with open_admin(admin) as session:
                await session.create_snapshot(1)
            await run(*qemu_writes(f"{urls[0]}/origin"))
            assert_same_bytes(
                await nbdcopy_to_bytes(f"{urls[0]}/snap-1", tmp_path), image, "snapshot 1"
            )
            assert_same_bytes(
                await nbdcopy_to_bytes(f"{urls[0]}/origin", tmp_path),
                expected_after(image),
                "origin",
            )
        finally:
            with trio.CancelScope(shield=True):
                if nbd is not None:
                    assert await stop(nbd) == 0
                assert await stop(csnapd) == 0
        await csnap_check(Path(store))
    # What the devices wrote reached the files beneath them.
    assert_same_bytes(origin_file.read_bytes(), expected_after(image), "origin file")


async def test_unaligned_nbd_writes_with_direct_files(tmp_path: Path) -> None:
    """--direct on files: writes smaller than the 4096-byte alignment, into
    a snapshot and the origin, are read back exactly (read-modify-write)."""
    need("qemu-io", "nbdcopy")
    image = origin_image()
    async with gateway(tmp_path, "--direct", csnapd_args=("--direct",)) as gw:
        for pid in (gw.csnapd.process.pid, gw.nbd.process.pid):
            for path in (gw.store, gw.origin):
                flags = direct_descriptors(pid, str(path))
                assert flags and all(flags), (pid, path, flags)
        await gw.create(1)
        await gw.create(2)
        await run(*qemu_writes(gw.url("origin")))
        await run(*qemu_writes(gw.url("snap-2")))
        # Random small writes from a second client, then the same bytes expected.
        rng = random.Random(5)
        writes = [(rng.randrange(ORIGIN_SIZE - 600), rng.randrange(1, 600)) for _ in range(12)]
        await run(*qemu_io(gw.url("snap-1"), *(f"write -P 0xee {o} {n}" for o, n in writes)))
        snapshot_1 = bytearray(image)
        for offset, length in writes:
            snapshot_1[offset : offset + length] = b"\xee" * length
        expected = expected_after(image)
        assert_same_bytes(await nbdcopy_to_bytes(gw.url("origin"), tmp_path), expected, "origin")
        assert_same_bytes(await nbdcopy_to_bytes(gw.url("snap-2"), tmp_path), expected, "snap 2")
        assert_same_bytes(
            await nbdcopy_to_bytes(gw.url("snap-1"), tmp_path), bytes(snapshot_1), "snap 1"
        )
    await csnap_check(gw.store)


def test_direct_writes_and_reads_match_a_model(tmp_path: Path) -> None:
    """Random writes and reads at any offset and length, through O_DIRECT,
    against the same done to bytes in memory."""
    path = tmp_path / "model.img"
    size = 64 << 10
    path.write_bytes(bytes(size))
    model = bytearray(size)
    rng = random.Random(11)
    fd = os.open(path, os.O_RDWR)
    try:
        aligned = DirectFile.enable(fd, what=str(path))
        for step in range(400):
            offset = rng.randrange(size)
            length = rng.randrange(1, min(size - offset, 9000) + 1)
            if step % 2:
                data = rng.randbytes(length)
                aligned.write(offset, data)
                model[offset : offset + length] = data
            else:
                assert aligned.read(offset, length) == model[offset : offset + length], step
    finally:
        os.close(fd)
    assert path.read_bytes() == model


def test_partial_writes_into_one_block_from_threads_all_land(tmp_path: Path) -> None:
    """Read-modify-write of one block by several threads at once: each
    thread's bytes survive the others' (they are serialised per file)."""
    path = tmp_path / "shared.img"
    path.write_bytes(bytes(8192))
    fd = os.open(path, os.O_RDWR)
    try:
        aligned = DirectFile.enable(fd, what=str(path))

        def writer(n: int) -> None:
            for round_ in range(100):
                aligned.write(4096 + n * 512 + 7, bytes([n + 1, round_ % 256]) * 100)

        threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        block = aligned.read(4096, 4096)
    finally:
        os.close(fd)
    for n in range(4):
        assert block[n * 512 + 7 : n * 512 + 207] == bytes([n + 1, 99]) * 100, n
