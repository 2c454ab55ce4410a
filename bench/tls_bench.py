"""What authentication costs: csnapd with mutual TLS (as it always runs)
beside the same server in plaintext (bench.plaintext_csnapd), on the same
store, in one run.

  metadata queries  snapshot reads of chunks the snapshot owns (one
                    query_snapshot_read and its reply each, answered from
                    the btree without a commit) with 1 and 8 clients:
                    queries per second and median latency, each side
  connections       connect, hello, one get_server_info and close, one
                    after another: connections per second (the TLS
                    handshake's share of a new client)

Measured as bench.server_bench does (rounds bounded in count and time,
medians of the rounds). Prints a table; --json FILE writes the figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import trio

from bench.common import Part, listening, progress, ratio, scratch_directory, table
from bench.server_bench import (
    FULL,
    QUICK,
    SNAPSHOT,
    Chunks,
    Plan,
    Server,
    csnapd,
    data_clients,
    figures,
    fill,
    make_store,
    run_round,
    snapshot_read_store,
)
from csnap_client import open_admin

CLIENTS = (1, 8)


@asynccontextmanager
async def plaintext_csnapd(store: Path, origin: Path, log: Path) -> AsyncIterator[Server]:
    """The same server without TLS (bench.plaintext_csnapd)."""
    argv = [sys.executable, "-m", "bench.plaintext_csnapd", str(store), str(origin)]
    async with listening(argv, log) as started:
        host, _, port = started.said.rpartition(":")

        async def connect() -> trio.abc.Stream:
            return await trio.open_tcp_stream(host, int(port))

        yield Server(
            connect, started.process, started.said, started.spawned_ns, started.listening_ns
        )


async def _connections(server: Server, count: int, seconds: float) -> float:
    """Connections per second: connect, hello, one request, close."""
    done, start = 0, time.perf_counter()
    with trio.move_on_after(seconds):
        while done < count:
            async with open_admin(server.connect) as admin:
                await admin.server_info()
            done += 1
    return done / (time.perf_counter() - start)


async def _measure(server: Server, plan: Plan, region: int) -> dict[str, Any]:
    figs: dict[str, Any] = {}
    async with open_admin(server.connect) as admin:
        chunks = Chunks(0, region, wrap=True)
        for count in CLIENTS:
            async with data_clients(server.connect, count, SNAPSHOT) as clients:
                measure = partial(run_round, server, admin, clients, snapshot_read_store, chunks)
                await measure(plan.warmup_count, plan.warmup_seconds)
                rounds = [await measure(plan.count, plan.seconds) for _ in range(plan.rounds)]
            figs[f"queries_{count}_clients"] = figures(rounds, 1)
    rates = [await _connections(server, plan.cycles * 10, plan.seconds) for _ in range(plan.rounds)]
    figs["connections_per_s"] = statistics.median(rates)
    return figs


async def compare(directory: Path, plan: Plan) -> dict[str, Any]:
    """Both servers, one after the other, on the same store."""
    region = plan.region
    store, origin = make_store(directory, "tls", 4 * region * 4096, region * 4096)
    results: dict[str, Any] = {}
    async with csnapd(store, origin, directory / "tls.log") as server:
        async with open_admin(server.connect) as admin:
            await admin.create_snapshot(SNAPSHOT)
        await fill(server.connect, 0, region)
        results["tls"] = await _measure(server, plan, region)
    async with plaintext_csnapd(store, origin, directory / "plaintext.log") as server:
        results["plaintext"] = await _measure(server, plan, region)
    return results


def render(results: dict[str, Any]) -> str:
    tls, plain = results["tls"], results["plaintext"]
    rows: list[list[Any]] = []
    for count in CLIENTS:
        key = f"queries_{count}_clients"
        rows.append(
            [
                f"metadata queries/s, {count} client{'s' if count > 1 else ''}",
                plain[key]["chunks_per_s"],
                tls[key]["chunks_per_s"],
                ratio(tls[key]["chunks_per_s"], plain[key]["chunks_per_s"]),
            ]
        )
        rows.append(
            [f"  median latency ms, {count}", plain[key]["p50_ms"], tls[key]["p50_ms"], None]
        )
    rows.append(
        [
            "connections/s (connect, hello, 1 request)",
            plain["connections_per_s"],
            tls["connections_per_s"],
            ratio(tls["connections_per_s"], plain["connections_per_s"]),
        ]
    )
    notes = ["csnapd over loopback: plaintext beside mutual TLS (the only way it runs)"]
    return table(["", "plaintext", "TLS", "TLS/plain"], rows, notes=notes)


def tls_part(directory: Path, *, quick: bool) -> Part:
    """For the suite (python -m bench)."""
    results = trio.run(compare, directory, QUICK if quick else FULL)
    progress("tls: done")
    return Part(results, render(results))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="what csnapd's authentication costs")
    parser.add_argument("--quick", action="store_true", help="a small smoke run")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    with scratch_directory() as tmp:
        results = trio.run(compare, Path(tmp), QUICK if args.quick else FULL)
    print(render(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
