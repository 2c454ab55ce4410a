"""Metadata queries per second from clients on three nodes against one
server, beside the same clients all on one node.

Three nodes on loopback, each an agent electing through one real etcd
(Debian's etcd-server), and one csnapd, registered with the first node's
agent, so it is the active server for all three. Each node's load is its
own process (`python -m bench.cluster_bench --worker ...`) with CLIENTS
snapshot clients that find the server through their node's agent and ask
query_snapshot_read about chunks the snapshot owns (answered from the
btree, no commit), one after another, for a fixed time. The workers
connect, say "ready", start together on "go" and print what they did.

  one node     one worker process with 3 x CLIENTS clients
  three nodes  a worker on each node with CLIENTS clients each

Figures: queries per second across all clients, the median of the rounds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from bench.common import PYTHON_ENV, Part, listening, median, progress, stdout_line, stop, table
from bench.failover_bench import TTL, etcd
from bench.server_bench import SNAPSHOT, fill, make_store
from csnap_client import (
    agent_admin_connector,
    agent_store_connector,
    find_server,
    open_admin,
    open_client,
)
from csnap_common.credentials import make_credentials, store_credentials

NODES = 3


@dataclass(frozen=True)
class Plan:
    rounds: int
    seconds: float
    #: Clients on each node in the three-node layout.
    clients: int
    #: Chunks copied out for the snapshot, which the queries cycle over.
    region: int


QUICK = Plan(rounds=1, seconds=0.5, clients=2, region=256)
FULL = Plan(rounds=3, seconds=5.0, clients=8, region=16384)


async def _worker(sock: str, clients: int, seconds: float, region: int, first: int) -> None:
    """One node's load: `clients` snapshot clients through the agent at `sock`."""
    done = [0] * clients
    async with AsyncExitStack() as stack:
        opened = [
            await stack.enter_async_context(
                open_client(agent_store_connector(sock), snapshot=SNAPSHOT)
            )
            for _ in range(clients)
        ]
        print("ready", flush=True)
        await trio.to_thread.run_sync(sys.stdin.readline)
        start = time.perf_counter()
        end = start + seconds

        async def query(number: int) -> None:
            # Each stops between queries: none is cancelled in flight.
            chunk = (first + number * 997) % region
            client = opened[number]
            while time.perf_counter() < end:
                async with client.snapshot_read([(chunk, 1)]) as plan:
                    assert plan.store and not plan.origin, chunk
                done[number] += 1
                chunk = (chunk + 1) % region

        async with trio.open_nursery() as nursery:
            for number in range(clients):
                nursery.start_soon(query, number)
        elapsed = time.perf_counter() - start
    print(json.dumps({"queries": sum(done), "seconds": elapsed}), flush=True)


async def _round(socks: list[Path], clients: int, plan: Plan) -> float:
    """Workers on these nodes' agents, `clients` each, together: queries/s."""
    processes = []
    try:
        for n, sock in enumerate(socks):
            argv = [sys.executable, "-m", "bench.cluster_bench", "--worker", str(sock)]
            argv += [str(clients), str(plan.seconds), str(plan.region), str(n * 4099)]
            processes.append(
                await trio.lowlevel.open_process(
                    argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=PYTHON_ENV
                )
            )
        lines = [await _line(p) for p in processes]
        assert all(line == "ready" for line in lines), lines
        for process in processes:
            assert process.stdin is not None
            await process.stdin.send_all(b"go\n")
        results = [json.loads(await _line(p)) for p in processes]
        for process in processes:
            await process.wait()
    finally:
        for process in processes:
            await stop(process)
    # Their windows overlap: the total over the longest is a lower bound.
    queries: int = sum(r["queries"] for r in results)
    return queries / max(float(r["seconds"]) for r in results)


async def _line(process: trio.Process) -> str:
    return await stdout_line(process, seconds=120, ended="a worker exited early")


async def _cluster(directory: Path, plan: Plan) -> dict[str, Any]:
    store, origin = make_store(directory, "cluster", 4 * plan.region * 4096, plan.region * 4096)
    socks = [directory / f"node{n}.sock" for n in range(NODES)]
    # The cluster's credentials, which every agent needs to reach a server
    # on another node.
    keys = store_credentials(store)
    make_credentials(keys)
    async with etcd(directory) as url, AsyncExitStack() as stack:
        for n, sock in enumerate(socks):
            argv = [sys.executable, "-m", "csnap_agent", f"--socket={sock}",
                    f"--etcd-endpoints={url}", f"--node=node{n}", f"--lease-ttl={TTL}",
                    f"--credentials={keys}"]  # fmt: skip
            await stack.enter_async_context(listening(argv, directory / f"agent{n}.log"))
        argv = [sys.executable, "-m", "csnapd", str(store), str(origin)]
        argv += ["--listen", "127.0.0.1:0", "--agent", str(socks[0]), "--credentials", str(keys)]
        started = await stack.enter_async_context(listening(argv, directory / "csnapd.log"))
        with trio.fail_after(30):
            for sock in socks:
                while (await find_server(str(sock), wait=True)).address != started.said:  # noqa: ASYNC110
                    await trio.sleep(0.05)
        async with open_admin(agent_admin_connector(str(socks[0]))) as admin:
            await admin.create_snapshot(SNAPSHOT)
        await fill(agent_store_connector(str(socks[0])), 0, plan.region)
        one, three = [], []
        for number in range(plan.rounds):
            one.append(await _round(socks[:1], NODES * plan.clients, plan))
            three.append(await _round(socks, plan.clients, plan))
            progress(
                f"cluster round {number + 1}/{plan.rounds}: one node {one[-1]:.0f}/s,"
                f" three nodes {three[-1]:.0f}/s"
            )
    return {
        "clients": NODES * plan.clients,
        "seconds": plan.seconds,
        "one_node_queries_per_s": median(one),
        "three_nodes_queries_per_s": median(three),
        "rounds_one_node": one,
        "rounds_three_nodes": three,
    }


def cluster_part(directory: Path, *, quick: bool) -> Part:
    """For the suite (python -m bench)."""
    figures = trio.run(_cluster, directory, QUICK if quick else FULL)
    rows = [
        ["one node", f"1 x {figures['clients']}", f"{figures['one_node_queries_per_s']:.0f}"],
        [
            "three nodes",
            f"3 x {figures['clients'] // NODES}",
            f"{figures['three_nodes_queries_per_s']:.0f}",
        ],
    ]
    notes = ["query_snapshot_read of owned chunks against one csnapd, clients through their agents"]
    return Part(
        figures, table(["clients on", "processes x clients", "queries/s"], rows, notes=notes)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="one node's load of a cluster bench")
    parser.add_argument(
        "--worker", nargs=5, metavar=("SOCK", "CLIENTS", "SECONDS", "REGION", "FIRST")
    )
    args = parser.parse_args(argv)
    sock, clients, seconds, region, first = args.worker
    trio.run(_worker, sock, int(clients), float(seconds), int(region), int(first))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
