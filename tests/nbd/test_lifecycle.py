"""csnap-nbd over time: a snapshot taken while qemu writes the origin is a
point in time, a deleted snapshot's export ends cleanly, the gateway stops
with exit status 0 on SIGTERM (also before csnapd ever answered), it finds
csnapd through a csnap-agent, and a kernel filesystem path (nbdfuse) works.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from csnap_client import open_admin
from csnap_common.credentials import make_credentials, store_credentials
from csnap_format.mkcsnap import format_store
from csnap_nbd.wire import handshake as hs
from csnap_nbd.wire.constants import Command, Errno, Option, Reply
from tests.compare import assert_same_bytes
from tests.credentials import connector
from tests.e2e.processes import ROOT, kept_port, start_agent, start_csnapd
from tests.nbd.rawclient import RawClient
from tests.nbd.support import (
    CHUNK,
    ORIGIN_SIZE,
    gateway,
    nbdcopy_to_bytes,
    need,
    open_log,
    origin_image,
    qemu_io,
    run,
    start_gateway,
    stop,
)

pytestmark = [pytest.mark.e2e]


def _logged(path: Path, text: str) -> bool:
    return path.exists() and text in path.read_text(errors="replace")


async def wait_for_log(path: Path, text: str) -> None:
    """Until `text` shows in a daemon's log (bounded)."""
    with trio.fail_after(30):
        while True:
            if _logged(path, text):
                return
            await trio.sleep(0.02)


def _fuse_usable() -> bool:
    return os.path.exists("/dev/fuse") and os.geteuid() == 0


WRITTEN = ORIGIN_SIZE // 2


