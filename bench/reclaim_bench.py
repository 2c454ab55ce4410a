"""Reclaim: what deleting or squashing a snapshot costs, against what it owns.

A store built through the engine on real files (fdatasync included; the
data area is never written, so it stays sparse: every figure here is the
metadata's) holds `exceptions` exceptions: a background snapshot owning
most of them, one snapshot owning 1/64 of them (every 64th chunk) and one
owning a single exception. Cases (--case, all by default):

  engine   each of the two deleted and its space reclaimed to the end in
           the engine's bounded sweep steps, the way csnapd runs them under
           load (csnapd.sweep_schedule): after a step of d seconds, lookups
           of other clients (snapshot reads of the background snapshot,
           in-process: the engine's own cost without the protocol) for
           d * (1 / BUSY_SHARE - 1), then the next step;
  csnapd   the 1/64 snapshot deleted through a real csnapd while
           CSNAPD_CLIENTS snapshot clients look chunks of the background
           snapshot up over loopback, one request in flight each: their
           rate and latency before the delete (idle) and from the delete
           until the space is free (during), in one run of one server;
  squash   on a fresh store filled to its last 64 chunks, an origin write
           that needs room squashes the 1/64 snapshot and waits for its
           space.

Figures per case: the acknowledgement (delete and its commit), the time
until the space is free (the sweep to its end), the commits that took,
the sweep steps, the leaves visited, the longest step (the longest pause
for every other client), and the lookup rate and p99 while the reclaim
runs beside the idle ones.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import trio

from bench.common import Part, progress, table
from bench.engine_bench import _MetadataOnly, make_store
from bench.server_bench import csnapd, percentile
from csnap_client import DataClient, open_admin, open_client
from csnap_format import decode_superblock
from csnapd.engine import Engine, FileDevice
from csnapd.sweep_schedule import BUSY_SHARE

CHUNK = 4096
BACKGROUND, SIXTY_FOURTH, SINGLE, FILLER = 1, 2, 3, 4


#: The cases a run may take (--case): in-process deletes, the 1/64 delete
#: through csnapd beside its clients, the squash for a full store.
CASES = ("engine", "csnapd", "squash")
#: Snapshot clients that look chunks up through csnapd, one request in flight each.
CSNAPD_CLIENTS = 8


@dataclass(frozen=True)
class Plan:
    exceptions: int
    #: Seconds of lookups through csnapd before the delete (the idle figures).
    idle_seconds: float = 3.0
    #: Most seconds the reclaim through csnapd may take before the run fails.
    reclaim_limit: float = 900.0


FULL = Plan(exceptions=1_000_000)
QUICK = Plan(exceptions=20_000, idle_seconds=0.5, reclaim_limit=120.0)


def _open_metadata_only(store: Path, origin: Path) -> Engine:
    """The engine on `store`, its data area never written (it stays sparse):
    the metadata is the same, the build writes a fraction of the bytes and
    leaves the page cache to the metadata."""
    with open(store, "rb") as f:
        geometry = decode_superblock(f.read(4096)).geometry
    return Engine.open(
        _MetadataOnly(store, geometry.data_start * geometry.chunk_size),
        FileDevice(origin, writable=False),
    )


def build(directory: Path, exceptions: int) -> tuple[Path, Path, int]:
    """The store: background, 1/64 and single-exception snapshots; origin chunks.

    Only the metadata is written: every figure here is the metadata's.
    """
    for old in directory.iterdir():
        if old.name in ("store", "origin"):
            old.unlink()
    origin_chunks = exceptions
    store_chunks = exceptions + exceptions // 64 + 4096
    store, origin = make_store(directory, store_chunks * CHUNK * 105 // 100, origin_chunks * CHUNK)
    engine = _open_metadata_only(store, origin)
    engine.create_snapshot(BACKGROUND)
    engine.commit()
    for first in range(0, origin_chunks, 4096):
        engine.origin_write([(first, min(4096, origin_chunks - first))])
        engine.commit()
    engine.create_snapshot(SIXTY_FOURTH)
    engine.commit()
    spread = list(range(0, origin_chunks, 64))
    for first in range(0, len(spread), 1024):
        engine.origin_write([(c, 1) for c in spread[first : first + 1024]])
        engine.commit()
    engine.create_snapshot(SINGLE)
    engine.origin_write([(origin_chunks // 2 + 1, 1)])
    engine.commit()
    engine.close()
    return store, origin, origin_chunks


def _lookups(
    engine: Engine, rng: random.Random, chunks: int, count: int, latencies: list[float]
) -> None:
    for _ in range(count):
        t0 = time.perf_counter()
        engine.snapshot_read(BACKGROUND, [(rng.randrange(chunks), 1)])
        latencies.append(time.perf_counter() - t0)


def p99_ms(latencies: list[float]) -> float:
    """The 99th percentile of `latencies`, in milliseconds."""
    if not latencies:
        return 0.0
    ordered = sorted(latencies)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1e3


def idle_rate(engine: Engine, chunks: int, seconds: float = 1.0) -> tuple[float, float]:
    """Lookups per second and their p99 (ms) with nothing else running."""
    rng = random.Random(1)
    latencies: list[float] = []
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        _lookups(engine, rng, chunks, 64, latencies)
        done += 64
    return done / (time.perf_counter() - t0), p99_ms(latencies)


def reclaim(engine: Engine, chunks: int) -> dict[str, float]:
    """Sweep to the end, lookups between steps on csnapd's busy schedule; the figures."""
    rng = random.Random(2)
    commits, steps, lookups, longest = engine.stats.commits, 0, 0, 0.0
    visited = engine.stats.sweep_leaves
    latencies: list[float] = []
    gap = 0.0
    t0 = time.perf_counter()
    while engine.sweep_pending:
        # Clients' turn: as long as the sweep's share says, one lookup at least.
        until = time.perf_counter() + gap
        while True:
            _lookups(engine, rng, chunks, 1, latencies)
            lookups += 1
            if time.perf_counter() >= until:
                break
        s0 = time.perf_counter()
        engine.sweep()
        engine.commit()
        step = time.perf_counter() - s0
        # A lookup that arrives during a step waits for all of it (csnapd
        # answers nobody meanwhile): one per step pays the step's length.
        latencies[-1] += step
        longest = max(longest, step)
        gap = step * (1 / BUSY_SHARE - 1)
        steps += 1
    seconds = time.perf_counter() - t0
    return {
        "free_s": seconds,
        "commits": engine.stats.commits - commits,
        "steps": steps,
        "leaves_visited": engine.stats.sweep_leaves - visited,
        "longest_step_ms": longest * 1e3,
        "lookups_per_s": lookups / seconds if seconds else 0.0,
        "lookup_p99_ms": p99_ms(latencies),
    }


