"""Several stores in one cluster through a real etcd (docs/operations.md,
"Running a cluster"): two nodes on loopback, two stores, on each node one
agent per store with a csnapd candidate for it. The elections spread the
active servers over the nodes, and one store's failover leaves the other's
server, its token and its clients alone.
"""

from __future__ import annotations

import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from csnap_client import agent_store_connector, open_client
from tests.e2e.etcd import Etcd, running_etcd
from tests.e2e.processes import Daemon, agent_names, poll, start, start_csnapd, tail
from tests.e2e.test_agent import make, store_is_clean
from tests.e2e.test_cluster import active_address, events, token_of
from tests.e2e.test_failover import reaped
from tests.server.support import label, pwrite

pytestmark = pytest.mark.e2e

NODES = ("a", "b")
STORES = ("vol-a", "vol-b")
#: Each store's lease. A loaded node's candidate waits a quarter of it per
#: store its node leads: the second store's is long, so that the other
#: node's candidate, let in late on purpose, has time to win first.
TTL = {"vol-a": 2, "vol-b": 6}


@dataclass
class Cluster:
    """The stores' files, and each (node, store)'s agent and csnapd candidate."""

    tmp: Path
    etcd: Etcd
    daemons: list[Daemon]
    files: dict[str, tuple[Path, Path]] = field(default_factory=dict)
    agents: dict[tuple[str, str], Daemon] = field(default_factory=dict)
    #: (node, store) -> the csnapd and its address.
    servers: dict[tuple[str, str], tuple[Daemon, str]] = field(default_factory=dict)

    def sock(self, node: str, store: str) -> Path:
        return self.tmp / f"{node}-{store}.sock"

    async def start_agent(self, node: str, store: str) -> None:
        sock = self.sock(node, store)
        argv = ["csnap_agent", "--socket", str(sock), "--etcd-endpoints", self.etcd.url,
                "--node", node, "--store-name", store, "--lease-ttl", str(TTL[store]),
                "--log-format", "json"]  # fmt: skip
        agent = await start(argv, self.tmp / f"{node}-{store}-agent.log")
        self.daemons.append(agent)
        assert agent.first_line == f"listening unix:{sock}", agent.first_line
        self.agents[node, store] = agent

    async def start_server(self, node: str, store: str) -> None:
        store_file, origin = self.files[store]
        log = self.tmp / f"{node}-{store}-csnapd.log"
        server, host, port = await start_csnapd(
            store_file, origin, log, "--agent", str(self.sock(node, store))
        )
        self.daemons.append(server)
        self.servers[node, store] = (server, f"{host}:{port}")

    async def followed(self, store: str, address: str) -> None:
        """Until every node's agent for `store` names `address` as active."""
        with trio.fail_after(10):
            for node in NODES:
                await agent_names(self.sock(node, store), address)

    def won(self, store: str) -> list[dict[str, object]]:
        """Every node's election.won events for `store`."""
        return [e for n in NODES for e in events(self.agents[n, store].log, "election.won")]

    def token(self, store: str) -> int:
        return token_of(self.files[store][0])


@asynccontextmanager
async def two_nodes_two_stores(tmp: Path) -> AsyncIterator[Cluster]:
    """etcd, and on each node an agent per store (no csnapd yet)."""
    async with running_etcd(tmp) as etcd, reaped() as daemons:
        cluster = Cluster(tmp, etcd, daemons)
        for store in STORES:
            (tmp / store).mkdir()
            cluster.files[store] = make(tmp / store)
        async with trio.open_nursery() as nursery:
            for node in NODES:
                for store in STORES:
                    nursery.start_soon(cluster.start_agent, node, store)
        yield cluster


async def write_until(
    client_sock: Path, origin: Path, token: int, killed: trio.Event, done: trio.Event
) -> int:
    """Origin writes through `client_sock`'s agent until `done`, without
    reconnecting, so that any break fails; the writes after `killed`."""
    after_kill = 0
    async with open_client(agent_store_connector(str(client_sock)), reconnect=False) as client:
        assert client.token == token
        for round_ in range(1, 10_000):
            if done.is_set():
                break
            chunk = round_ % 64
            async with client.origin_write([(chunk, 1)]):
                pwrite(origin, chunk, label(chunk, round_))
            if killed.is_set():
                after_kill += 1
            await trio.sleep(0.02)
        assert client.token == token
    return after_kill


async def test_stores_spread_over_the_nodes_and_fail_over_one_by_one(tmp_path: Path) -> None:
    first, second = STORES
    async with two_nodes_two_stores(tmp_path) as cluster:
        # The first store: a candidate on each node, whichever wins.
        async with trio.open_nursery() as nursery:
            for node in NODES:
                nursery.start_soon(cluster.start_server, node, first)
        first_address = await active_address(cluster.sock(NODES[0], first))
        await cluster.followed(first, first_address)
        loaded = next(n for n in NODES if cluster.servers[n, first][1] == first_address)
        other = next(n for n in NODES if n != loaded)

        # The second store: the loaded node's candidate registers first (the
        # other node's agent is stopped meanwhile, so its candidate's
        # registration waits in the socket's backlog); it defers its
        # campaign, and the other node's, registered once that agent
        # continues, wins although it came later.
        stopped = cluster.agents[other, second].process
        loaded_log = cluster.agents[loaded, second].log
        stopped.send_signal(signal.SIGSTOP)
        try:
            await cluster.start_server(loaded, second)
            await cluster.start_server(other, second)

            async def deferred() -> bool:
                return bool(events(loaded_log, "election.deferred"))

            with trio.fail_after(10):
                await poll(deferred)
        finally:
            stopped.send_signal(signal.SIGCONT)
        (told,) = events(loaded_log, "election.deferred")
        wanted = f"in {TTL[second] / 4:.2f}s: node {loaded} leads 1 other store(s)"
        assert wanted in str(told["message"]), told
        second_address = cluster.servers[other, second][1]
        await cluster.followed(second, second_address)
        # One election each: one winner per store, on different nodes.
        assert [len(cluster.won(store)) for store in STORES] == [1, 1]
        assert not events(loaded_log, "election.won"), tail(loaded_log)
        first_token, second_token = cluster.token(first), cluster.token(second)
        assert first_token > 0 and second_token > 0 and first_token != second_token

        # A client of the second store, through the loaded node's agent (its
        # server on the other node), writes the origin while the first
        # store fails over.
        killed, done = trio.Event(), trio.Event()
        after_kill: list[int] = []

        async def writer() -> None:
            origin = cluster.files[second][1]
            client_sock = cluster.sock(loaded, second)
            after_kill.append(await write_until(client_sock, origin, second_token, killed, done))

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(writer)
                started = time.monotonic()
                await cluster.servers[loaded, first][0].kill()
                killed.set()
                await cluster.followed(first, cluster.servers[other, first][1])
                print(f"first store failed over in {time.monotonic() - started:.2f}s")
                done.set()
        assert after_kill[0] > 0
        assert cluster.token(first) > first_token
        # The second store's server is the same process under the same token.
        assert cluster.servers[other, second][0].process.returncode is None
        assert cluster.token(second) == second_token
        for node in NODES:
            assert await active_address(cluster.sock(node, second)) == second_address
        assert len(cluster.won(second)) == 1

        for node, store in [(other, first), (other, second), (loaded, second)]:
            server = cluster.servers[node, store][0]
            assert await server.stop() == 0, tail(server.log)
        for agent in cluster.agents.values():
            assert await agent.stop() == 0, tail(agent.log)
    for store in STORES:
        assert store_is_clean(cluster.files[store][0]), store
