"""Reclaim: what deleting or squashing a snapshot costs, against what it owns.

A store built through the engine on real files (fdatasync included) holds
`exceptions` exceptions: a background snapshot owning most of them, one
snapshot owning 1/64 of them (every 64th chunk) and one owning a single
exception. Each of the two is then deleted, and its space reclaimed to the
end, in the engine's bounded sweep steps, the way csnapd runs them under
load: one step after every `LOOKUPS_BETWEEN` lookups of other clients
(snapshot reads of the background snapshot, in-process: the engine's own
cost without the protocol). And once more with the store full: an origin
write that needs room squashes the 1/64 snapshot and waits for its space.

Figures per case: the acknowledgement (delete and its commit), the time
until the space is free (the sweep to its end), the commits that took,
the sweep steps, the leaves visited, the longest step (the longest pause
for every other client), and the lookup rate while the reclaim runs
beside the idle rate. The figures are the engine's: csnapd adds the
protocol on top, and pauses its clients for each step the same way.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import Part, progress, table
from bench.engine_bench import make_store
from csnapd.engine import Engine

CHUNK = 4096
#: Lookups of other clients between two sweep steps (csnapd: one step at
#: least every 8 batches under load).
LOOKUPS_BETWEEN = 8
BACKGROUND, SIXTY_FOURTH, SINGLE, FILLER = 1, 2, 3, 4


@dataclass(frozen=True)
class Plan:
    exceptions: int


FULL = Plan(exceptions=1_000_000)
QUICK = Plan(exceptions=20_000)


def build(directory: Path, exceptions: int) -> tuple[Path, Path, int]:
    """The store: background, 1/64 and single-exception snapshots; origin chunks."""
    origin_chunks = exceptions
    store_chunks = exceptions + exceptions // 64 + 4096
    store, origin = make_store(directory, store_chunks * CHUNK * 105 // 100, origin_chunks * CHUNK)
    engine = Engine.open_files(store, origin)
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
    """Sweep to the end, lookups between steps; the figures."""
    rng = random.Random(2)
    commits, steps, lookups, longest = engine.stats.commits, 0, 0, 0.0
    visited = engine.stats.sweep_leaves
    latencies: list[float] = []
    t0 = time.perf_counter()
    while engine.sweep_pending:
        _lookups(engine, rng, chunks, LOOKUPS_BETWEEN, latencies)
        lookups += LOOKUPS_BETWEEN
        s0 = time.perf_counter()
        engine.sweep()
        engine.commit()
        step = time.perf_counter() - s0
        # A lookup that arrives during a step waits for all of it (csnapd
        # answers nobody meanwhile): one per step pays the step's length.
        latencies[-1] += step
        longest = max(longest, step)
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


def run(directory: Path, plan: Plan) -> dict[str, Any]:
    progress(f"reclaim: building a store of {plan.exceptions:,} exceptions")
    t0 = time.perf_counter()
    store, origin, chunks = build(directory, plan.exceptions)
    built = time.perf_counter() - t0
    engine = Engine.open_files(store, origin)
    exceptions = engine.status().exceptions
    idle, idle_p99 = idle_rate(engine, chunks)
    single = delete_case(engine, SINGLE, chunks)
    progress(f"reclaim: delete of one exception: {single}")
    sixty_fourth = delete_case(engine, SIXTY_FOURTH, chunks)
    progress(f"reclaim: delete of 1/64: {sixty_fourth}")
    engine.close()
    # The squash case on a fresh copy of the store.
    store, origin, chunks = build(directory, plan.exceptions)
    engine = Engine.open_files(store, origin)
    squash = squash_case(engine, chunks)
    progress(f"reclaim: squash of 1/64 for an origin write: {squash}")
    engine.close()
    return {
        "exceptions": exceptions,
        "build_s": built,
        "idle_lookups_per_s": idle,
        "idle_lookup_p99_ms": idle_p99,
        "delete_single": single,
        "delete_sixty_fourth": sixty_fourth,
        "squash_sixty_fourth": squash,
    }


def _rows(figs: dict[str, Any]) -> list[list[Any]]:
    rows: list[list[Any]] = [
        ["exceptions in the store", figs["exceptions"]],
        ["lookups/s, idle", figs["idle_lookups_per_s"]],
        ["lookup p99, idle (ms)", figs["idle_lookup_p99_ms"]],
    ]
    for key, name in (("delete_single", "delete 1"), ("delete_sixty_fourth", "delete 1/64")):
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
        f"engine in-process on real files; {LOOKUPS_BETWEEN} lookups between sweep steps",
    ]
    return Part(figs, table(["figure", "value"], _rows(figs), notes=notes))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="csnap reclaim benchmark")
    parser.add_argument("--quick", action="store_true", help="a small smoke run")
    parser.add_argument("--exceptions", type=int, help="exceptions in the store")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.exceptions:
        plan = Plan(exceptions=args.exceptions)
    import tempfile

    with tempfile.TemporaryDirectory(prefix="csnap-reclaim-") as tmp:
        figs = run(Path(tmp), plan)
    print(table(["figure", "value"], _rows(figs)))
    if args.json:
        Path(args.json).write_text(json.dumps(figs, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
