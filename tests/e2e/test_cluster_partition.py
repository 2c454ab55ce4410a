"""A network partition of the active server's node (docs/operations.md,
"Running a cluster"): two nodes in network namespaces the test creates,
each joined by a veth pair to a bridge that carries etcd's address. The
active node's link goes down: its server fences itself before its lease
can expire, the other node's server is elected, and when the link comes
back the old server has long stopped and its agent follows the new one.
Runs as root (it creates namespaces) and fails, never skips, without.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from csnap_client import agent_store_connector, find_server, open_client
from csnap_common.credentials import make_credentials, store_credentials
from tests.e2e.etcd import Etcd, running_etcd
from tests.e2e.namespaces import Host, hosts, ip, start_agent_in, start_candidate_in
from tests.e2e.processes import Daemon, agent_names, csnap, tail
from tests.e2e.test_agent import make, store_is_clean
from tests.e2e.test_cluster import TTL, token_of
from tests.e2e.test_failover import reaped
from tests.server.support import label, pread, pwrite

pytestmark = pytest.mark.e2e


@dataclass
class Node:
    host: Host
    sock: Path
    agent: Daemon
    server: Daemon
    address: str


async def start_node(
    etcd: Etcd, tmp: Path, host: Host, name: str, store: Path, origin: Path, daemons: list[Daemon]
) -> Node:
    sock = tmp / f"{name}.sock"
    agent = await start_agent_in(host, etcd.url, sock, name, TTL, tmp / f"{name}-agent.log")
    daemons.append(agent)
    server = await start_candidate_in(host, sock, store, origin, tmp / f"{name}-csnapd.log")
    daemons.append(server)
    address = server.first_line.partition(" ")[2]
    return Node(host, sock, agent, server, address)


def first_time(log: Path, event: str) -> datetime.datetime:
    for line in log.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("event") == event:
            return datetime.datetime.fromisoformat(str(record["time"]).replace("Z", "+00:00"))
    raise AssertionError(f"no {event} in {log}: {tail(log)}")


@asynccontextmanager
async def cluster(tmp: Path) -> AsyncIterator[tuple[list[Node], Path, Path]]:
    store, origin = make(tmp)
    make_credentials(store_credentials(store))
    with hosts(2) as (bridge_address, made):
        async with running_etcd(tmp, bridge_address) as etcd, reaped() as daemons:
            nodes = [
                await start_node(etcd, tmp, host, f"n{i}", store, origin, daemons)
                for i, host in enumerate(made)
            ]
            yield nodes, store, origin


async def test_a_partitioned_server_fences_itself_and_the_other_node_takes_over(
    tmp_path: Path,
) -> None:
    async with cluster(tmp_path) as (nodes, store, origin):
        with trio.fail_after(10):
            first = (await find_server(str(nodes[0].sock), wait=True)).address
            for node in nodes:
                await agent_names(node.sock, first)
        isolated = next(n for n in nodes if n.address == first)
        other = next(n for n in nodes if n is not isolated)
        token = token_of(store)
        with trio.fail_after(20):
            async with (
                open_client(agent_store_connector(str(other.sock))) as client,
                client.origin_write([(2, 1)]),
            ):
                pwrite(origin, 2, label(2, 1))

        ip("link", "set", isolated.host.link, "down")
        cut = trio.current_time()
        with trio.fail_after(15):
            status = await isolated.server.process.wait()
        assert status == 4, tail(isolated.server.log)  # fenced
        with trio.fail_after(15):
            await agent_names(other.sock, other.address)
        print(f"partition to a new active server: {trio.current_time() - cut:.2f}s")
        # The isolated server stopped before the other node's won.
        fenced = first_time(isolated.server.log, "server.fenced")
        won = first_time(other.agent.log, "election.won")
        assert fenced < won, (fenced, won)
        new_token = token_of(store)
        assert new_token > token

        ip("link", "set", isolated.host.link, "up")
        # Back on the network, the isolated node's agent follows the new server.
        with trio.fail_after(15):
            await agent_names(isolated.sock, other.address)
        # The link is up, but the node's neighbour (ARP) entries failed while
        # it was down: its first connections may fail for a moment.
        with trio.fail_after(15):
            while True:
                created = await csnap(isolated.sock, "create", "1")
                if created.returncode == 0 or "attempts to connect" not in created.stderr:
                    break
                await trio.sleep(0.5)
        assert created.returncode == 0, (created.stderr, tail(isolated.agent.log))
        with trio.fail_after(20):
            async with (
                open_client(agent_store_connector(str(isolated.sock))) as writer,
                writer.origin_write([(2, 1)]),
            ):
                pwrite(origin, 2, label(2, 2))
            async with (
                open_client(agent_store_connector(str(isolated.sock)), snapshot=1) as reader,
                reader.snapshot_read([(2, 1)]) as plan,
            ):
                assert [s[:2] for s in plan.store] == [(2, 1)]
        assert pread(origin, 2) == label(2, 2)
        assert token_of(store) == new_token
        assert await other.server.stop() == 0
        for node in nodes:
            assert await node.agent.stop() == 0
    assert store_is_clean(store)
