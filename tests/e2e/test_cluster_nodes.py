"""Three nodes as hosts (docs/operations.md, "Running a cluster"): network
namespaces on a bridge that carries a real etcd, each node running an
agent, a csnapd candidate and a csnap-nbd gateway, with qemu-io and
nbdcopy run inside the namespaces as each node's NBD clients.

1. Writers on every node write patterns to the origin through their own
   gateway, each recording what was acknowledged, while snapshots are
   created; the active server's whole node is killed with SIGKILL (agent,
   csnapd, gateway, its writer). A standby on another node serves; every
   acknowledged write is in the origin and every snapshot reads what the
   origin held when it was created.
2. A gateway is stopped (SIGSTOP) while it holds snapshot read locks: an
   origin write from another node over the locked chunks goes through once
   csnapd's lease drops the silent gateway, and the gateway, continued,
   returns no stale snapshot data (its reads fail or are right).

The store passes csnap-check at the end. Runs as root (it creates
namespaces) and fails, never skips, without it.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

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
from csnap_common.credentials import make_credentials, store_credentials
from tests.e2e.etcd import Etcd, running_etcd
from tests.e2e.namespaces import Host, hosts, inside, kill_host, start_agent_in, start_candidate_in
from tests.e2e.processes import ROOT, Daemon, agent_names, next_line, start, tail
from tests.e2e.test_agent import make, store_is_clean
from tests.e2e.test_cluster import TTL, token_of
from tests.e2e.test_failover import reaped
from tests.nbd.support import qemu_io, run
from tests.ops.metrics_support import scrape

pytestmark = pytest.mark.e2e

ORIGIN_SIZE = 16 << 20
#: Each writer writes whole slots, each slot once.
SLOT = 16 << 10
#: Slots below this are phase 1's; the rest of the origin is phase 2's.
PHASE1_END = 12 << 20
SLOTS = PHASE1_END // SLOT
NODES = 3
#: csnapd's lease for silent data-path clients (--lease), seconds.
LEASE = 2.0
CHUNK = 4096


@dataclass
class Node:
    """A namespace with its agent, its csnapd candidate and its gateway."""

    name: str
    host: Host
    sock: Path
    agent: Daemon
    server: Daemon
    address: str
    metrics: str
    nbd: Daemon
    #: nbd://127.0.0.1:PORT: the gateway, reached from inside the node only.
    url: str
    #: False once the whole node is killed: its writer stops.
    alive: bool = True

    def inside(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.host.namespace, *argv]


async def start_node(
    etcd: Etcd, tmp: Path, host: Host, name: str, store: Path, origin: Path, daemons: list[Daemon]
) -> Node:
    sock = tmp / f"{name}.sock"
    agent = await start_agent_in(host, etcd.url, sock, name, TTL, tmp / f"{name}-agent.log")
    daemons.append(agent)
    server = await start_candidate_in(
        host, sock, store, origin, tmp / f"{name}-csnapd.log",
        # Bounds the wait for a dead node's snapshot clients after a failover.
        ["--metrics", f"{host.address}:0", "--lease", str(LEASE), "--grace", "10"],
    )  # fmt: skip
    daemons.append(server)
    address = server.first_line.partition(" ")[2]
    metrics = (await next_line(server)).split(" ", 1)[1]
    nbd = await start(
        ["csnap_nbd", "--agent", str(sock), "--listen", "127.0.0.1:0"],
        tmp / f"{name}-nbd.log",
        prefix=inside(host),
    )
    daemons.append(nbd)
    word, _, url = nbd.first_line.partition(" ")
    assert word == "listening", nbd.first_line
    return Node(name, host, sock, agent, server, address, metrics, nbd, url)


@asynccontextmanager
async def three_nodes(tmp: Path) -> AsyncIterator[tuple[list[Node], Path, Path, bytes]]:
    store, origin = make(tmp)
    image = random.Random(15).randbytes(ORIGIN_SIZE)
    origin.write_bytes(image)
    make_credentials(store_credentials(store))
    with hosts(NODES) as (bridge_address, made):
        async with running_etcd(tmp, bridge_address) as etcd, reaped() as daemons:
            nodes = [
                await start_node(etcd, tmp, host, f"n{i}", store, origin, daemons)
                for i, host in enumerate(made)
            ]
            yield nodes, store, origin, image


@dataclass
class Write:
    slot: int
    pattern: int
    started: float
    ended: float = 0.0
    acknowledged: bool = False


@dataclass
class Snapshot:
    tag: int
    started: float
    ended: float


@dataclass
class Writers:
    writes: list[Write] = field(default_factory=list)
    stop: bool = False


def pattern_of(slot: int) -> int:
    return slot % 251 + 1


async def keep_writing(node: Node, writers: Writers) -> None:
    """Write this node's slots in turn, one qemu-io each, until told to stop,
    the node dies or the slots run out."""
    for slot in range(int(node.name[1:]), SLOTS, NODES):
        if writers.stop or not node.alive:
            return
        write = Write(slot, pattern_of(slot), trio.current_time())
        writers.writes.append(write)
        done = await run(
            *node.inside(
                *qemu_io(f"{node.url}/origin", f"write -P {write.pattern} {slot * SLOT} {SLOT}")
            ),
            check=False,
        )
        write.ended = trio.current_time()
        write.acknowledged = done.returncode == 0 and "wrote" in done.stdout
        if not write.acknowledged and node.alive:
            raise AssertionError(f"a write on a live node failed: {done.stdout}{done.stderr}")


async def create(node: Node, tag: int) -> Snapshot:
    started = trio.current_time()
    with trio.fail_after(20):
        async with open_admin(agent_admin_connector(str(node.sock))) as admin:
            await admin.create_snapshot(tag)
    return Snapshot(tag, started, trio.current_time())


async def first_granted_write(node: Node, old_token: int, slot: int) -> tuple[float, int]:
    """When an origin write through `node`'s agent was first granted by a
    server with a token newer than `old_token`; and that token. (Until the
    new server is elected, connecting fails: try again.)"""
    with trio.fail_after(30):
        while True:
            with suppress(ServerError, ConnectionLostError, ClientClosedError, OSError):
                async with open_client(agent_store_connector(str(node.sock))) as client:
                    while True:
                        async with client.origin_write([(slot * SLOT // CHUNK, 1)]):
                            granted = trio.current_time()
                        if client.token > old_token:
                            return granted, client.token
                        await trio.sleep(0.01)
            await trio.sleep(0.02)


def slot_bytes(image: bytes, slot: int) -> bytes:
    return image[slot * SLOT : (slot + 1) * SLOT]


def check_snapshot(read: bytes, image: bytes, writes: list[Write], snapshot: Snapshot) -> None:
    """The snapshot holds each slot as the origin held it at the create:
    written if acknowledged before the create began, as before if the write
    began after it ended, either otherwise."""
    by_slot = {w.slot: w for w in writes}
    for slot in range(ORIGIN_SIZE // SLOT):
        got = slot_bytes(read, slot)
        old = slot_bytes(image, slot)
        write = by_slot.get(slot)
        if write is None:
            assert got == old, (snapshot.tag, slot)
            continue
        new = bytes([write.pattern]) * SLOT
        if write.acknowledged and write.ended < snapshot.started:
            assert got == new, (snapshot.tag, slot, "lost an acknowledged write")
        elif write.started > snapshot.ended:
            assert got == old, (snapshot.tag, slot, "holds a later write")
        else:
            assert got in (old, new), (snapshot.tag, slot)


async def serving(nodes: list[Node]) -> Node:
    """The node whose csnapd the agents name as active."""
    with trio.fail_after(15):
        address = (await find_server(str(nodes[0].sock), wait=True)).address
    return next(n for n in nodes if n.address == address)


async def stop_holding_locks(hung: Node, server: Node) -> float:
    """SIGSTOP `hung`'s gateway at a moment it holds read locks (csnapd counts
    some); when it was stopped."""
    for _ in range(100):
        hung.nbd.process.send_signal(signal.SIGSTOP)
        stopped = trio.current_time()
        # Whatever it sent before it stopped has reached csnapd by now.
        await trio.sleep(0.1)
        if (await scrape(server.metrics)).value("csnapd_read_locks") > 0:
            return stopped
        hung.nbd.process.send_signal(signal.SIGCONT)
        await trio.sleep(0.02)
    raise AssertionError("the gateway never held a read lock when stopped")


async def nbd_image(node: Node, export: str, into: Path) -> bytes:
    await run(*node.inside("nbdcopy", f"{node.url}/{export}", str(into)), seconds=30)
    return await trio.Path(into).read_bytes()


async def hang_a_node(hung: Node, server_node: Node, origin: Path, store: Path) -> None:
    """Phase 2: `hung`'s data path stops holding read locks; writes from
    `server_node` wait out the lease; continued, `hung` returns nothing stale."""
    region = f"{PHASE1_END} {ORIGIN_SIZE - PHASE1_END}"
    await run(*server_node.inside(*qemu_io(f"{server_node.url}/origin", f"write -P 0x33 {region}")))
    await create(server_node, 4)
    reads = [f"read -P 0x33 {at} {CHUNK}" for at in range(PHASE1_END, ORIGIN_SIZE, CHUNK)]
    gateway_reader = await trio.lowlevel.open_process(
        hung.inside(*qemu_io(f"{hung.url}/snap-4", *reads, *reads, read_only=True)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    # A data-path client of the same node that stops itself holding a
    # read lock on chunk `locked`, its origin read not yet done.
    locked = PHASE1_END // CHUNK + 5
    host, _, port = server_node.address.rpartition(":")
    argv = [sys.executable, "-m", "tests.e2e.stopped_reader", host, port, "4", str(locked)]
    lock_holder = await trio.lowlevel.open_process(
        hung.inside("env", f"PYTHONPATH={ROOT}", *argv, str(origin), str(store)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    said = {gateway_reader: bytearray(), lock_holder: bytearray()}
    is_locked = trio.Event()

    async def collect(process: trio.Process) -> None:
        assert process.stdout is not None
        while data := await process.stdout.receive_some(65536):
            said[process].extend(data)
            if b"locked" in said[lock_holder]:
                is_locked.set()

    async with trio.open_nursery() as nursery:
        for process in said:
            nursery.start_soon(collect, process)
        with trio.fail_after(30):
            await is_locked.wait()
        # The whole data path of the node hangs: its gateway too, mid-reads.
        hung.nbd.process.send_signal(signal.SIGSTOP)
        stopped = trio.current_time()
        try:
            assert gateway_reader.returncode is None, "the gateway's reads ended too soon"
            assert (await scrape(server_node.metrics)).value("csnapd_read_locks") > 0
            overwrite = qemu_io(f"{server_node.url}/origin", f"write -P 0x77 {region}")
            await run(*server_node.inside(*overwrite))
            waited = trio.current_time() - stopped
            print(f"origin write over a hung node's read locks: {waited:.2f}s (lease {LEASE}s)")
            assert waited >= LEASE / 2, "the write did not wait for the locks"
            assert waited < LEASE + 10
        finally:
            hung.nbd.process.send_signal(signal.SIGCONT)
            lock_holder.send_signal(signal.SIGCONT)
        with trio.fail_after(30):
            await gateway_reader.wait()
            await lock_holder.wait()
    text = said[gateway_reader].decode(errors="replace")
    assert "Pattern verification failed" not in text, text[-2000:]
    failed = text.count("read failed")
    print(f"the hung gateway, continued: {2 * len(reads) - failed} reads right, {failed} failed")
    # The hung client read again or gave up; never the new origin data.
    out = said[lock_holder].decode(errors="replace")
    assert out.split()[-2:] == ["read", "33" * 16] or "gave up" in out, out
    print(f"the hung client, continued: {' / '.join(out.splitlines())}")
    # The gateway serves the snapshot, and the origin, rightly from then on.
    snap4 = qemu_io(f"{hung.url}/snap-4", f"read -P 0x33 {region}", read_only=True)
    await run(*hung.inside(*snap4))
    now = qemu_io(f"{hung.url}/origin", f"read -P 0x77 {region}", read_only=True)
    await run(*hung.inside(*now))


async def test_three_nodes_survive_a_whole_node_kill_and_a_hung_gateway(tmp_path: Path) -> None:
    async with three_nodes(tmp_path) as (nodes, store, origin, image):
        with trio.fail_after(15):
            first = (await find_server(str(nodes[0].sock), wait=True)).address
            for node in nodes:
                await agent_names(node.sock, first)
        active = next(n for n in nodes if n.address == first)
        others = [n for n in nodes if n is not active]
        token = token_of(store)
        snapshots = [await create(others[0], 1)]

        # -- phase 1: the active server's whole node dies under load --------
        writers = Writers()
        async with trio.open_nursery() as nursery:
            for node in nodes:
                nursery.start_soon(keep_writing, node, writers)
            await trio.sleep(1.0)
            snapshots.append(await create(others[1], 2))
            await trio.sleep(0.7)
            active.alive = False
            killed = trio.current_time()
            assert len(kill_host(active.host)) >= 3
            granted, new_token = await first_granted_write(others[0], token, SLOTS - 1)
            print(
                f"whole-node kill to the first write granted by a standby: {granted - killed:.2f}s"
            )
            assert granted - killed < 10 * TTL
            assert new_token > token
            survivor = await serving(others)
            await trio.sleep(0.7)
            snapshots.append(await create(survivor, 3))
            await trio.sleep(0.7)
            writers.stop = True
        assert token_of(store) == new_token
        acknowledged = [w for w in writers.writes if w.acknowledged]
        on_survivors = {w.slot % NODES for w in acknowledged if w.started > granted}
        print(f"writes: {len(writers.writes)}, acknowledged {len(acknowledged)}")
        assert len(on_survivors) == 2, "both surviving nodes wrote after the failover"

        now = origin.read_bytes()
        for write in writers.writes:
            got = slot_bytes(now, write.slot)
            new = bytes([write.pattern]) * SLOT
            if write.acknowledged:
                assert got == new, (write.slot, "an acknowledged write is lost")
            else:
                assert got in (new, slot_bytes(image, write.slot)), write.slot
        # Read on both surviving nodes.
        for number, snapshot in enumerate(snapshots):
            into = tmp_path / f"snap{snapshot.tag}.raw"
            read = await nbd_image(others[number % 2], f"snap-{snapshot.tag}", into)
            check_snapshot(read, image, writers.writes, snapshot)

        # -- phase 2: a node's data path hung while it holds read locks -----
        server_node = await serving(others)
        hung = next(n for n in others if n is not server_node)
        await hang_a_node(hung, server_node, origin, store)

        for node in others:
            node.nbd.process.send_signal(signal.SIGTERM)
        for node in others:
            with trio.fail_after(20):
                assert await node.nbd.process.wait() == 0, tail(node.nbd.log)
        assert await server_node.server.stop() == 0
        for node in others:
            assert await node.agent.stop() == 0
    assert store_is_clean(store)
