"""The cluster through a real etcd (docs/operations.md, "Running a cluster"):
agents on two nodes (each its own socket and node name, on loopback), a
csnapd candidate on each, one election, and failover when the active
server, or its whole agent, is killed with SIGKILL, or the server hangs; an
NBD gateway on the standby's node carries on through the failover.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from csnap_client import (
    DataClient,
    ServerError,
    agent_store_connector,
    find_server,
    open_client,
)
from csnap_common.credentials import ROLE_CLIENT
from csnap_common.errors import single_errors
from csnap_format import decode_superblock
from csnap_protocol import ErrorCode
from tests.credentials import connector
from tests.e2e.etcd import Etcd, running_etcd
from tests.e2e.processes import Daemon, agent_names, csnap, poll, start, start_csnapd, tail
from tests.e2e.test_agent import make, store_is_clean
from tests.e2e.test_failover import reaped
from tests.nbd.support import qemu_io, run, start_gateway
from tests.ops.metrics_support import metrics_url, scrape_until
from tests.server.support import label, pread, pwrite

pytestmark = pytest.mark.e2e

#: The lease, in seconds, the tests' agents elect under: etcd's smallest.
TTL = 2


@dataclass
class Node:
    """One node: its agent and its csnapd candidate."""

    name: str
    sock: Path
    agent: Daemon
    server: Daemon
    address: str


async def start_cluster_agent(
    etcd: Etcd, sock: Path, log: Path, node: str, ttl: int = TTL
) -> Daemon:
    daemon = await start(
        [
            "csnap_agent",
            "--socket",
            str(sock),
            "--etcd-endpoints",
            etcd.url,
            "--node",
            node,
            "--lease-ttl",
            str(ttl),
            "--log-format",
            "json",
        ],
        log,
    )
    assert daemon.first_line == f"listening unix:{sock}", daemon.first_line
    return daemon


async def start_node(
    etcd: Etcd,
    tmp: Path,
    name: str,
    store: Path,
    origin: Path,
    daemons: list[Daemon],
    ttl: int = TTL,
) -> Node:
    sock = tmp / f"{name}.sock"
    agent = await start_cluster_agent(etcd, sock, tmp / f"{name}-agent.log", name, ttl)
    daemons.append(agent)
    server, host, port = await start_csnapd(
        store, origin, tmp / f"{name}-csnapd.log", "--agent", str(sock)
    )
    daemons.append(server)
    return Node(name, sock, agent, server, f"{host}:{port}")


@asynccontextmanager
async def two_nodes(tmp: Path) -> AsyncIterator[tuple[list[Node], Path, Path]]:
    store, origin = make(tmp)
    async with running_etcd(tmp) as etcd, reaped() as daemons:
        nodes = [await start_node(etcd, tmp, n, store, origin, daemons) for n in ("a", "b")]
        yield nodes, store, origin


async def active_address(sock: Path) -> str:
    with trio.fail_after(10):
        return (await find_server(str(sock), wait=True)).address


async def address_becomes(nodes: list[Node], wanted: str) -> None:
    """Until every node's agent names `wanted` as the active server."""
    for node in nodes:
        await agent_names(node.sock, wanted)


async def elected(nodes: list[Node]) -> tuple[Node, Node]:
    """Once every node's agent names the same server: (its node, the other)."""
    first = await active_address(nodes[0].sock)
    with trio.fail_after(10):
        await address_becomes(nodes, first)
    active = next(n for n in nodes if n.address == first)
    return active, next(n for n in nodes if n is not active)


def token_of(store: Path) -> int:
    with open(store, "rb") as f:
        return decode_superblock(f.read(4096)).fence_token


def events(log: Path, name: str) -> list[dict[str, object]]:
    found = []
    for line in log.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("event") == name:
            found.append(record)
    return found