def delete_case(engine: Engine, tag: int, chunks: int) -> dict[str, float]:
    info = engine.snapshot(tag)
    owned = info.unique_chunks + info.shared_chunks
    t0 = time.perf_counter()
    engine.delete_snapshot(tag)
    engine.commit()
    ack = time.perf_counter() - t0
    figures = reclaim(engine, chunks)
    return {"owned": owned, "ack_s": ack, **figures}


def squash_case(engine: Engine, chunks: int) -> dict[str, float]:
    """Fill the store, then an origin write that must squash the 1/64 snapshot."""
    # Only the 1/64 snapshot is expendable.
    engine.change_use_count(BACKGROUND, 1)
    engine.change_use_count(SINGLE, 1)
    engine.create_snapshot(FILLER)
    engine.commit()
    # Copy chunks for FILLER until fewer than 64 are free.
    first = 1
    while engine.status().data_free > 64 and first < chunks:
        count = min(1024, engine.status().data_free - 64, chunks - first)
        engine.origin_write([(first, count)], reclaim=False)
        engine.commit()
        first += count
    engine.change_use_count(FILLER, 1)
    engine.commit()
    info = engine.snapshot(SIXTY_FOURTH)
    owned = info.unique_chunks + info.shared_chunks
    commits, visited = engine.stats.commits, engine.stats.sweep_leaves
    want = min(256, chunks - first)
    t0 = time.perf_counter()
    engine.origin_write([(first, want)])
    engine.commit()
    served = time.perf_counter() - t0
    squashed = [s.tag for s in engine.take_squashed()]
    assert squashed == [SIXTY_FOURTH], squashed
    after = reclaim(engine, chunks)
    return {
        "owned": owned,
        "write_chunks": want,
        "write_served_s": served,
        "write_commits": engine.stats.commits - commits - after["commits"],
        "write_leaves_visited": engine.stats.sweep_leaves - visited - after["leaves_visited"],
        "rest_free_s": after["free_s"],
        "rest_commits": after["commits"],
    }


