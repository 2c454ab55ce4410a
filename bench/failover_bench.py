"""Failover: from SIGKILL of the active csnapd to the first origin write a
client is granted by the server elected after it.

Two nodes on loopback, each an agent electing through one real etcd (Debian's
etcd-server) with a 2 s lease, and a csnapd candidate registered with it. An
origin client on each node asks its own agent for the server and writes one
new chunk after another (every write copies its chunk out, since a snapshot
exists). Each round:
  1. both clients are writing; the active csnapd gets SIGKILL;
  2. the clients reconnect through their agents, which learn the new server
     from etcd; the time from the kill to the first write granted after it,
     per client, is the failover time;
  3. a new candidate is started on the node that lost its server, so that
     the next round has a standby again.
At the end both servers stop and csnap-check must find the store clean.
Figures: every client's failover time, and their median and maximum.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import httpx
import trio

from bench.common import Part, console_script, listening, median, progress, stop, table
from csnap_client import (
    ClientClosedError,
    ConnectionLostError,
    ServerError,
    agent_admin_connector,
    agent_store_connector,
    find_server,
    open_admin,
    open_client,
)
from csnap_format import decode_superblock
from csnap_format.mkcsnap import format_store

TTL = 2
NODES = 2


def token_of(store: Path) -> int:
    """The fencing token the store carries: the active server's."""
    with open(store, "rb") as f:
        return decode_superblock(f.read(4096)).fence_token


@dataclass(frozen=True)
class Plan:
    rounds: int


QUICK = Plan(rounds=1)
#: scripts/torture failover turns this up.
FULL = Plan(rounds=int(os.environ.get("CSNAP_FAILOVER_ROUNDS", "20")))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@asynccontextmanager
async def etcd(directory: Path) -> Any:
    """A single-member etcd on loopback; its client URL."""
    binary = shutil.which("etcd")
    if binary is None:
        raise RuntimeError("etcd is not installed (Debian package etcd-server)")
    client, peer = _free_port(), _free_port()
    url, peer_url = f"http://127.0.0.1:{client}", f"http://127.0.0.1:{peer}"
    argv = [
        binary,
        "--name=bench",
        f"--data-dir={directory / 'etcd.data'}",
        f"--listen-client-urls={url}",
        f"--advertise-client-urls={url}",
        f"--listen-peer-urls={peer_url}",
        f"--initial-advertise-peer-urls={peer_url}",
        f"--initial-cluster=bench={peer_url}",
    ]
    with _log_file(directory / "etcd.log") as err:
        process = await trio.lowlevel.open_process(argv, stdout=subprocess.DEVNULL, stderr=err)
    try:
        async with httpx.AsyncClient(timeout=1, trust_env=False) as http:
            with trio.fail_after(30):
                while True:
                    with suppress(httpx.HTTPError):
                        answer = await http.post(url + "/v3/kv/range", json={"key": "Lw=="})
                        if answer.status_code == 200:
                            break
                    await trio.sleep(0.05)
        yield url
    finally:
        await stop(process, sig=signal.SIGKILL)


def _log_file(path: Path) -> BinaryIO:
    return open(path, "ab")


@dataclass
class Writer:
    """An origin client on one node, writing a new chunk after another."""

    node: int
    next_chunk: int
    #: When each write was granted, and the fencing token of the server that granted it.
    granted: list[tuple[float, int]] = field(default_factory=list)
    #: Set (and replaced) at every grant.
    moved: trio.Event = field(default_factory=trio.Event)

    def grant(self, token: int) -> None:
        self.granted.append((time.monotonic(), token))
        self.moved.set()
        self.moved = trio.Event()

    async def granted_by_another(self, instant: float, token: int) -> float:
        """When the first write after `instant` was granted by a server other
        than the one with `token` (a reply the killed server sent before it
        died may arrive after `instant`)."""
        while True:
            for when, by in self.granted:
                if when > instant and by != token:
                    return when
            await self.moved.wait()

    @property
    def token(self) -> int:
        """The token of the server that granted the last write."""
        return self.granted[-1][1]


