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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Etcd:
    """A running single-member etcd."""

    daemon: Daemon
    url: str


async def _healthy(url: str) -> bool:
    try:
        async with httpx.AsyncClient(timeout=1) as http:
            response = await http.post(url + "/v3/kv/range", json={"key": "Lw=="})
    except httpx.HTTPError:
        return False
    return response.status_code == 200


@asynccontextmanager
async def running_etcd(directory: Path) -> AsyncIterator[Etcd]:
    """etcd listening on loopback with its data in `directory`; killed at the end."""
    binary = shutil.which("etcd")
    if binary is None:
        pytest.fail("etcd is not installed: scripts/test installs the Debian package etcd-server")
    client, peer = _free_port(), _free_port()
    url = f"http://127.0.0.1:{client}"
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
        f"http://127.0.0.1:{peer}",
        "--initial-advertise-peer-urls",
        f"http://127.0.0.1:{peer}",
        "--initial-cluster",
        f"test=http://127.0.0.1:{peer}",
    ]
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
                await trio.sleep(0.1)
        yield Etcd(daemon, url)
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                await daemon.kill()