async def _csnapd_lookups(
    client: DataClient,
    rng: random.Random,
    chunks: int,
    samples: list[tuple[float, float]],
    stop: trio.Event,
) -> None:
    """Snapshot reads of the background snapshot, one in flight, until `stop`:
    (start, seconds) of each."""
    while not stop.is_set():
        t0 = time.perf_counter()
        async with client.snapshot_read([(rng.randrange(chunks), 1)]) as plan:
            assert plan.store and not plan.origin, "a background chunk is not in the store"
        samples.append((t0, time.perf_counter() - t0))


def _window(samples: list[tuple[float, float]], *spans: tuple[float, float]) -> dict[str, float]:
    """Lookups that started in any of the [start, end) spans: their rate and latency."""
    latencies = [
        int(seconds * 1e9)
        for t0, seconds in samples
        if any(start <= t0 < end for start, end in spans)
    ]
    length = sum(end - start for start, end in spans)
    if not latencies or length <= 0:
        return {"lookups": 0, "lookups_per_s": 0.0, "p50_ms": 0.0, "p99_ms": 0.0, "max_ms": 0.0}
    return {
        "lookups": len(latencies),
        "lookups_per_s": len(latencies) / length,
        "p50_ms": percentile(latencies, 0.5) / 1e6,
        "p99_ms": percentile(latencies, 0.99) / 1e6,
        "max_ms": max(latencies) / 1e6,
    }


async def csnapd_case(directory: Path, store: Path, origin: Path, plan: Plan) -> dict[str, Any]:
    """The 1/64 delete through csnapd while CSNAPD_CLIENTS clients look up
    chunks of the background snapshot: their rate and latency for
    `plan.idle_seconds` before the delete and as long after the space is
    free (idle: both windows together; each alone too) and from the delete
    until the space is free (during), in one run of one csnapd."""
    chunks = plan.exceptions
    samples: list[tuple[float, float]] = []
    stop = trio.Event()
    async with (
        csnapd(store, origin, directory / "csnapd.log") as server,
        open_admin(server.connect) as admin,
        AsyncExitStack() as stack,
    ):
        clients = [
            await stack.enter_async_context(
                open_client(server.connect, snapshot=BACKGROUND, reconnect=False, owned_map=False)
            )
            for _ in range(CSNAPD_CLIENTS)
        ]
        owned = next(s for s in (await admin.status()).snapshots if s.tag == SIXTY_FOURTH)
        async with trio.open_nursery() as nursery:
            for n, client in enumerate(clients):
                nursery.start_soon(_csnapd_lookups, client, random.Random(n), chunks, samples, stop)
            # Warm the cache and the connections, then the idle window.
            await trio.sleep(min(1.0, plan.idle_seconds))
            idle_start = time.perf_counter()
            await trio.sleep(plan.idle_seconds)
            info = await admin.server_info()
            delete_start = time.perf_counter()
            await admin.delete_snapshot(SIXTY_FOURTH)
            acknowledged = time.perf_counter()
            # Polling is a request like the lookups: it waits behind steps too.
            with trio.fail_after(plan.reclaim_limit):
                while True:
                    status = await admin.status()
                    if not status.deleting:
                        break
                    await trio.sleep(0.02)
            freed = time.perf_counter()
            info_after = await admin.server_info()
            # Idle again after it: the machine's load moves over minutes,
            # and idle on both sides of a long reclaim is the fairer measure.
            await trio.sleep(plan.idle_seconds)
            after_end = time.perf_counter()
            stop.set()
    assert all(s.tag != SIXTY_FOURTH for s in status.snapshots), "the slot is still taken"
    return {
        "clients": CSNAPD_CLIENTS,
        "owned": owned.unique_chunks + owned.shared_chunks,
        "ack_s": acknowledged - delete_start,
        "free_s": freed - delete_start,
        # Less the delete's own commit; the status polls commit nothing.
        "commits": info_after["commits"] - info["commits"] - 1,
        "idle": _window(samples, (idle_start, delete_start), (freed, after_end)),
        "idle_before": _window(samples, (idle_start, delete_start)),
        "idle_after": _window(samples, (freed, after_end)),
        "during": _window(samples, (delete_start, freed)),
    }


