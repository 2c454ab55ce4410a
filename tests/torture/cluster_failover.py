"""A long failover run across hosts: two nodes as network namespaces on a
bridge that carries a real etcd (tests/e2e/namespaces.py), each with an
agent and a csnapd candidate, and round after round the active server
taken away, alternately by SIGKILL of its csnapd and by a partition of its
node (its link down until it has fenced itself, then up again).

    python -m tests.torture.cluster_failover --rounds 100 --directory DIR

Each round: the other node's agent must name its own server within 30 s,
an origin write through that agent must be granted (and is written, its
label recorded), and a fresh candidate is started on the node that lost
its server. After a partition the isolated server must have exited with
status 4 (fenced). At the end every acknowledged write is in the origin and
csnap-check finds the store clean. Prints one line per round and a summary
("cluster failover: N kills and M partitions ..."); exits 1 on a failure.
Needs root (namespaces) and etcd (Debian's etcd-server).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import trio

from csnap_client import agent_store_connector, find_server, open_client
from csnap_common.credentials import make_credentials, store_credentials
from tests.e2e.etcd import running_etcd
from tests.e2e.namespaces import hosts, ip, start_candidate_in
from tests.e2e.processes import agent_names, tail
from tests.e2e.test_agent import make, store_is_clean
from tests.e2e.test_cluster_partition import Node, start_node
from tests.e2e.test_failover import reaped
from tests.server.support import label, pread, pwrite


def other_than(nodes: list[Node], node: Node | None) -> Node:
    return next(n for n in nodes if n is not node)


async def run(tmp: Path, rounds: int) -> int:
    store, origin = make(tmp)
    make_credentials(store_credentials(store))
    acknowledged: dict[int, int] = {}
    times: dict[str, list[float]] = {"kill": [], "partition": []}
    with hosts(2) as (bridge_address, made):
        async with running_etcd(tmp, bridge_address) as etcd, reaped() as daemons:
            nodes: list[Node] = [
                await start_node(etcd, tmp, host, f"n{i}", store, origin, daemons)
                for i, host in enumerate(made)
            ]
            for number in range(rounds):
                with trio.fail_after(30):
                    where = await find_server(str(other_than(nodes, None).sock), wait=True)
                    active = next(n for n in nodes if n.address == where.address)
                    for node in nodes:
                        await agent_names(node.sock, active.address)
                other = other_than(nodes, active)
                kind = "kill" if number % 2 == 0 else "partition"
                began = trio.current_time()
                if kind == "kill":
                    await active.server.kill()
                else:
                    ip("link", "set", active.host.link, "down")
                    with trio.fail_after(30):
                        status = await active.server.process.wait()
                    ip("link", "set", active.host.link, "up")
                    if status != 4:
                        raise AssertionError(f"not fenced ({status}): {tail(active.server.log)}")
                with trio.fail_after(30):
                    await agent_names(other.sock, other.address)
                    chunk = number % 4096
                    async with (
                        open_client(agent_store_connector(str(other.sock))) as client,
                        client.origin_write([(chunk, 1)]),
                    ):
                        pwrite(origin, chunk, label(chunk, number + 1))
                acknowledged[chunk] = number + 1
                times[kind].append(trio.current_time() - began)
                print(f"round {number + 1}/{rounds}: {kind}, {times[kind][-1]:.2f}s", flush=True)
                log = tmp / f"n{nodes.index(active)}-csnapd{number}.log"
                active.server = await start_candidate_in(
                    active.host, active.sock, store, origin, log
                )
                daemons.append(active.server)
                active.address = active.server.first_line.partition(" ")[2]
            for node in nodes:
                if node.server.process.returncode is None:
                    assert await node.server.stop() == 0, tail(node.server.log)
                assert await node.agent.stop() == 0
    lost = [c for c, n in acknowledged.items() if pread(origin, c) != label(c, n)]
    clean = store_is_clean(store)
    summary = ", ".join(
        f"{kind} median {statistics.median(t):.2f}s max {max(t):.2f}s"
        for kind, t in times.items()
        if t
    )
    print(
        f"cluster failover: {len(times['kill'])} kills and {len(times['partition'])} partitions"
        f" of the active server's node, to the next granted write: {summary};"
        f" {len(lost)} acknowledged writes lost, csnap-check {'clean' if clean else 'NOT CLEAN'}"
    )
    return 0 if clean and not lost else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="kills and partitions of a two-node cluster")
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--directory", type=Path, help="for the logs (default: a temporary one)")
    args = parser.parse_args(argv)
    if args.directory is not None:
        args.directory.mkdir(parents=True, exist_ok=True)
        return trio.run(run, args.directory, args.rounds)
    with tempfile.TemporaryDirectory(prefix="csnap-cluster-") as tmp:
        return trio.run(run, Path(tmp), args.rounds)


if __name__ == "__main__":
    sys.exit(main())
