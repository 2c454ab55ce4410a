"""What the NBD gateway's end-to-end tests share: a store with a known origin,
csnapd and csnap-nbd started as real processes, the Debian NBD clients run
with a time limit, and csnapd's own answers to compare the gateway with.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pytest
import trio

from csnap_client import AdminClient, DataClient, open_admin, open_client
from csnap_format.mkcsnap import format_store
from tests.credentials import connector
from tests.e2e.processes import ROOT, Daemon, start_csnapd, tail

CHUNK = 4096
ORIGIN_SIZE = 16 << 20
#: Every external command gets this long before it is killed.
TOOL_TIMEOUT = 30.0


def need(*tools: str) -> None:
    """Skip a test whose client is not installed (fail instead under CI,
    where scripts/test installs them)."""
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        message = f"not installed: {', '.join(missing)} (apt-get install qemu-utils libnbd-bin)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def origin_image(seed: int = 1) -> bytes:
    """The origin's contents before any test writes: recognisable, not zero."""
    return random.Random(seed).randbytes(ORIGIN_SIZE)


async def run(
    *argv: str, seconds: float = TOOL_TIMEOUT, check: bool = True, stdin: bytes = b""
) -> subprocess.CompletedProcess[str]:
    """Run a client tool, killed after `seconds`."""
    with trio.fail_after(seconds):
        result = await trio.run_process(
            list(argv), capture_stdout=True, capture_stderr=True, check=False, stdin=stdin
        )
    completed = subprocess.CompletedProcess(
        result.args, result.returncode, result.stdout.decode(), result.stderr.decode()
    )
    if check and completed.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv)} exited {completed.returncode}:\n"
            f"{completed.stdout}\n{completed.stderr}"
        )
    return completed


@dataclass
class Gateway:
    """csnapd and csnap-nbd running over one store."""

    directory: Path
    store: Path
    origin: Path
    csnapd: Daemon
    csnapd_port: int
    nbd: Daemon
    nbd_log: Path
    #: nbd://127.0.0.1:PORT (nbds:// with --tls=require)
    tcp: str
    #: The gateway's Unix socket.
    socket: Path
    #: Its metrics endpoint's URL, when started with --metrics.
    metrics: str | None = None

    def url(self, export: str = "origin", *, unix: bool = False) -> str:
        if unix:
            return f"nbd+unix:///{export}?socket={self.socket}"
        return f"{self.tcp}/{export}"

    @property
    def port(self) -> int:
        return int(self.tcp.rpartition(":")[2])

    @asynccontextmanager
    async def admin(self) -> AsyncIterator[AdminClient]:
        async with open_admin(connector("127.0.0.1", self.csnapd_port, self.store)) as admin:
            yield admin

    @asynccontextmanager
    async def client(self, snapshot: int | None = None) -> AsyncIterator[DataClient]:
        async with open_client(
            connector("127.0.0.1", self.csnapd_port, self.store), snapshot=snapshot
        ) as client:
            yield client

    async def create(self, tag: int) -> None:
        async with self.admin() as admin:
            await admin.create_snapshot(tag)

    async def delete(self, tag: int) -> None:
        async with self.admin() as admin:
            await admin.delete_snapshot(tag)

    async def server_info(self) -> dict[str, object]:
        async with self.admin() as admin:
            return await admin.server_info()

    async def copied(self, snapshot: int | None) -> set[int]:
        """csnapd's own answer: chunks with store copies (query_map)."""
        chunks = ORIGIN_SIZE // CHUNK
        async with self.client(snapshot) as client:
            ranges = await client.copied_ranges([(0, min(chunks, client.max_chunks))])
        return {c for first, count in ranges for c in range(first, first + count)}

    def log(self) -> str:
        return tail(self.nbd_log, 4000)


def open_log(log: Path) -> BinaryIO:
    return open(log, "ab")


async def ready_lines(process: trio.Process, lines: int, what: str, log: Path) -> str:
    """The first `lines` lines `process` prints on stdout (it prints them when
    ready); killed and reaped if it exits first or takes over 30 s."""
    assert process.stdout is not None
    text = b""
    try:
        with trio.fail_after(30):
            while text.count(b"\n") < lines:
                data = await process.stdout.receive_some(4096)
                if not data:
                    raise RuntimeError(f"{what} exited before it was ready: {tail(log)}")
                text += data
    except BaseException:
        with trio.CancelScope(shield=True):
            process.kill()
            await process.wait()
            await process.stdout.aclose()
        raise
    return text.decode()