async def test_one_election_every_node_follows_and_a_standby_takes_over(
    tmp_path: Path,
) -> None:
    async with two_nodes(tmp_path) as (nodes, store, origin), reaped() as daemons:
        active, standby = await elected(nodes)
        token = token_of(store)
        assert token > 0

        # The CLI works on both nodes: create on the standby's node, list on the other.
        created = await csnap(standby.sock, "create", "3")
        assert created.returncode == 0, (created.stderr, tail(standby.agent.log))
        listed = await csnap(active.sock, "--json", "list")
        assert [s["tag"] for s in json.loads(listed.stdout)["snapshots"]] == [3]
        # A data-path client on the standby's node reaches the active server,
        # which tells it the token it serves under.
        with trio.fail_after(20):
            async with (
                open_client(agent_store_connector(str(standby.sock))) as client,
                client.origin_write([(4, 1)]),
            ):
                pwrite(origin, 4, label(4, 1))
        assert client.token == token
        # An NBD gateway on the standby's node, writing the origin through
        # the active server on the other node.
        nbd, _ = await start_gateway(
            tmp_path, "--agent", str(standby.sock), "--unix", str(tmp_path / "nbd.sock")
        )
        daemons.append(nbd)
        origin_url = f"nbd+unix:///origin?socket={tmp_path / 'nbd.sock'}"
        snapshot_url = f"nbd+unix:///snap-3?socket={tmp_path / 'nbd.sock'}"
        await run(*qemu_io(origin_url, "write -P 0xaa 65536 65536"))

        killed = time.monotonic()
        await active.server.kill()
        with trio.fail_after(10):
            await address_becomes(nodes, standby.address)
        failover = time.monotonic() - killed
        print(f"failover after SIGKILL of the active csnapd: {failover:.2f}s")
        assert failover < 3 * TTL
        new_token = token_of(store)
        assert new_token > token

        # The CLI on the node whose server died reaches the new one.
        server = await csnap(active.sock, "--json", "server")
        assert server.returncode == 0, server.stderr
        shown = json.loads(server.stdout)
        assert (shown["address"], shown["node"], shown["token"]) == (
            standby.address,
            standby.name,
            new_token,
        )
        with trio.fail_after(20):
            async with (
                open_client(agent_store_connector(str(active.sock)), snapshot=3) as reader,
                reader.snapshot_read([(4, 1)]) as plan,
            ):
                assert [s[:2] for s in plan.store] == [(4, 1)]
            assert reader.token == new_token
        # The gateway reconnected to the new server: its writes copy out as
        # before, and the snapshot still reads what the origin held at its
        # creation (zeros there, before the first gateway write).
        await run(*qemu_io(origin_url, "write -P 0xbb 65536 65536"))
        await run(*qemu_io(origin_url, "read -P 0xbb 65536 65536"), seconds=30)
        await run(*qemu_io(snapshot_url, "read -P 0 65536 65536", read_only=True))
        assert nbd.process.returncode is None, tail(nbd.log)
        nbd.process.send_signal(signal.SIGTERM)
        with trio.fail_after(20):
            assert await nbd.process.wait() == 0
        assert await standby.server.stop() == 0
        for node in nodes:
            assert await node.agent.stop() == 0
    assert store_is_clean(store)


async def test_a_server_whose_agent_dies_fences_itself_before_the_lease_expires(
    tmp_path: Path,
) -> None:
    async with two_nodes(tmp_path) as (nodes, store, _origin):
        active, standby = await elected(nodes)
        token = token_of(store)

        killed = time.monotonic()
        await active.agent.kill()
        with trio.fail_after(10):
            status = await active.server.process.wait()
        assert status == 4, tail(active.server.log)  # fenced
        fenced_at = time.monotonic()
        with trio.fail_after(10):
            await address_becomes([standby], standby.address)
        elected_at = time.monotonic()
        print(f"failover after SIGKILL of the active node's agent: {elected_at - killed:.2f}s")
        assert "fenced: the lease was not renewed in time" in active.server.log.read_text()
        # It stopped before the standby could be elected: etcd expired the
        # lease only after the server's own deadline.
        assert fenced_at <= elected_at
        won = events(standby.agent.log, "election.won")
        assert won and int(str(won[-1]["token"])) > token
        assert token_of(store) > token

        created = await csnap(standby.sock, "create", "7")
        assert created.returncode == 0, created.stderr
        assert await standby.server.stop() == 0
        assert await standby.agent.stop() == 0
    assert store_is_clean(store)