def run(directory: Path, plan: Plan, cases: tuple[str, ...] = CASES) -> dict[str, Any]:
    figs: dict[str, Any] = {}
    if "engine" in cases:
        progress(f"reclaim: building a store of {plan.exceptions:,} exceptions")
        t0 = time.perf_counter()
        store, origin, chunks = build(directory, plan.exceptions)
        figs["build_s"] = time.perf_counter() - t0
        engine = _open_metadata_only(store, origin)
        figs["exceptions"] = engine.status().exceptions
        figs["idle_lookups_per_s"], figs["idle_lookup_p99_ms"] = idle_rate(engine, chunks)
        figs["delete_single"] = delete_case(engine, SINGLE, chunks)
        progress(f"reclaim: delete of one exception: {figs['delete_single']}")
        figs["delete_sixty_fourth"] = delete_case(engine, SIXTY_FOURTH, chunks)
        progress(f"reclaim: delete of 1/64: {figs['delete_sixty_fourth']}")
        engine.close()
    if "csnapd" in cases:
        progress(f"reclaim: building a store of {plan.exceptions:,} exceptions for csnapd")
        t0 = time.perf_counter()
        store, origin, chunks = build(directory, plan.exceptions)
        figs["build_s"] = time.perf_counter() - t0
        engine = _open_metadata_only(store, origin)
        figs["exceptions"] = engine.status().exceptions
        engine.close()
        figs["csnapd_delete_sixty_fourth"] = trio.run(csnapd_case, directory, store, origin, plan)
        progress(f"reclaim: delete of 1/64 through csnapd: {figs['csnapd_delete_sixty_fourth']}")
    if "squash" in cases:
        # On a fresh copy of the store.
        store, origin, chunks = build(directory, plan.exceptions)
        engine = _open_metadata_only(store, origin)
        figs["squash_sixty_fourth"] = squash_case(engine, chunks)
        progress(f"reclaim: squash of 1/64 for an origin write: {figs['squash_sixty_fourth']}")
        engine.close()
    return figs


