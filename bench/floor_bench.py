"""The event loop's floor: what one request and its reply cost a trio server
that does nothing else, beside what they cost csnapd.

Three servers on loopback, each in its own process:

  echo              a trio server on the transport csnapd uses (DirectStream,
                    plaintext) that sends every message straight back: the
                    cost of waking for a socket, reading it and writing to
                    it, with no decoding, dispatch, engine or encoding
  csnapd plaintext  csnapd without TLS (bench.plaintext_csnapd)
  csnapd TLS        csnapd as it always runs

The echo clients send messages of the size of a one-chunk snapshot read
query; csnapd's clients (csnap_client) send those queries, for chunks the
snapshot owns in the store (answered from the btree, no commit). With 1
and 8 clients, one message in flight each, in rounds bounded in count and
time that alternate between the three servers, so that drift of the
machine falls on all alike; each server's CPU time per reply comes from
/proc. csnapd's own work per request is its figure less the echo's: what
decoding, dispatch, the engine's lookup and encoding cost, with TLS or
without.

  python -m bench.floor_bench [--quick] [--json FILE]
  python -m bench.floor_bench --serve    (the echo server: prints
                                           "listening 127.0.0.1:PORT")
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import trio

from bench.common import Part, cpu_ns, listening, progress, scratch_directory, table
from bench.server_bench import (
    CHUNK,
    FULL,
    QUICK,
    SNAPSHOT,
    Chunks,
    Plan,
    Round,
    Server,
    csnapd,
    data_clients,
    fill,
    make_store,
    run_round,
    snapshot_read_store,
)
from bench.tls_bench import plaintext_csnapd
from csnap_client import open_admin
from csnap_transport.direct import DirectStream

__all__ = ["floor_part"]

CLIENTS = (1, 8)
#: Bytes of each echo message: a one-chunk query_snapshot_read in its frame.
MESSAGE = 32
SERVERS = ("echo", "csnapd_plaintext", "csnapd_tls")


# -- the echo server -------------------------------------------------------------


async def _echo(stream: trio.SocketStream) -> None:
    direct = DirectStream(stream)
    try:
        while data := await direct.receive_some():
            if not direct.send_now(data):
                await direct.flush()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await direct.aclose()


async def serve() -> None:
    """Echo on a free loopback port until SIGTERM."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    print(f"listening 127.0.0.1:{port}", flush=True)
    await trio.serve_listeners(_echo, listeners)


@dataclass
class EchoServer:
    port: int
    process: trio.Process


@asynccontextmanager
async def echo_server(log: Path) -> AsyncIterator[EchoServer]:
    argv = [sys.executable, "-m", "bench.floor_bench", "--serve"]
    async with listening(argv, log) as started:
        yield EchoServer(int(started.said.rpartition(":")[2]), started.process)


def server_cpu_ns(process: trio.Process) -> int:
    """CPU time the echo server used so far; it must still be running."""
    used = cpu_ns(process.pid)
    if used is None:
        raise RuntimeError(f"the echo server (pid {process.pid}) is gone")
    return used


# -- measuring -------------------------------------------------------------------


@dataclass
class Measured:
    """One round against one server: messages answered, its CPU time, the wall time."""

    replies: int
    server_cpu_ns: int
    elapsed_ns: int

    @property
    def cpu_us_per_reply(self) -> float:
        return self.server_cpu_ns / max(1, self.replies) / 1e3

    @property
    def replies_per_s(self) -> float:
        return self.replies / (self.elapsed_ns / 1e9)


async def echo_round(
    server: EchoServer, streams: list[trio.SocketStream], count: int, seconds: float
) -> Measured:
    """Every stream sends a message and waits for it back, until the count or time is used."""
    budget = count
    replies = 0
    message = bytes(MESSAGE)
    before = server_cpu_ns(server.process)
    start = time.perf_counter_ns()
    deadline = start + int(seconds * 1e9)

    async def loop(stream: trio.SocketStream) -> None:
        nonlocal budget, replies
        while budget > 0 and time.perf_counter_ns() < deadline:
            budget -= 1
            await stream.send_all(message)
            got = 0
            while got < MESSAGE:
                data = await stream.receive_some(MESSAGE - got)
                if not data:
                    raise RuntimeError("the echo server closed a connection")
                got += len(data)
            replies += 1

    with trio.fail_after(seconds + 60):
        async with trio.open_nursery() as nursery:
            for stream in streams:
                nursery.start_soon(loop, stream)
    elapsed = time.perf_counter_ns() - start
    return Measured(replies, server_cpu_ns(server.process) - before, elapsed)


async def csnapd_round(
    measure: Callable[[int, float], Awaitable[Round]], count: int, seconds: float
) -> Measured:
    measured = await measure(count, seconds)
    # run_round's own two counter reads are requests too: left out here.
    assert measured.server_cpu_ns is not None, "csnapd's CPU time is read from /proc"
    return Measured(measured.server_requests, measured.server_cpu_ns, measured.elapsed_ns)


