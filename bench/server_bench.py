"""Metadata-server benchmarks: a trio load generator speaking the csnap
protocol through csnap_client to a real csnapd process, over loopback TCP,
on a store formatted on real files (real fdatasync) in a temporary
directory.

Data-path workloads, each with 1, 8 and 64 concurrent clients (one
connection each, one request in flight each), one chunk per request:
  origin_write_unique   origin writes of chunks every live snapshot already
                        has a copy of: the server only looks them up
  origin_write_copy     first origin writes after a snapshot: the server
                        copies each chunk out and commits
  snapshot_read_store   snapshot reads of chunks the snapshot owns
  snapshot_read_locked  snapshot reads of chunks still shared with the
                        origin: a read lock taken, then released with
                        finish (two round trips, both in the latency)
  snapshot_write        first writes into snapshot chunks (copy, commit)
  snapshot_write_data   first small writes (4 KiB, at most half a chunk)
                        into snapshot chunks, bringing their bytes: csnapd
                        lays them into the copy it makes, one commit and
                        no seal
Each is warmed up, then measured in rounds, each bounded by an operation
count and a time limit. Rates and latency percentiles are the median of
the rounds' figures; commit figures are totals over all rounds.

csnapd counts commits and requests (server_info) and, with --metrics as
started here, its fsyncs (csnapd_fsyncs), scraped before and after each
round, so the figures are:
  commits/reply  = commits / replies (a locked read has two replies)
  fsyncs/reply   = the server's fsyncs / replies; when it does not count
                   them, (commits x fsyncs per commit + 2 x checkpoints) /
                   replies, checkpoints being the store's sequence advance
                   minus the commits
  replies/fsync  = its inverse: requests answered per sync
  batch          = replies / commits: requests answered per group commit.
CPU time per reply of the csnapd process (from /proc) and of this load
generator says which side is busy: on a small machine both compete for
the same cores.

One csnapd serves every workload and shape in turn; after each shape, with
its clients still connected, its resident memory (VmRSS) and its peak
since it started (VmHWM) are read from /proc.

Snapshot lifecycle: create latency with 0 and with 8 idle origin clients
connected (the latter includes the create barrier's round trips),
acknowledgement latency of delete, and the background sweep rate after
deleting a snapshot holding N exceptions (status() polled until nothing is
left deleting).

Prints a table; --json FILE writes the same figures. --quick is a smoke
run for CI that takes seconds.
"""

from __future__ import annotations

import argparse
import json
import math
import socket
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import trio

from bench.common import Part, cpu_ns, listening, progress, rss_kib, scrape, scratch_directory
from csnap_client import AdminClient, Connector, DataClient, open_admin, open_client, tcp_connector
from csnap_common.credentials import ROLE_ADMIN, client_context, store_credentials
from csnap_format.mkcsnap import format_store

CHUNK = 4096
#: (clients, requests each keeps in flight): one in flight is the plain
#: measure; 8 clients with 4 each is a gateway's queue depth, and the only
#: shape where a batch can carry more replies than there are clients.
CLIENTS = ((1, 1), (8, 1), (8, 4), (64, 1))
#: Tag of the snapshot the data-path workloads use.
SNAPSHOT = 1
#: Chunks per request when filling regions before measuring.
FILL_REQUEST = 1024


@dataclass(frozen=True)
class Plan:
    """How much to do: the full run or the quick smoke run."""

    rounds: int
    #: Most operations in one round, across all clients.
    count: int
    #: Most seconds one round may take.
    seconds: float
    warmup_count: int
    warmup_seconds: float
    #: Chunks in each region that reads and already-unique writes cycle over.
    region: int
    #: Chunks in each region of fresh chunks that copying workloads use up.
    fresh: int
    #: Create/delete cycles timed for each lifecycle figure.
    cycles: int
    #: Exceptions the snapshot deleted before the sweep holds.
    sweep_exceptions: int