def _rows(figs: dict[str, Any]) -> list[list[Any]]:
    rows: list[list[Any]] = [["exceptions in the store", figs["exceptions"]]]
    if "idle_lookups_per_s" in figs:
        rows += [
            ["lookups/s, idle", figs["idle_lookups_per_s"]],
            ["lookup p99, idle (ms)", figs["idle_lookup_p99_ms"]],
        ]
    for key, name in (("delete_single", "delete 1"), ("delete_sixty_fourth", "delete 1/64")):
        if key not in figs:
            continue
        case = figs[key]
        rows += [
            [f"{name}: exceptions carrying its bit", case["owned"]],
            [f"{name}: acknowledged (s)", case["ack_s"]],
            [f"{name}: space free after (s)", case["free_s"]],
            [f"{name}: commits", case["commits"]],
            [f"{name}: leaves visited", case["leaves_visited"]],
            [f"{name}: longest step (ms)", case["longest_step_ms"]],
            [f"{name}: lookups/s meanwhile", case["lookups_per_s"]],
            [f"{name}: lookup p99 meanwhile (ms)", case["lookup_p99_ms"]],
        ]
    if "csnapd_delete_sixty_fourth" in figs:
        case = figs["csnapd_delete_sixty_fourth"]
        idle, during = case["idle"], case["during"]
        name = f"csnapd, {case['clients']} lookup clients, delete 1/64"
        rows += [
            [f"{name}: exceptions carrying its bit", case["owned"]],
            [f"{name}: acknowledged (s)", case["ack_s"]],
            [f"{name}: space free after (s)", case["free_s"]],
            [f"{name}: commits", case["commits"]],
            [f"{name}: lookups/s idle", idle["lookups_per_s"]],
            [f"{name}: lookups/s meanwhile", during["lookups_per_s"]],
            [f"{name}: lookup p99 idle (ms)", idle["p99_ms"]],
            [f"{name}: lookup p99 meanwhile (ms)", during["p99_ms"]],
            [f"{name}: slowest lookup idle (ms)", idle["max_ms"]],
            [f"{name}: slowest lookup meanwhile (ms)", during["max_ms"]],
        ]
    if "squash_sixty_fourth" in figs:
        squash = figs["squash_sixty_fourth"]
        rows += [
            ["squash 1/64 for a full store: write served (s)", squash["write_served_s"]],
            ["squash 1/64: commits before the write was served", squash["write_commits"]],
            ["squash 1/64: leaves visited before it was served", squash["write_leaves_visited"]],
            ["squash 1/64: rest of the space free after (s)", squash["rest_free_s"]],
        ]
    return rows


def reclaim_part(directory: Path, *, quick: bool) -> Part:
    """Delete and squash reclaim cost, for the suite (python -m bench)."""
    figs = run(directory, QUICK if quick else FULL)
    notes = [
        "engine in-process on real files (metadata only); lookups between sweep steps for"
        f" {1 / BUSY_SHARE - 1:g} times the last step",
        f"csnapd: {CSNAPD_CLIENTS} snapshot clients over loopback, one lookup in flight each",
    ]
    return Part(figs, table(["figure", "value"], _rows(figs), notes=notes))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="csnap reclaim benchmark")
    parser.add_argument("--quick", action="store_true", help="a small smoke run")
    parser.add_argument("--exceptions", type=int, help="exceptions in the store")
    parser.add_argument(
        "--case",
        action="append",
        choices=CASES,
        help=f"run only this case (repeatable): {', '.join(CASES)}",
    )
    parser.add_argument(
        "--reclaim-limit",
        type=float,
        metavar="SECONDS",
        help="most seconds the reclaim through csnapd may take before the run fails"
        " (default: 900 per million exceptions, 900 at least)",
    )
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.exceptions:
        plan = Plan(
            exceptions=args.exceptions,
            reclaim_limit=max(900.0, 900.0 * args.exceptions / 1_000_000),
        )
    if args.reclaim_limit:
        plan = replace(plan, reclaim_limit=args.reclaim_limit)
    cases = tuple(args.case) if args.case else CASES
    import tempfile

    with tempfile.TemporaryDirectory(prefix="csnap-reclaim-") as tmp:
        figs = run(Path(tmp), plan, cases)
    print(table(["figure", "value"], _rows(figs)))
    if args.json:
        Path(args.json).write_text(json.dumps(figs, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