async def keep_writing(sock: Path, writer: Writer, stride: int, last: int) -> None:
    """Write chunk after chunk (starting over at the end) until cancelled."""
    async with open_client(agent_store_connector(str(sock))) as client:
        while True:
            chunk = writer.next_chunk
            with suppress(ServerError, ConnectionLostError, ClientClosedError, OSError):
                async with client.origin_write([(chunk, 1)]):
                    writer.grant(client.token)
                writer.next_chunk = (chunk + stride) % last
            await trio.sleep(0.005)


async def _failover(directory: Path, plan: Plan) -> dict[str, Any]:
    store, origin = directory / "store", directory / "origin"
    format_store(str(store), str(origin), store_size=256 << 20, origin_size=64 << 20)
    socks = [directory / f"node{n}.sock" for n in range(NODES)]
    times: list[float] = []
    async with etcd(directory) as url, AsyncExitStack() as stack:
        for n, sock in enumerate(socks):
            argv = [
                sys.executable,
                "-m",
                "csnap_agent",
                f"--socket={sock}",
                f"--etcd-endpoints={url}",
                f"--node=node{n}",
                f"--lease-ttl={TTL}",
            ]
            await stack.enter_async_context(listening(argv, directory / f"agent{n}.log"))
        #: Each node's running candidate and the address it listens on.
        servers: dict[int, tuple[trio.Process, str]] = {}
        starts = 0

        async def candidate(node: int) -> None:
            nonlocal starts
            starts += 1
            argv = [sys.executable, "-m", "csnapd", str(store), str(origin)]
            argv += ["--listen", "127.0.0.1:0", "--agent", str(socks[node])]
            log = directory / f"csnapd{starts}.log"
            started = await stack.enter_async_context(listening(argv, log))
            servers[node] = (started.process, started.said)

        for node in range(NODES):
            await candidate(node)
        async with open_admin(agent_admin_connector(str(socks[0]))) as admin:
            await admin.create_snapshot(1)
        chunks = 64 << 20 >> 12
        writers = [Writer(n, n) for n in range(NODES)]
        async with trio.open_nursery() as nursery:
            for writer in writers:
                nursery.start_soon(keep_writing, socks[writer.node], writer, NODES, chunks)
            for number in range(plan.rounds):
                with trio.fail_after(30):
                    where = await find_server(str(socks[0]), wait=True)
                    for writer in writers:
                        await writer.granted_by_another(0.0, -1)
                active = next(n for n, (_, address) in servers.items() if address == where.address)
                await trio.sleep(0.2)  # writing steadily
                # Both write through the active server now.
                with trio.fail_after(30):
                    for writer in writers:
                        while writer.token != token_of(store):
                            await writer.moved.wait()
                old = token_of(store)
                killed = time.monotonic()
                process = servers[active][0]
                process.send_signal(signal.SIGKILL)
                await process.wait()
                with trio.fail_after(30):
                    round_times = [
                        await w.granted_by_another(killed, old) - killed for w in writers
                    ]
                times += round_times
                progress(
                    f"failover round {number + 1}/{plan.rounds}: "
                    + ", ".join(f"{t:.2f} s" for t in round_times)
                )
                await candidate(active)
            nursery.cancel_scope.cancel()
    check = await trio.run_process(
        [*console_script("csnap-check"), str(store)], capture_stdout=True, check=False
    )
    return {"times": times, "check_clean": check.returncode == 0}


def failover_part(directory: Path, *, quick: bool) -> Part:
    plan = QUICK if quick else FULL
    run = trio.run(_failover, directory, plan)
    times = run["times"]
    figures = {
        "rounds": plan.rounds,
        "lease_ttl_s": TTL,
        "clients": NODES,
        "failover_s": times,
        "failover_median_s": median(times),
        "failover_max_s": max(times),
        "check_clean": run["check_clean"],
    }
    rows = [[f"{TTL} s", len(times), f"{median(times):.2f}", f"{max(times):.2f}"]]
    progress(
        f"failover: {plan.rounds} kills of the active csnapd, {len(times)} client failovers,"
        f" median {median(times):.2f} s, max {max(times):.2f} s,"
        f" csnap-check {'clean' if run['check_clean'] else 'NOT CLEAN'}"
    )
    return Part(
        figures,
        table(
            ["lease", "failovers", "median s", "max s"],
            rows,
            notes=["kill -9 of the active csnapd to the first origin write granted after it"],
        ),
    )