async def compare(directory: Path, plan: Plan) -> dict[str, Any]:
    region = plan.region
    results: dict[str, Any] = {"message_bytes": MESSAGE}
    async with AsyncExitStack() as stack:
        echo = await stack.enter_async_context(echo_server(directory / "echo.log"))
        servers: dict[str, Server] = {}
        for name, start in (("csnapd_plaintext", plaintext_csnapd), ("csnapd_tls", csnapd)):
            store, origin = make_store(directory, name, 4 * region * CHUNK, region * CHUNK)
            server = await stack.enter_async_context(
                start(store, origin, directory / f"{name}.log")
            )
            async with open_admin(server.connect) as admin:
                await admin.create_snapshot(SNAPSHOT)
            await fill(server.connect, 0, region)
            servers[name] = server
        for count in CLIENTS:
            async with AsyncExitStack() as clients_stack:
                streams = []
                for _ in range(count):
                    stream = await trio.open_tcp_stream("127.0.0.1", echo.port)
                    clients_stack.push_async_callback(stream.aclose)
                    streams.append(stream)
                rounds: dict[str, Callable[[int, float], Awaitable[Measured]]] = {
                    "echo": partial(echo_round, echo, streams)
                }
                for name, server in servers.items():
                    admin = await clients_stack.enter_async_context(open_admin(server.connect))
                    clients = await clients_stack.enter_async_context(
                        data_clients(server.connect, count, SNAPSHOT)
                    )
                    chunks = Chunks(0, region, wrap=True)
                    measure = partial(
                        run_round, server, admin, clients, snapshot_read_store, chunks
                    )
                    rounds[name] = partial(csnapd_round, measure)
                measured: dict[str, list[Measured]] = {name: [] for name in SERVERS}
                for number in range(plan.rounds + 1):  # the first is warm-up
                    order = SERVERS if number % 2 else tuple(reversed(SERVERS))
                    for name in order:
                        if number == 0:
                            await rounds[name](plan.warmup_count, plan.warmup_seconds)
                        else:
                            measured[name].append(await rounds[name](plan.count, plan.seconds))
            figs = {
                name: {
                    "cpu_us_per_reply": statistics.median(m.cpu_us_per_reply for m in ms),
                    "replies_per_s": statistics.median(m.replies_per_s for m in ms),
                    "replies": sum(m.replies for m in ms),
                }
                for name, ms in measured.items()
            }
            floor = figs["echo"]["cpu_us_per_reply"]
            for name in ("csnapd_plaintext", "csnapd_tls"):
                figs[name]["own_us_per_reply"] = figs[name]["cpu_us_per_reply"] - floor
            results[f"{count}_clients"] = figs
            progress(f"floor: {count} client(s): {render_row(figs)}")
    return results


def render_row(figs: dict[str, Any]) -> str:
    return ", ".join(f"{name} {figs[name]['cpu_us_per_reply']:.1f} us" for name in SERVERS)


def render(results: dict[str, Any]) -> str:
    rows: list[list[Any]] = []
    for count in CLIENTS:
        figs = results[f"{count}_clients"]
        rows.append(
            [
                f"{count} client{'s' if count > 1 else ''}, server CPU us per reply",
                figs["echo"]["cpu_us_per_reply"],
                figs["csnapd_plaintext"]["cpu_us_per_reply"],
                figs["csnapd_tls"]["cpu_us_per_reply"],
            ]
        )
        rows.append(
            [
                "  replies/s",
                figs["echo"]["replies_per_s"],
                figs["csnapd_plaintext"]["replies_per_s"],
                figs["csnapd_tls"]["replies_per_s"],
            ]
        )
        rows.append(
            [
                "  csnapd's own us per reply (less the echo's)",
                None,
                figs["csnapd_plaintext"]["own_us_per_reply"],
                figs["csnapd_tls"]["own_us_per_reply"],
            ]
        )
    notes = [
        f"echo: trio + DirectStream, plaintext, {MESSAGE}-byte messages;"
        " csnapd: one-chunk snapshot reads of owned chunks; one in flight per client"
    ]
    return table(["", "echo", "csnapd plaintext", "csnapd TLS"], rows, notes=notes)


def floor_part(directory: Path, *, quick: bool) -> Part:
    """For the suite (python -m bench)."""
    results = trio.run(compare, directory, QUICK if quick else FULL)
    return Part(results, render(results))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="the event loop's floor per request, beside csnapd's cost per lookup"
    )
    parser.add_argument("--quick", action="store_true", help="a small smoke run")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--serve", action="store_true", help="run the echo server only")
    args = parser.parse_args(argv)
    if args.serve:
        trio.run(serve)
        return 0
    with scratch_directory() as tmp:
        part = floor_part(Path(tmp), quick=args.quick)
    print(part.table)
    if args.json:
        Path(args.json).write_text(json.dumps(part.figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