FULL = Plan(
    rounds=5,
    count=40_000,
    seconds=2.0,
    warmup_count=2_000,
    warmup_seconds=0.5,
    region=16_384,
    fresh=150_000,
    cycles=40,
    sweep_exceptions=100_000,
)
QUICK = Plan(
    rounds=1,
    count=300,
    seconds=0.2,
    warmup_count=64,
    warmup_seconds=0.1,
    region=1_024,
    fresh=2_048,
    cycles=4,
    sweep_exceptions=2_048,
)


# -- the server --------------------------------------------------------------


@dataclass(frozen=True)
class Server:
    """A running csnapd: how to reach it, and its process (CPU time, memory, signals)."""

    connect: Connector
    process: trio.Process
    #: "host:port" it listens on.
    address: str
    #: perf_counter_ns when it was spawned and when it said it was listening.
    spawned_ns: int
    listening_ns: int
    #: Its metrics endpoint, when started with --metrics (the fsync counter).
    metrics_url: str | None = None

    def fsyncs(self) -> int | None:
        """fsyncs of the store so far (csnapd_fsyncs), if it serves metrics."""
        return self._counter(("csnapd_fsyncs", "csnapd_fsyncs_total"))

    def requests(self, kind: str) -> int:
        """Requests of type `kind` received so far (csnapd_requests); it must serve metrics."""
        label = f'{{type="{kind}"}}'
        names = (f"csnapd_requests{label}", f"csnapd_requests_total{label}")
        return self._counter(names) or 0

    def _counter(self, names: tuple[str, ...]) -> int | None:
        if self.metrics_url is None:
            return None
        samples = scrape(self.metrics_url)
        for name in names:
            if name in samples:
                return int(samples[name])
        return None

    @property
    def pid(self) -> int:
        return self.process.pid

    def cpu_ns(self) -> int | None:
        """CPU time the server used so far (all its threads), if /proc says."""
        return cpu_ns(self.pid)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@asynccontextmanager