async def start_gateway(
    directory: Path, *extra: str, server: str | None = None, log_name: str = "nbd.log"
) -> tuple[Daemon, list[str]]:
    """`python -m csnap_nbd` on a free port and a Unix socket; returns it and
    the URLs it printed (it prints one line per listener, then flushes)."""
    log = directory / log_name
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    argv = [sys.executable, "-m", "csnap_nbd", *extra]
    if server is not None:
        argv += ["--server", server]
    err = open_log(log)
    process = await trio.lowlevel.open_process(argv, stdout=subprocess.PIPE, stderr=err, env=env)
    err.close()
    listeners = sum(1 for a in extra if a in ("--listen", "--unix")) or 1
    metrics = sum(1 for a in extra if a == "--metrics")
    text = await ready_lines(process, listeners + metrics, "csnap-nbd", log)
    urls = []
    for line in text.splitlines():
        word, _, url = line.partition(" ")
        assert word in ("listening", "metrics"), line
        # The metrics URL comes last (Gateway.metrics).
        urls.append(url if word == "listening" else f"metrics {url}")
    return Daemon(process, urls[0], log), urls


@asynccontextmanager
async def gateway(
    directory: Path,
    *extra: str,
    image: bytes | None = None,
    csnapd_args: Sequence[str] = (),
    origin_size: int = ORIGIN_SIZE,
    store_size: int = 64 << 20,
    journal_size: int | None = None,
    max_store_size: int | None = None,
) -> AsyncIterator[Gateway]:
    """A fresh store whose origin holds `image`, served by csnapd and csnap-nbd."""
    store, origin = directory / "store.img", directory / "origin.img"
    format_store(
        str(store),
        str(origin),
        store_size=store_size,
        origin_size=origin_size,
        journal_size=journal_size,
        max_store_size=max_store_size,
        progress=False,
    )
    if image is not None or origin_size == ORIGIN_SIZE:
        origin.write_bytes(origin_image() if image is None else image)
    csnapd, _, port = await start_csnapd(store, origin, directory / "csnapd.log", *csnapd_args)
    socket_path = directory / "nbd.sock"
    nbd = None
    running: Gateway | None = None
    try:
        nbd, urls = await start_gateway(
            directory,
            "--listen",
            "127.0.0.1:0",
            "--unix",
            str(socket_path),
            "--origin",
            str(origin),
            "--store",
            str(store),
            *extra,
            server=f"127.0.0.1:{port}",
        )
        tcp = next(u for u in urls if u.startswith(("nbd://", "nbds://")))
        metrics = next((u.split(" ", 1)[1] for u in urls if u.startswith("metrics ")), None)
        running = Gateway(
            directory,
            store,
            origin,
            csnapd,
            port,
            nbd,
            directory / "nbd.log",
            tcp,
            socket_path,
            metrics,
        )
        yield running
    finally:
        with trio.CancelScope(shield=True):
            if nbd is not None:
                await stop(nbd)
            await stop(running.csnapd if running is not None else csnapd)


async def csnap_check(store: Path) -> None:
    """`csnap-check` on a store no csnapd has open: it must find nothing wrong."""
    result = await run(sys.executable, "-m", "csnapd.check_cli", str(store), check=False)
    if result.returncode != 0:
        raise AssertionError(f"csnap-check exited {result.returncode}: {result.stdout[-3000:]}")


async def stop(daemon: Daemon) -> int:
    """SIGTERM, wait (bounded), SIGKILL if it would not go; the exit status."""
    if daemon.process.returncode is not None:
        return daemon.process.returncode
    daemon.process.send_signal(signal.SIGTERM)
    with trio.move_on_after(20):
        return await daemon.process.wait()
    daemon.process.kill()
    await daemon.process.wait()
    raise AssertionError(f"{daemon.first_line}: did not stop on SIGTERM: {tail(daemon.log)}")


async def nbdcopy_to_bytes(url: str, directory: Path, name: str = "copy.raw") -> bytes:
    """The whole export, copied with nbdcopy (several connections if multi-conn)."""
    target = directory / name
    target.unlink(missing_ok=True)
    await run("nbdcopy", url, str(target))
    return target.read_bytes()


def qemu_io(url: str, *commands: str, read_only: bool = False) -> list[str]:
    """qemu-io argv running `commands` against `url` as a raw image."""
    argv = ["qemu-io", "-f", "raw"]
    if read_only:
        argv.append("-r")
    for command in commands:
        argv += ["-c", command]
    return [*argv, url]


def chunks_of(ranges: Sequence[tuple[int, int]]) -> set[int]:
    """Byte ranges (offset, length) -> the chunks they touch."""
    return {c for off, n in ranges for c in range(off // CHUNK, (off + n - 1) // CHUNK + 1)}


async def mapped_chunks(url: str, context: str) -> set[int]:
    """The chunks nbdinfo's map of metadata `context` on the export at `url`
    marks (type 1), after checking that the map covers the export exactly,
    in whole chunks."""
    out = await run("nbdinfo", f"--map={context}", "--json", url)
    chunks: set[int] = set()
    covered = 0
    for extent in json.loads(out.stdout):
        assert extent["offset"] == covered
        covered += extent["length"]
        if extent["type"] == 1:
            assert extent["offset"] % CHUNK == 0 and extent["length"] % CHUNK == 0
            chunks |= chunks_of([(extent["offset"], extent["length"])])
        else:
            assert extent["type"] == 0
    assert covered == ORIGIN_SIZE
    return chunks