async def test_a_hung_server_loses_the_election_and_writes_nothing_when_it_wakes(
    tmp_path: Path,
) -> None:
    async with two_nodes(tmp_path) as (nodes, store, origin):
        active, standby = await elected(nodes)
        token = token_of(store)
        # A client of the hung server: connected, identified, then left waiting.
        with trio.fail_after(20):
            async with open_client(agent_store_connector(str(active.sock))) as client:
                assert client.token == token

        active.server.process.send_signal(signal.SIGSTOP)
        try:
            with trio.fail_after(15):
                await address_becomes(nodes, standby.address)
            new_token = token_of(store)
            assert new_token > token
            created = await csnap(standby.sock, "create", "9")
            assert created.returncode == 0, created.stderr
            with trio.fail_after(20):
                async with (
                    open_client(agent_store_connector(str(active.sock))) as writer,
                    writer.origin_write([(6, 1)]),
                ):
                    pwrite(origin, 6, label(6, 1))
            before = store.read_bytes()
        finally:
            active.server.process.send_signal(signal.SIGCONT)
        with trio.fail_after(10):
            status = await active.server.process.wait()
        assert status == 4, tail(active.server.log)
        assert "fenced" in active.server.log.read_text()
        # Woken past its deadline, it wrote nothing: not even "clean".
        assert store.read_bytes() == before
        assert token_of(store) == new_token
        assert pread(origin, 6) == label(6, 1)
        assert await standby.server.stop() == 0
        for node in nodes:
            assert await node.agent.stop() == 0
    assert store_is_clean(store)


async def test_a_client_refuses_a_server_with_an_older_token(tmp_path: Path) -> None:
    store, origin = make(tmp_path)
    async with reaped() as daemons:
        server, host, port = await start_csnapd(store, origin, tmp_path / "csnapd.log")
        daemons.append(server)
        # A server started without a cluster coordinator identifies with
        # token 0: older than any a client has seen from an elected one.
        client = DataClient(connector(host, port, store, ROLE_CLIENT), reconnect=False)
        client.token = 5
        with trio.fail_after(10), pytest.raises(ServerError) as refused, single_errors():
            async with trio.open_nursery() as nursery:
                await nursery.start(client.run)
        assert refused.value.error is ErrorCode.FENCED
        assert client.info is None  # nothing the old server said was taken
        async with open_client(connector(host, port, store, ROLE_CLIENT)) as fresh:
            assert fresh.token == 0
        assert await server.stop() == 0


async def test_service_continues_through_an_etcd_restart_shorter_than_the_lease(
    tmp_path: Path,
) -> None:
    store, origin = make(tmp_path)
    ttl = 5
    async with running_etcd(tmp_path) as etcd, reaped() as daemons:
        node = await start_node(etcd, tmp_path, "a", store, origin, daemons, ttl)
        first = await active_address(node.sock)
        token = token_of(store)
        await etcd.restart(down=0.5)
        # Longer than the deadline the server held when etcd went away
        # (2/3 of the TTL after the last renewal): renewals resumed.
        await trio.sleep(ttl * 2 / 3 + 0.5)
        assert node.server.process.returncode is None, tail(node.server.log)
        assert "fenced" not in node.server.log.read_text()
        assert await active_address(node.sock) == first
        assert token_of(store) == token
        with trio.fail_after(20):
            async with (
                open_client(agent_store_connector(str(node.sock))) as client,
                client.origin_write([(1, 1)]),
            ):
                pwrite(origin, 1, label(1, 1))
        assert client.token == token
        assert await node.server.stop() == 0
        assert await node.agent.stop() == 0
    assert store_is_clean(store)


async def test_the_agent_reports_the_fencing_token_of_the_elected_server(
    tmp_path: Path,
) -> None:
    """csnap_agent_fencing_token (docs/operations.md, "Monitoring") is the
    token the elected server journaled into the store."""
    store, origin = make(tmp_path)
    sock = tmp_path / "a.sock"
    async with running_etcd(tmp_path) as etcd, reaped() as daemons:
        argv = ["csnap_agent", "--socket", str(sock), "--etcd-endpoints", etcd.url,
                "--node", "a", "--lease-ttl", str(TTL), "--metrics", "127.0.0.1:0"]  # fmt: skip
        agent = await start(argv, tmp_path / "agent.log")
        daemons.append(agent)
        assert agent.first_line == f"listening unix:{sock}", agent.first_line
        assert agent.process.stdout is not None
        line = b""
        with trio.fail_after(30):
            while not line.endswith(b"\n"):
                line += await agent.process.stdout.receive_some(1)
        url = metrics_url([line.decode().strip()])
        server, _, _ = await start_csnapd(
            store, origin, tmp_path / "csnapd.log", "--agent", str(sock)
        )
        daemons.append(server)
        await active_address(sock)

        async def token_journaled() -> bool:
            return token_of(store) > 0

        with trio.fail_after(10):
            await poll(token_journaled)
        token = token_of(store)
        scraped = await scrape_until(url, lambda s: s.value("csnap_agent_fencing_token") == token)
        assert scraped.value("csnap_agent_fencing_token") == token > 0