async def csnapd(
    store: Path,
    origin: Path,
    log: Path,
    *options: str,
    metrics: bool = False,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> AsyncIterator[Server]:
    """A real csnapd on loopback; stopped with SIGTERM when the block ends.

    With `metrics`, it serves metrics on a free loopback port, and the
    Server can say how many fsyncs it did. `env` and `cwd`: as for
    bench.common.listening (this checkout, from this directory, by default).
    """
    argv = [sys.executable, "-m", "csnapd", str(store), str(origin), "--listen", "127.0.0.1:0"]
    metrics_url = None
    if metrics:
        metrics_port = free_port()
        options = (*options, "--metrics", f"127.0.0.1:{metrics_port}")
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    async with listening([*argv, *options], log, env=env, cwd=cwd) as started:
        host, _, port = started.said.rpartition(":")
        credentials = client_context(store_credentials(store), ROLE_ADMIN)
        yield Server(
            tcp_connector(host.strip("[]"), int(port), credentials),
            started.process,
            started.said,
            started.spawned_ns,
            started.listening_ns,
            metrics_url,
        )


def make_store(
    directory: Path, name: str, store_bytes: int, origin_bytes: int
) -> tuple[Path, Path]:
    store, origin = directory / f"{name}.store", directory / f"{name}.origin"
    format_store(
        str(store), str(origin), store_size=store_bytes, origin_size=origin_bytes, progress=False
    )
    return store, origin


@dataclass(frozen=True)
class Counters:
    """What the server has done so far, as far as it says."""

    commits: int
    requests: int
    sequence: int


async def counters(admin: AdminClient) -> Counters:
    # Both requests count: between two samples the server counts the
    # workload's requests plus the second sample's two.
    status = await admin.status()
    info = await admin.server_info()
    return Counters(info["commits"], info["requests"], status.store.sequence)


# -- measuring rounds ----------------------------------------------------------


class Chunks:
    """Chunks handed to the clients: a region cycled over, or used up once."""

    def __init__(self, first: int, count: int, *, wrap: bool):
        self.first, self.count, self.wrap = first, count, wrap
        self.used = 0

    def take(self) -> int | None:
        if self.used >= self.count:
            if not self.wrap:
                return None
            self.used = 0
        self.used += 1
        return self.first + self.used - 1


#: One operation on one chunk; returns how many requests (replies) it took.
Operation = Callable[[DataClient, int], Awaitable[int]]


@dataclass
class Round:
    ops: int = 0
    replies: int = 0
    elapsed_ns: int = 0
    latencies_ns: list[int] = field(default_factory=list)
    commits: int = 0
    checkpoints: int = 0
    #: fsyncs of the store, when the server counts them for us.
    fsyncs: int | None = None
    #: CPU time of the server process and of this load generator.
    server_cpu_ns: int | None = None
    client_cpu_ns: int = 0
    #: Requests csnapd itself counted: fewer than the operations when the
    #: client library answered some from what it remembers (known-unique
    #: chunks, owned addresses).
    server_requests: int = 0


async def run_round(
    server: Server,
    admin: AdminClient,
    clients: Sequence[DataClient],
    operation: Operation,
    chunks: Chunks,
    count: int,
    seconds: float,
    depth: int = 1,
) -> Round:
    """Every client runs `operation` back to back, `depth` at a time, until
    the count or time is used."""
    result = Round()
    budget = count
    remembered = _answered_from_memory(clients)
    before = await counters(admin)
    fsyncs_before = await trio.to_thread.run_sync(server.fsyncs)
    server_cpu = server.cpu_ns()
    client_cpu = time.process_time_ns()
    start = time.perf_counter_ns()
    deadline = start + int(seconds * 1e9)

    async def client_loop(client: DataClient) -> None:
        nonlocal budget
        while budget > 0 and time.perf_counter_ns() < deadline:
            chunk = chunks.take()
            if chunk is None:
                return
            budget -= 1
            t0 = time.perf_counter_ns()
            replies = await operation(client, chunk)
            result.latencies_ns.append(time.perf_counter_ns() - t0)
            result.ops += 1
            result.replies += replies

    # A hung server must fail the run, not stall it.
    with trio.fail_after(seconds + 60):
        async with trio.open_nursery() as nursery:
            for client in clients:
                for _ in range(depth):
                    nursery.start_soon(client_loop, client)
    result.elapsed_ns = time.perf_counter_ns() - start
    result.client_cpu_ns = time.process_time_ns() - client_cpu
    server_after = server.cpu_ns()
    if server_cpu is not None and server_after is not None:
        result.server_cpu_ns = server_after - server_cpu
    after = await counters(admin)
    fsyncs_after = await trio.to_thread.run_sync(server.fsyncs)
    if fsyncs_before is not None and fsyncs_after is not None:
        result.fsyncs = fsyncs_after - fsyncs_before
    result.commits = after.commits - before.commits
    # Less the two counter reads of this round.
    result.server_requests = after.requests - before.requests - 2
    result.checkpoints = (after.sequence - before.sequence) - result.commits
    # Every reply csnapd counted, or the client library gave from memory.
    expected = result.replies - (_answered_from_memory(clients) - remembered)
    if result.server_requests != expected:
        print(
            f"warning: server counted {result.server_requests} requests,"
            f" the clients sent {expected}",
            file=sys.stderr,
        )
    return result


def _answered_from_memory(clients: Sequence[DataClient]) -> int:
    """Requests the clients' library answered without csnapd so far."""
    return sum(client.remembered_grants + client.owned_reads for client in clients)


def percentile(values: Sequence[int], fraction: float) -> int:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(fraction * len(ordered)) - 1))]