async def test_snapshot_taken_during_writes_is_a_point_in_time(tmp_path: Path) -> None:
    need("qemu-img", "nbdcopy")
    before = origin_image()
    async with gateway(tmp_path, image=before) as gw:
        async with trio.open_nursery() as nursery:
            # The first half of the origin, 16 chunk-sized writes in flight.
            bench = [
                "qemu-img",
                "bench",
                "-f",
                "raw",
                "-w",
                "-c",
                str(WRITTEN // CHUNK),
                "-d",
                "16",
                "-s",
                "4k",
                "--pattern=0xab",
                gw.url(unix=True),
            ]
            nursery.start_soon(lambda: run(*bench, seconds=60))
            await wait_for_log(gw.nbd_log, "serving origin")
            await gw.create(1)
        snapshot = await nbdcopy_to_bytes(gw.url("snap-1"), tmp_path)

    new = b"\xab" * CHUNK
    assert_same_bytes(
        gw.origin.read_bytes(), new * (WRITTEN // CHUNK) + before[WRITTEN:], "origin file"
    )
    # Every chunk of the snapshot is wholly from before or wholly from after
    # the create, which waited for the origin writes it had granted.
    for chunk in range(ORIGIN_SIZE // CHUNK):
        span = slice(chunk * CHUNK, (chunk + 1) * CHUNK)
        assert snapshot[span] in (before[span], new), chunk


async def test_deleted_snapshot_export_ends_cleanly(tmp_path: Path) -> None:
    need("nbdinfo")
    image = origin_image()
    async with gateway(tmp_path, image=image) as gw:
        await gw.create(7)
        client = await RawClient.unix(gw.socket)
        await client.go("snap-7")
        await client.request(Command.READ, 0, 100)
        assert (await client.answer()).data == image[:100]

        await gw.delete(7)
        # I/O gets an error, then the gateway closes the connection.
        await client.request(Command.READ, 0, 100, cookie=2)
        answer = await client.answer()
        assert answer.cookie == 2 and answer.errors == [Errno.EIO]
        assert await client.closed()

        # The export is gone from the list and cannot be opened again.
        fresh = await RawClient.unix(gw.socket)
        await fresh.greet()
        replies = await fresh.option(Option.GO, hs.info_request("snap-7"))
        assert replies[-1][0] == Reply.ERR_UNKNOWN
        await fresh.aclose()
        assert (await run("nbdinfo", gw.url("snap-7"), check=False)).returncode != 0
        # Everything else still works.
        await run("nbdinfo", gw.url("origin"))


async def test_connections_to_one_export_share_one_csnapd_client(tmp_path: Path) -> None:
    async with gateway(tmp_path, "--linger", "2") as gw:
        await gw.create(1)

        async def counts() -> tuple[object, object]:
            info = await gw.server_info()
            return info["origin_clients"], info["snapshot_clients"]

        assert await counts() == (0, 0)  # opened lazily
        clients = []
        for export in ("snap-1", "snap-1", "snap-1", "origin", "origin"):
            client = await RawClient.unix(gw.socket)
            await client.go(export)
            clients.append(client)
        assert await counts() == (1, 1)
        for client in clients:
            await client.request(Command.DISC)
            assert await client.closed()
        # The snapshot's client lingers for a reconnect, which reuses it...
        assert await counts() == (1, 1)
        again = await RawClient.unix(gw.socket)
        await again.go("snap-1")
        assert await counts() == (1, 1)
        await again.request(Command.DISC)
        assert await again.closed()
        # ...and is closed when the linger after its last user runs out; the
        # origin's stays open.
        with trio.fail_after(10):
            while True:
                if await counts() == (1, 0):
                    break
                await trio.sleep(0.02)


async def test_gateway_rides_out_a_csnapd_crash_and_restart(tmp_path: Path) -> None:
    need("qemu-io")
    image = origin_image()
    listen = ("--listen", f"127.0.0.1:{kept_port()}", "--grace", "5")
    async with gateway(tmp_path, image=image, csnapd_args=listen) as gw:
        await gw.create(1)
        await run(*qemu_io(gw.url(), "write -P 0x61 0 8192"))
        client = await RawClient.unix(gw.socket)
        await client.go("snap-1")  # its csnapd client stays open across the crash
        await gw.csnapd.kill()
        gw.csnapd, _, _ = await start_csnapd(
            gw.store, gw.origin, tmp_path / "csnapd-again.log", *listen
        )
        # The open connection goes on, new ones work, copy-on-write still holds.
        await client.request(Command.READ, 0, 3 * CHUNK)
        assert_same_bytes((await client.answer()).data, image[: 3 * CHUNK], "snap-1")
        await run(*qemu_io(gw.url(), "write -P 0x62 4096 8192", "read -P 0x62 4096 8192"))
        await client.request(Command.READ, 0, 3 * CHUNK, cookie=2)
        assert_same_bytes((await client.answer()).data, image[: 3 * CHUNK], "snap-1")
        await client.request(Command.DISC)
        assert await client.closed()


async def test_sigterm_stops_cleanly_with_open_connections(tmp_path: Path) -> None:
    async with gateway(tmp_path) as gw:
        idle = await RawClient.unix(gw.socket)
        await idle.go("origin")
        negotiating = await RawClient.unix(gw.socket)
        await negotiating.greet()
        assert await stop(gw.nbd) == 0
        assert await idle.closed()
        assert await negotiating.closed()
        assert not gw.socket.exists()


async def test_sigterm_before_csnapd_answers_exits_zero(tmp_path: Path) -> None:
    # Nothing listens on this port: the gateway keeps looking for csnapd.
    make_credentials(store_credentials(tmp_path / "store.img"))
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = tmp_path / "nbd.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open_log(log) as err:
        process = await trio.lowlevel.open_process(
            [
                sys.executable,
                "-m",
                "csnap_nbd",
                "--server",
                f"127.0.0.1:{port}",
                "--origin",
                str(tmp_path / "origin.img"),
                "--store",
                str(tmp_path / "store.img"),
                "--listen",
                "127.0.0.1:0",
            ],
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=env,
        )
    try:
        await wait_for_log(log, "cannot reach csnapd")
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(20):
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_a_gateway_that_cannot_start_exits_3(tmp_path: Path) -> None:
    async with gateway(tmp_path) as gw:
        not_a_socket = tmp_path / "plain-file"
        not_a_socket.write_bytes(b"")
        server = ["--server", f"127.0.0.1:{gw.csnapd_port}"]
        server += ["--origin", str(gw.origin), "--store", str(gw.store)]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        for extra in (
            ["--unix", str(not_a_socket)],
            ["--unix", str(gw.socket)],  # a live gateway listens there
            ["--listen", gw.tcp.removeprefix("nbd://")],  # address in use
            ["--origin", str(tmp_path / "missing.img"), "--listen", "127.0.0.1:0"],
        ):
            with trio.fail_after(30):
                result = await trio.run_process(
                    [sys.executable, "-m", "csnap_nbd", *server, *extra],
                    capture_stdout=True,
                    capture_stderr=True,
                    check=False,
                    env=env,
                )
            assert result.returncode == 3, (extra, result.stderr.decode())
            assert result.stdout == b""
        # The live gateway's socket was left alone.
        client = await RawClient.unix(gw.socket)
        await client.go("origin")
        await client.aclose()


async def test_gateway_finds_csnapd_through_the_agent(tmp_path: Path) -> None:
    need("nbdinfo", "qemu-io")
    store, origin = tmp_path / "store.img", tmp_path / "origin.img"
    format_store(str(store), str(origin), store_size=64 << 20, origin_size=ORIGIN_SIZE)
    agent_socket = tmp_path / "agent.sock"
    agent = await start_agent(agent_socket, tmp_path / "agent.log")
    csnapd, host, port = await start_csnapd(
        store, origin, tmp_path / "csnapd.log", "--agent", str(agent_socket)
    )
    nbd = None
    try:
        nbd, urls = await start_gateway(
            tmp_path, "--agent", str(agent_socket), "--listen", "127.0.0.1:0"
        )
        url = urls[0]
        async with open_admin(connector(host, port, store)) as admin:
            await admin.create_snapshot(2)
        await run(*qemu_io(f"{url}/origin", "write -P 0x77 0 8192"))
        listed = await run("nbdinfo", "--list", url)
        assert 'export="snap-2"' in listed.stdout
        await run(*qemu_io(f"{url}/snap-2", "read -P 0 0 8192", read_only=True))
        await run(*qemu_io(f"{url}/origin", "read -P 0x77 0 8192", read_only=True))
    finally:
        with trio.CancelScope(shield=True):
            if nbd is not None:
                assert await stop(nbd) == 0
            await stop(csnapd)
            await stop(agent)


async def test_nbdfuse_file_reads_and_writes_through_the_kernel(tmp_path: Path) -> None:
    need("nbdcopy")
    # Optional everywhere (scripts/test does not install it): nbdfuse is its
    # own Debian package, and FUSE needs /dev/fuse and root to unmount.
    if shutil.which("nbdfuse") is None or not _fuse_usable():
        pytest.skip("needs nbdfuse, /dev/fuse and root")
    image = origin_image()
    async with gateway(tmp_path, image=image) as gw:
        await gw.create(1)
        mountpoint = tmp_path / "fuse"
        mountpoint.mkdir()
        disk = mountpoint / "disk"
        fuse = await trio.lowlevel.open_process(
            ["nbdfuse", str(disk), gw.url(unix=True)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            with trio.fail_after(20):
                while True:
                    if await trio.Path(disk).exists():
                        break
                    await trio.sleep(0.02)
            data = b"through the page cache and FUSE" * 1000

            def write_and_read() -> bytes:
                fd = os.open(disk, os.O_RDWR)
                try:
                    os.pwrite(fd, data, 123_457)
                    os.fsync(fd)
                    return os.pread(fd, len(data), 123_457)
                finally:
                    os.close(fd)

            with trio.fail_after(30):
                assert_same_bytes(await trio.to_thread.run_sync(write_and_read), data, "read back")
        finally:
            with trio.CancelScope(shield=True):
                await run("umount", str(mountpoint), check=False)
                with trio.move_on_after(20):
                    await fuse.wait()
                if fuse.returncode is None:
                    fuse.kill()
                    await fuse.wait()
        expected = bytearray(image)
        expected[123_457 : 123_457 + len(data)] = data
        assert_same_bytes(gw.origin.read_bytes(), bytes(expected), "origin file")
        assert_same_bytes(await nbdcopy_to_bytes(gw.url("snap-1"), tmp_path), image, "snap-1")
