"""A real etcd for tests: Debian's etcd-server, on free loopback ports, in a
temporary directory, started and stopped by the test. Without the etcd
binary the test fails (scripts/test installs etcd-server).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trio

from tests.e2e.processes import Daemon, _open_log, tail


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Etcd:
    """A running single-member etcd."""

    daemon: Daemon
    url: str
    argv: list[str]

    async def restart(self, down: float) -> None:
        """SIGKILL it, wait `down` seconds, start it again on its data; until healthy."""
        await self.daemon.kill()
        await trio.sleep(down)
        self.daemon = await _launch(self.argv, self.daemon.log, self.url)


async def _launch(argv: list[str], log: Path, url: str) -> Daemon:
    err = _open_log(log)
    try:
        process = await trio.lowlevel.open_process(argv, stdout=subprocess.DEVNULL, stderr=err)
    finally:
        err.close()
    daemon = Daemon(process, "", log)
    try:
        with trio.fail_after(20):
            while not await _healthy(url):
                if process.returncode is not None:
                    raise RuntimeError(f"etcd exited: {tail(log)}")
                await trio.sleep(0.05)
    except BaseException:
        with trio.CancelScope(shield=True):
            await daemon.kill()
        raise
    return daemon


async def _healthy(url: str) -> bool:
    try:
        async with httpx.AsyncClient(timeout=1, trust_env=False) as http:
            response = await http.post(url + "/v3/kv/range", json={"key": "Lw=="})
    except httpx.HTTPError:
        return False
    return response.status_code == 200


@asynccontextmanager
async def running_etcd(directory: Path, host: str = "127.0.0.1") -> AsyncIterator[Etcd]:
    """etcd listening on `host` (loopback, or an address the test owns) with its
    data in `directory`; killed at the end."""
    binary = shutil.which("etcd")
    if binary is None:
        pytest.fail("etcd is not installed: scripts/test installs the Debian package etcd-server")
    client, peer = _free_port(host), _free_port(host)
    url = f"http://{host}:{client}"
    log = directory / "etcd.log"
    argv = [
        binary,
        "--name",
        "test",
        "--data-dir",
        str(directory / "etcd.data"),
        "--listen-client-urls",
        url,
        "--advertise-client-urls",
        url,
        "--listen-peer-urls",
        f"http://{host}:{peer}",
        "--initial-advertise-peer-urls",
        f"http://{host}:{peer}",
        "--initial-cluster",
        f"test=http://{host}:{peer}",
    ]
    etcd = Etcd(await _launch(argv, log, url), url, argv)
    try:
        yield etcd
    finally:
        with trio.CancelScope(shield=True):
            if etcd.daemon.process.returncode is None:
                await etcd.daemon.kill()