def figures(rounds: Sequence[Round], fsyncs_per_commit: int) -> dict[str, Any]:
    """A workload's figures over its rounds. fsyncs are the server's count
    when every round has it, else estimated from commits and checkpoints
    with `fsyncs_per_commit`."""
    measured = [r for r in rounds if r.ops]
    assert measured, "no round completed an operation"
    replies = sum(r.replies for r in measured)
    commits = sum(r.commits for r in measured)
    checkpoints = sum(r.checkpoints for r in measured)
    counted = [r.fsyncs for r in measured]
    fsyncs = (
        sum(c or 0 for c in counted)
        if None not in counted
        else commits * fsyncs_per_commit + 2 * checkpoints
    )
    rates = [r.ops / (r.elapsed_ns / 1e9) for r in measured]
    request_rates = [r.server_requests / (r.elapsed_ns / 1e9) for r in measured]
    server_cpu = [r.server_cpu_ns for r in measured]
    return {
        "chunks_per_s": statistics.median(rates),
        # What csnapd itself answered per second (the operations' rate
        # counts those the client answered from memory too).
        "server_requests_per_s": statistics.median(request_rates),
        "p50_ms": statistics.median(percentile(r.latencies_ns, 0.5) / 1e6 for r in measured),
        "p99_ms": statistics.median(percentile(r.latencies_ns, 0.99) / 1e6 for r in measured),
        "commits_per_reply": commits / replies,
        "fsyncs_per_reply": fsyncs / replies,
        "fsyncs_counted": None not in counted,
        "replies_per_fsync": replies / fsyncs if fsyncs else None,
        # No commit, nothing grouped: the batch size is undefined.
        "batch": replies / commits if commits else None,
        "ops": sum(r.ops for r in measured),
        "replies": replies,
        "commits": commits,
        "checkpoints": checkpoints,
        "rounds": len(measured),
        "round_chunks_per_s": rates,
        "round_server_requests_per_s": request_rates,
        # Which side is busy: the server has one core's worth of event loop.
        # Per request csnapd answered (not per operation: some were not its).
        "server_cpu_us_per_reply": None
        if None in server_cpu
        else sum(c or 0 for c in server_cpu)
        / max(1, sum(r.server_requests for r in measured))
        / 1e3,
        "client_cpu_us_per_reply": sum(r.client_cpu_ns for r in measured) / replies / 1e3,
    }


# -- data-path operations ------------------------------------------------------


async def origin_write_unique(client: DataClient, chunk: int) -> int:
    async with client.origin_write([(chunk, 1)]) as granted:
        assert granted.copied == 0, f"chunk {chunk} was copied: not already unique"
    return 1


async def origin_write_copy(client: DataClient, chunk: int) -> int:
    async with client.origin_write([(chunk, 1)]) as granted:
        assert granted.copied == 1, f"chunk {chunk} was not copied out"
    return 1


async def snapshot_read_store(client: DataClient, chunk: int) -> int:
    async with client.snapshot_read([(chunk, 1)]) as plan:
        assert plan.store and not plan.origin, f"chunk {chunk} is not in the store"
    return 1


async def snapshot_read_locked(client: DataClient, chunk: int) -> int:
    async with client.snapshot_read([(chunk, 1)]) as plan:
        assert plan.origin and not plan.store, f"chunk {chunk} is not shared with the origin"
    return 2  # the query and the finish that releases the lock


async def snapshot_write(client: DataClient, chunk: int) -> int:
    async with client.snapshot_write([(chunk, 1)]) as segments:
        assert segments, f"no segment for chunk {chunk}"
    return 1


#: What snapshot_write_data writes: 4 KiB (at most half a chunk), a quarter
#: of the way into its chunk.
DATA_WRITE = bytes(range(256)) * 16


