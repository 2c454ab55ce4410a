"""What the operations tests share: a datagram socket standing in for
systemd's notification socket, services started as real processes with a
chosen environment, and a small store to serve.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import trio

from csnap_format.mkcsnap import format_store
from tests.e2e.processes import ROOT, tail

#: Seconds any one wait of these tests may take before it fails.
LIMIT = 30.0


def make_store(directory: Path) -> tuple[Path, Path]:
    """A 64 MiB store for a 16 MiB origin."""
    store, origin = directory / "store", directory / "origin"
    format_store(str(store), str(origin), store_size=64 << 20, origin_size=16 << 20)
    return store, origin


@dataclass(eq=False)
class NotifySocket:
    """The receiving end of $NOTIFY_SOCKET: every datagram, parsed, in order.

    Read all the time, as a service manager does (a full queue would hold
    the sender up); see listening().
    """

    #: What to put in $NOTIFY_SOCKET.
    name: str
    messages: list[dict[str, str]] = field(default_factory=list)
    _arrived: trio.Event = field(default_factory=trio.Event)
    _read: int = 0

    async def _drain(self, sock: trio.socket.SocketType) -> None:
        while True:
            data = await sock.recv(65536)
            self.messages.append(dict(line.split("=", 1) for line in data.decode().splitlines()))
            self._arrived.set()
            self._arrived = trio.Event()

    async def until(self, key: str, limit: float = LIMIT) -> dict[str, str]:
        """The next message, after those until() returned or passed, that sets `key`."""
        with trio.fail_after(limit):
            while True:
                while self._read < len(self.messages):
                    fields = self.messages[self._read]
                    self._read += 1
                    if key in fields:
                        return fields
                await self._arrived.wait()

    def sent(self, key: str) -> list[dict[str, str]]:
        """Messages received so far that set `key`."""
        return [m for m in self.messages if key in m]


@asynccontextmanager
async def listening(name: str) -> AsyncIterator[NotifySocket]:
    """A notification socket bound at `name` (a path, or "@name" in the
    abstract namespace), read until the block ends."""
    notify = NotifySocket(name)
    with trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        await sock.bind("\0" + name[1:] if name.startswith("@") else name)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(notify._drain, sock)
            yield notify
            nursery.cancel_scope.cancel()


@dataclass(eq=False)
class Service:
    """A csnap service started as `python -m module ...`."""

    process: trio.Process
    log: Path

    async def first_line(self) -> str:
        """Its first line on stdout ("listening ...")."""
        assert self.process.stdout is not None
        line = b""
        with trio.fail_after(LIMIT):
            while not line.endswith(b"\n"):
                data = await self.process.stdout.receive_some(1)
                assert data, f"exited before it printed a line: {tail(self.log)}"
                line += data
        return line.decode().strip()

    async def terminate(self) -> int:
        """SIGTERM, then its exit status."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        with trio.fail_after(LIMIT):
            return await self.process.wait()

    def kill(self) -> None:
        if self.process.returncode is None:
            self.process.kill()


#: What a service manager passes; only what a test sets reaches the service.
MANAGER_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID")


@asynccontextmanager
async def running(argv: list[str], log: Path, **environ: str) -> AsyncIterator[Service]:
    """`python -m argv...` with these variables added, killed if still running at the end."""
    inherited = {k: v for k, v in os.environ.items() if k not in MANAGER_VARIABLES}
    env = {**inherited, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", **environ}
    with log.open("ab") as err:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", *argv], stdout=subprocess.PIPE, stderr=err, env=env
        )
    service = Service(process, log)
    try:
        yield service
    finally:
        with trio.CancelScope(shield=True):
            service.kill()
            await process.wait()
