"""What --metrics costs csnapd: the metadata query rate with and without it.

Two csnapd processes on loopback, each on its own store of real files, one
started with --metrics and scraped every SCRAPE_EVERY seconds while it is
measured (a Prometheus scrape interval is usually 15 s or more: this is a
harsher load), the other without. Both run the lookup-only workloads of
bench.server_bench (origin writes of chunks already copied out, snapshot
reads of chunks in the store: no commit, so the rate is the server's
request path alone) with 8 and 64 clients, in rounds that alternate between
the two servers so that drift of the machine falls on both alike. The cost
is one minus the ratio of the median rates; csnapd's CPU time per reply
(from /proc, scrapes included) says the same with less noise from the rest
of the machine.
"""

from __future__ import annotations

import socket
import statistics
import time
import urllib.request
from collections.abc import Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import trio

from bench.common import Part, progress
from bench.server_bench import (
    CHUNK,
    FULL,
    QUICK,
    SNAPSHOT,
    WORKLOADS,
    Chunks,
    Plan,
    Round,
    Server,
    csnapd,
    data_clients,
    fill,
    make_store,
    run_round,
)
from csnap_client import open_admin
from csnap_protocol import QueryWrite, Role, WriteOk
from csnapd.batch import Peer
from csnapd.server_stats import ServerStats

__all__ = ["metrics_part"]

#: Seconds between scrapes of the server measured with --metrics.
SCRAPE_EVERY = 1.0
CLIENTS = (8, 64)
MEASURED = ("origin_write_unique", "snapshot_read_store")


def counting_ns(requests: int = 200_000) -> float:
    """Nanoseconds csnapd's per-request counting costs (ServerStats.arrived and
    replied, for a request answered at once), in this process."""
    stats = ServerStats()
    peer = Peer(1, Role.CLIENT, "bench")
    queries = [QueryWrite(n, ((n, 1),)) for n in range(requests)]
    replies = [WriteOk(n, 0) for n in range(requests)]
    # CPU time, not wall time: on a busy machine this process is descheduled.
    start = time.process_time_ns()
    for query, reply in zip(queries, replies, strict=True):
        stats.arrived(peer, query)
        stats.replied(peer, reply, reply.id, True)
    return (time.process_time_ns() - start) / requests


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _scrape_forever(url: str, scrapes: list[tuple[int, float]]) -> None:
    """Scrape `url` every SCRAPE_EVERY seconds: (bytes, seconds) of each."""

    def fetch() -> tuple[int, float]:
        start = time.perf_counter()
        with urllib.request.urlopen(url, timeout=10) as response:
            size = len(response.read())
        return size, time.perf_counter() - start

    while True:
        scrapes.append(await trio.to_thread.run_sync(fetch))
        await trio.sleep(SCRAPE_EVERY)


async def _measure(
    directory: Path, plan: Plan, report: Callable[[str, dict[str, Any]], None]
) -> None:
    region = plan.region
    port = _free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    async with AsyncExitStack() as stack:
        servers: dict[str, Server] = {}
        for mode, options in (("without", ()), ("with", ("--metrics", f"127.0.0.1:{port}"))):
            store, origin = make_store(directory, mode, 4 * region * CHUNK, 2 * region * CHUNK)
            server = await stack.enter_async_context(
                csnapd(store, origin, directory / f"{mode}.log", *options)
            )
            async with open_admin(server.connect) as admin:
                await admin.create_snapshot(SNAPSHOT)
            await fill(server.connect, 0, region)
            servers[mode] = server
        for workload in (w for w in WORKLOADS if w.name in MEASURED):
            for count in CLIENTS:
                rounds: dict[str, list[Round]] = {"without": [], "with": []}
                scrapes: list[tuple[int, float]] = []
                async with AsyncExitStack() as clients_stack:
                    clients = {}
                    admins = {}
                    for mode, server in servers.items():
                        clients[mode] = await clients_stack.enter_async_context(
                            data_clients(server.connect, count, workload.snapshot)
                        )
                        admins[mode] = await clients_stack.enter_async_context(
                            open_admin(server.connect)
                        )
                    for number in range(plan.rounds + 1):  # the first is warm-up
                        order = ("without", "with") if number % 2 else ("with", "without")
                        for mode in order:
                            chunks = Chunks(0, region, wrap=True)
                            async with trio.open_nursery() as nursery:
                                if mode == "with":
                                    nursery.start_soon(_scrape_forever, url, scrapes)
                                measured = await run_round(
                                    servers[mode],
                                    admins[mode],
                                    clients[mode],
                                    workload.operation,
                                    chunks,
                                    plan.count,
                                    plan.seconds,
                                )
                                nursery.cancel_scope.cancel()
                            if number:
                                rounds[mode].append(measured)
                rates = {
                    mode: statistics.median(r.ops / (r.elapsed_ns / 1e9) for r in measured)
                    for mode, measured in rounds.items()
                }
                cpu = {
                    mode: _server_cpu_us_per_reply(measured) for mode, measured in rounds.items()
                }
                report(
                    f"{workload.name}_{count}_clients",
                    {
                        "clients": count,
                        "without_per_s": rates["without"],
                        "with_per_s": rates["with"],
                        "cost": 1 - rates["with"] / rates["without"],
                        "without_cpu_us_per_reply": cpu["without"],
                        "with_cpu_us_per_reply": cpu["with"],
                        "scrapes": len(scrapes),
                        "scrape_bytes": scrapes[-1][0] if scrapes else 0,
                        "scrape_ms_p50": statistics.median(t for _, t in scrapes) * 1e3
                        if scrapes
                        else None,
                    },
                )


def _server_cpu_us_per_reply(rounds: list[Round]) -> float | None:
    """csnapd's CPU time per reply over `rounds` (scrapes included), if /proc said."""
    if any(r.server_cpu_ns is None for r in rounds):
        return None
    return sum(r.server_cpu_ns or 0 for r in rounds) / sum(r.replies for r in rounds) / 1e3


_HEADER = (
    f"{'workload':<32} {'without/s':>10} {'with/s':>10} {'cost':>7}"
    f" {'cpu us without':>15} {'cpu us with':>12} {'scrapes':>8}"
)


def _us(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _row(name: str, figs: dict[str, Any]) -> str:
    return (
        f"{name:<32} {figs['without_per_s']:>10.0f} {figs['with_per_s']:>10.0f}"
        f" {figs['cost']:>7.1%} {_us(figs['without_cpu_us_per_reply']):>15}"
        f" {_us(figs['with_cpu_us_per_reply']):>12} {figs['scrapes']:>8}"
    )


def metrics_part(directory: Path, *, quick: bool) -> Part:
    """The metadata query rate with and without --metrics, for the suite."""
    results: dict[str, Any] = {"scrape_every_s": SCRAPE_EVERY}
    rows: list[str] = []

    def report(key: str, figs: dict[str, Any]) -> None:
        results[key] = figs
        rows.append(_row(key, figs))
        progress(rows[-1])

    results["counting_ns_per_request"] = counting_ns(20_000 if quick else 200_000)
    trio.run(_measure, directory, QUICK if quick else FULL, report)
    footer = (
        f"per-request counting in csnapd: {results['counting_ns_per_request']:.0f} ns"
        f" (in-process); scraped every {SCRAPE_EVERY:g} s"
    )
    return Part(results, "\n".join([_HEADER, *rows, footer]))