async def snapshot_write_data(client: DataClient, chunk: int) -> int:
    size = client.chunk_size
    data = DATA_WRITE[: size // 2]
    async with client.snapshot_write_data(chunk * size + size // 4, data) as given:
        assert given is None, f"chunk {chunk} was not written by csnapd: it was owned already"
    return 1


@dataclass(frozen=True)
class Workload:
    name: str
    operation: Operation
    #: None: origin clients; else the snapshot tag the clients identify to.
    snapshot: int | None
    #: "region": cycle over pre-filled chunks; "untouched": cycle over chunks
    #: never written; "fresh": use up chunks never written.
    chunks: str
    #: fdatasyncs per commit (Journal.commit), for the estimate when the
    #: server does not count them: one, and one more (the seal) when a
    #: snapshot write's reply hands out the chunk it just copied.
    fsyncs_per_commit: int


WORKLOADS = (
    Workload("origin_write_unique", origin_write_unique, None, "region", 1),
    Workload("origin_write_copy", origin_write_copy, None, "fresh", 1),
    Workload("snapshot_read_store", snapshot_read_store, SNAPSHOT, "region", 1),
    Workload("snapshot_read_locked", snapshot_read_locked, SNAPSHOT, "untouched", 1),
    Workload("snapshot_write", snapshot_write, SNAPSHOT, "fresh", 2),
    Workload("snapshot_write_data", snapshot_write_data, SNAPSHOT, "fresh", 1),
)


@asynccontextmanager
async def data_clients(
    connect: Connector, count: int, snapshot: int | None
) -> AsyncIterator[list[DataClient]]:
    async with AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(
                open_client(connect, snapshot=snapshot, reconnect=False)
            )
            for _ in range(count)
        ]
        yield clients


async def fill(connect: Connector, first: int, count: int) -> None:
    """Copy out chunks first..first+count-1 with large origin writes."""
    async with open_client(connect, reconnect=False) as client:
        step = min(FILL_REQUEST, client.max_chunks)
        for start in range(first, first + count, step):
            async with client.origin_write([(start, min(step, first + count - start))]):
                pass


class Layout:
    """Disjoint origin regions, so that no workload disturbs another's chunks."""

    def __init__(self, plan: Plan):
        self.region = (0, plan.region)  # copied out for the snapshot
        self.untouched = (plan.region, plan.region)  # still shared with the origin
        self.fresh = {
            "origin_write_copy": (2 * plan.region, plan.fresh),
            "snapshot_write": (2 * plan.region + plan.fresh, plan.fresh),
            "snapshot_write_data": (2 * plan.region + 2 * plan.fresh, plan.fresh),
        }
        self.origin_chunks = 2 * plan.region + 3 * plan.fresh

    def chunks(self, workload: Workload) -> Chunks:
        if workload.chunks == "region":
            return Chunks(*self.region, wrap=True)
        if workload.chunks == "untouched":
            return Chunks(*self.untouched, wrap=True)
        return Chunks(*self.fresh[workload.name], wrap=False)


async def data_path(
    directory: Path, plan: Plan, report: Callable[[str, dict[str, Any]], None]
) -> None:
    layout = Layout(plan)
    # Room for every copy plus metadata; both files are sparse.
    store, origin = make_store(
        directory, "data", 2 * layout.origin_chunks * CHUNK, layout.origin_chunks * CHUNK
    )
    async with (
        csnapd(store, origin, directory / "data.log", metrics=True) as server,
        open_admin(server.connect) as admin,
    ):
        await admin.create_snapshot(SNAPSHOT)
        await fill(server.connect, *layout.region)
        for workload in WORKLOADS:
            chunks = layout.chunks(workload)
            for count, depth in CLIENTS:
                async with data_clients(server.connect, count, workload.snapshot) as clients:
                    measure = partial(run_round, server, admin, clients, workload.operation, chunks)
                    await measure(plan.warmup_count, plan.warmup_seconds, depth)
                    rounds = [
                        await measure(plan.count, plan.seconds, depth) for _ in range(plan.rounds)
                    ]
                    # Read with the clients still connected: one csnapd serves
                    # every shape, so its peak (VmHWM) is the peak so far.
                    memory = rss_kib(server.pid)
                figs = figures(rounds, workload.fsyncs_per_commit)
                key = f"{workload.name}_{count}_clients" + (f"_{depth}_deep" if depth > 1 else "")
                report(
                    key,
                    {
                        "clients": count,
                        "depth": depth,
                        **figs,
                        "csnapd_rss_kib": memory.get("VmRSS"),
                        "csnapd_peak_rss_kib": memory.get("VmHWM"),
                    },
                )


# -- snapshot lifecycle --------------------------------------------------------


async def create_delete_cycles(
    admin: AdminClient, cycles: int, first_tag: int
) -> tuple[list[int], list[int]]:
    """Create and delete empty snapshots; their latencies in ns."""
    creates, deletes = [], []
    for tag in range(first_tag, first_tag + cycles):
        t0 = time.perf_counter_ns()
        await admin.create_snapshot(tag)
        t1 = time.perf_counter_ns()
        await admin.delete_snapshot(tag)
        t2 = time.perf_counter_ns()
        creates.append(t1 - t0)
        deletes.append(t2 - t1)
    return creates, deletes


def _latency(values: Sequence[int]) -> dict[str, float]:
    return {"p50_ms": percentile(values, 0.5) / 1e6, "p99_ms": percentile(values, 0.99) / 1e6}


async def lifecycle(directory: Path, plan: Plan) -> dict[str, Any]:
    n = plan.sweep_exceptions
    store, origin = make_store(directory, "life", 2 * n * CHUNK + (64 << 20), n * CHUNK)
    async with (
        csnapd(store, origin, directory / "life.log") as server,
        open_admin(server.connect) as admin,
    ):
        # A snapshot holding n exceptions: creates below happen on a full tree.
        await admin.create_snapshot(SNAPSHOT)
        t0 = time.perf_counter_ns()
        await fill(server.connect, 0, n)
        fill_s = (time.perf_counter_ns() - t0) / 1e9
        await create_delete_cycles(admin, 3, 1000)  # warm-up
        creates_0, deletes = await create_delete_cycles(admin, plan.cycles, 2000)
        async with data_clients(server.connect, 8, None):
            await create_delete_cycles(admin, 3, 3000)
            creates_8, deletes_8 = await create_delete_cycles(admin, plan.cycles, 4000)
        deletes += deletes_8

        before = await admin.status()
        info = await admin.server_info()
        t0 = time.perf_counter_ns()
        await admin.delete_snapshot(SNAPSHOT)
        t1 = time.perf_counter_ns()
        # Polling is a request like any other: it runs between sweep steps.
        with trio.fail_after(600):
            while True:
                status = await admin.status()
                if not status.deleting:
                    break
                await trio.sleep(0.005)
        t2 = time.perf_counter_ns()
        info_after = await admin.server_info()
    swept = before.store.exceptions - status.store.exceptions
    # The delete itself is one commit (nothing else is in flight); the rest swept.
    commits = info_after["commits"] - info["commits"] - 1
    return {
        "create_0_origin_clients": _latency(creates_0),
        "create_8_origin_clients": _latency(creates_8),
        "delete_empty": _latency(deletes),
        "delete_full_ms": (t1 - t0) / 1e6,
        "exceptions": before.store.exceptions,
        "exceptions_swept": swept,
        "sweep_s": (t2 - t1) / 1e9,
        "sweep_exceptions_per_s": swept / ((t2 - t1) / 1e9),
        "sweep_commits": commits,
        "fill_copy_outs_per_s": n / fill_s,
    }


# -- output --------------------------------------------------------------------

_HEADER = (
    "# chunks/s, p50/p99: one chunk per request, latency per operation (locked reads:"
    " query + finish)\n"
    "# fsyncs/reply: the server's own count of its fsyncs (csnapd_fsyncs) per reply\n"
    "# batch = replies / commits ('-': no commits)\n"
    "# cpu us/reply: CPU time of the csnapd process (srv) and of this load generator (gen)\n"
    "# clients NxD: N clients, each keeping D requests in flight (else one)\n"
    "# csnapd/s: requests csnapd itself answered per second (the client library answers"
    " some from memory)\n"
    "# rss/peak MiB: csnapd's resident memory (VmRSS) after the shape and its peak since it"
    " started (VmHWM); one csnapd serves every row, in this order\n"
    f"{'workload':<22} {'clients':>7} {'chunks/s':>10} {'csnapd/s':>9} {'p50 ms':>8} {'p99 ms':>8}"
    f" {'commits/reply':>13} {'fsyncs/reply':>12} {'batch':>7} {'srv cpu':>7} {'gen cpu':>7}"
    f" {'rss MiB':>7} {'peak MiB':>8}"
)


def _mib(kib: int | None) -> str:
    return "-" if kib is None else f"{kib / 1024:.1f}"


def _row(name: str, figs: dict[str, Any]) -> str:
    workload = name.split("_clients")[0].rsplit("_", 1)[0]
    clients = f"{figs['clients']}" + (f"x{figs['depth']}" if figs.get("depth", 1) > 1 else "")
    batch = "-" if figs["batch"] is None else f"{figs['batch']:.1f}"
    server = figs["server_cpu_us_per_reply"]
    return (
        f"{workload:<22} {clients:>7} {figs['chunks_per_s']:>10,.0f}"
        f" {figs['server_requests_per_s']:>9,.0f}"
        f" {figs['p50_ms']:>8.3f} {figs['p99_ms']:>8.3f} {figs['commits_per_reply']:>13.3f}"
        f" {figs['fsyncs_per_reply']:>12.3f} {batch:>7}"
        f" {'-' if server is None else f'{server:.0f}':>7} {figs['client_cpu_us_per_reply']:>7.0f}"
        f" {_mib(figs['csnapd_rss_kib']):>7} {_mib(figs['csnapd_peak_rss_kib']):>8}"
    )


def _lifecycle_lines(figs: dict[str, Any]) -> list[str]:
    def lat(key: str) -> str:
        return f"p50 {figs[key]['p50_ms']:.2f} ms  p99 {figs[key]['p99_ms']:.2f} ms"

    lines = [
        ("snapshot create, 0 origin clients", lat("create_0_origin_clients")),
        ("snapshot create, 8 origin clients", lat("create_8_origin_clients")),
        ("delete ack, empty snapshot", lat("delete_empty")),
        (f"delete ack, {figs['exceptions']:,} exceptions", f"{figs['delete_full_ms']:.2f} ms"),
        (
            "sweep after that delete",
            f"{figs['sweep_exceptions_per_s']:,.0f} exceptions/s ({figs['exceptions_swept']:,}"
            f" in {figs['sweep_s']:.3f} s, {figs['sweep_commits']} commits)",
        ),
    ]
    return [f"{label:<36} {value}" for label, value in lines]


async def run(plan: Plan) -> dict[str, Any]:
    results: dict[str, Any] = {}

    def report(key: str, figs: dict[str, Any]) -> None:
        results[key] = figs
        print(_row(key, figs), flush=True)

    with scratch_directory() as tmp:
        directory = Path(tmp)
        print(_HEADER, flush=True)
        await data_path(directory, plan, report)
        results["snapshot_lifecycle"] = await lifecycle(directory, plan)
        print("\n".join(_lifecycle_lines(results["snapshot_lifecycle"])), flush=True)
    return results


def server_part(directory: Path, *, quick: bool) -> Part:
    """The data-path workloads, for the suite (python -m bench)."""
    results: dict[str, Any] = {}
    rows: list[str] = []

    def report(key: str, figs: dict[str, Any]) -> None:
        results[key] = figs
        rows.append(_row(key, figs))
        progress(rows[-1])

    trio.run(data_path, directory, QUICK if quick else FULL, report)
    peaks = [figs["csnapd_peak_rss_kib"] for figs in results.values()]
    peak = None if None in peaks else max(peaks)
    results["csnapd_peak_rss_kib"] = peak
    rows.append(f"csnapd peak resident memory over the part (VmHWM): {_mib(peak)} MiB")
    return Part(results, "\n".join([_HEADER, *rows]))


def lifecycle_part(directory: Path, *, quick: bool) -> Part:
    """Snapshot create, delete and sweep, for the suite (python -m bench)."""
    figs = trio.run(lifecycle, directory, QUICK if quick else FULL)
    return Part(figs, "\n".join(_lifecycle_lines(figs)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="csnapd metadata-server benchmarks")
    parser.add_argument("--quick", action="store_true", help="a small smoke run")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    results = trio.run(run, QUICK if args.quick else FULL)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
