"""Real csnapd processes for end-to-end tests: started, read for their
address, killed with SIGKILL or stopped with SIGTERM.

A test need not stop what it started when it fails: tests/process_guard.py
kills and reaps every process a test left behind in its teardown, and a
test that passes with one still running fails. Here, a start that fails
and a stop that times out or is cancelled kill the process themselves.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import trio

from csnap_client import ServerError, find_server

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Daemon:
    """A running process and what it printed first."""

    process: trio.Process
    first_line: str
    log: Path

    async def kill(self) -> None:
        """SIGKILL: no cleanup at all, as a power cut or a crashed node."""
        self.process.send_signal(signal.SIGKILL)
        await self.process.wait()

    async def stop(self) -> int:
        """SIGTERM, then wait for the exit status (SIGKILL if that fails)."""
        self.process.send_signal(signal.SIGTERM)
        try:
            with trio.fail_after(30):
                return await self.process.wait()
        finally:
            if self.process.returncode is None:
                self.process.kill()
                with trio.CancelScope(shield=True):
                    await self.process.wait()


def _open_log(log: Path) -> BinaryIO:
    return open(log, "ab")


def tail(log: Path, size: int = 2000) -> str:
    """The end of a daemon's log, for a failure message."""
    return log.read_text(errors="replace")[-size:]


async def start(
    argv: list[str], log: Path, *, ready_timeout: float = 30, prefix: Sequence[str] = ()
) -> Daemon:
    """Start `python -m argv...` and wait for its first line on stdout.

    `prefix` runs it through another command (`ip netns exec NS`, say).
    """
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    err = _open_log(log)
    process = await trio.lowlevel.open_process(
        [*prefix, sys.executable, "-m", *argv], stdout=subprocess.PIPE, stderr=err, env=env
    )
    err.close()
    assert process.stdout is not None
    line = b""
    try:
        with trio.fail_after(ready_timeout):
            while not line.endswith(b"\n"):
                data = await process.stdout.receive_some(1)
                if not data:
                    raise RuntimeError(f"{argv[0]} exited before it was ready: {tail(log)}")
                line += data
    except BaseException:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
            await process.wait()
            await process.stdout.aclose()
        raise
    return Daemon(process, line.decode().strip(), log)


async def next_line(daemon: Daemon) -> str:
    """The next line a daemon prints after its first."""
    assert daemon.process.stdout is not None
    line = b""
    with trio.fail_after(30):
        while not line.endswith(b"\n"):
            data = await daemon.process.stdout.receive_some(1)
            if not data:
                raise AssertionError(f"exited: {tail(daemon.log)}")
            line += data
    return line.decode().strip()


async def start_csnapd(
    store: Path, origin: Path, log: Path, *extra: str
) -> tuple[Daemon, str, int]:
    """A csnapd on loopback; returns it with its host and port."""
    daemon = await start(["csnapd", str(store), str(origin), *extra], log)
    word, _, address = daemon.first_line.partition(" ")
    assert word == "listening", daemon.first_line
    host, _, port = address.rpartition(":")
    return daemon, host, int(port)


#: Lowest port this helper picks for a csnapd that is restarted.
_KEPT_PORT_LOW = 20000


def _below_ephemeral_ports() -> range:
    """Loopback ports no process gets by binding port 0 or connecting: those
    below the kernel's ephemeral range (net.ipv4.ip_local_port_range)."""
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        low = int(f.read().split()[0])
    if low <= _KEPT_PORT_LOW + 1000:
        raise RuntimeError(f"the ephemeral port range starts at {low}: no room below it")
    return range(_KEPT_PORT_LOW, low)


def kept_port() -> int:
    """A free loopback port below the ephemeral range, for a server that is
    killed and started again on the same port.

    While the server is down, another test's server binding port 0 cannot
    take this port, so the clients that reconnect meanwhile reach only this
    server (a server of another store would fail their TLS handshake).
    Another test may still pick the same port first: a start that finds it
    taken fails loudly ("cannot listen"), and start_csnapd_on_kept_port
    passes it over.
    """
    ports = _below_ephemeral_ports()
    for _ in range(100):
        port = random.choice(ports)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"100 ports in {ports} were taken")


async def start_csnapd_on_kept_port(
    store: Path, origin: Path, log: Path, *extra: str
) -> tuple[Daemon, str, int]:
    """A csnapd on a kept_port(), to kill and start again on that port."""
    for _ in range(20):
        port = kept_port()
        try:
            return await start_csnapd(store, origin, log, "--listen", f"127.0.0.1:{port}", *extra)
        except RuntimeError as exc:
            if "cannot listen" not in str(exc):
                raise
    raise RuntimeError("20 kept ports were taken before csnapd could listen on them")


async def start_agent(socket_path: Path, log: Path) -> Daemon:
    """A csnap-agent on a Unix socket."""
    daemon = await start(["csnap_agent", "--socket", str(socket_path)], log)
    assert daemon.first_line == f"listening unix:{socket_path}", daemon.first_line
    return daemon


async def csnap(agent: Path, *args: str, limit: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the csnap CLI against `agent`; returns its exit status and output."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with trio.fail_after(limit):
        result = await trio.run_process(
            [sys.executable, "-m", "csnap_agent.ctl", "--agent", str(agent), *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=env,
        )
    return subprocess.CompletedProcess(
        result.args, result.returncode, result.stdout.decode(), result.stderr.decode()
    )


async def poll(check: Callable[[], Awaitable[bool]], *, interval: float = 0.05) -> None:
    """Until `check()` is true: for state outside this process (logs, other daemons)."""
    while True:
        if await check():
            return
        await trio.sleep(interval)


async def start_csnapd_with_agent(
    store: Path, origin: Path, log: Path, agent: Path
) -> tuple[Daemon, str, int]:
    """A csnapd registered with `agent`, returned once the agent has started it."""
    daemon, host, port = await start_csnapd(store, origin, log, "--agent", str(agent))
    with trio.fail_after(30):
        await find_server(str(agent), wait=True)
    return daemon, host, port


async def agent_names(sock: Path, wanted: str) -> None:
    """Until the agent at `sock` names `wanted` as the active server's address."""
    while True:
        try:
            where: str | None = (await find_server(str(sock), wait=False)).address
        except (OSError, ServerError):
            where = None
        if where == wanted:
            return
        await trio.sleep(0.02)
