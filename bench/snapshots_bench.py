"""First-write cost against the number of live snapshots, through a real
csnapd over loopback: 16 origin clients (one request in flight each, so
queue depth 16), one chunk per request.

One round, on a freshly formatted store (4 KiB chunks, origin filled with
data so that copies read real blocks):
  0 snapshots  the fixed set of `writes` chunks written once: no snapshot,
               so nothing is copied (the lookup-only baseline);
  then for k = 1, 2, 4, ..., 64: create snapshots until k are live (the
  newest last), and write the same set of chunks again. Each write is the
  first to its chunk since the newest snapshot, so the server copies the
  chunk once, shared by every snapshot created since the previous pass,
  and adds an exception beside the ones the older snapshots hold.
The time of each pass is from the first request sent to the last reply;
chunks copied per write come from the store's own accounting: data chunks
free before and after the pass (status), times the chunk size, over the
writes. It must be one chunk per write whatever k is. Metadata blocks
used per write come the same way.

Rounds repeat the whole sweep on a new store; figures are medians per k,
and the ratio of each k's time to that of k = 1.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import trio

from bench.common import Part, fill_file, fmt_ratio, median, progress, table
from bench.server_bench import (
    Chunks,
    csnapd,
    data_clients,
    figures,
    make_store,
    origin_write_copy,
    origin_write_unique,
    run_round,
)
from csnap_client import AdminClient, open_admin

CHUNK = 4096
LEVELS = (1, 2, 4, 8, 16, 32, 64)
CLIENTS = 16


@dataclass(frozen=True)
class Plan:
    rounds: int
    writes: int


FULL = Plan(rounds=3, writes=8192)
QUICK = Plan(rounds=1, writes=256)


async def _store(admin: AdminClient) -> dict[str, Any]:
    return asdict((await admin.status()).store)


async def sweep(directory: Path, plan: Plan, number: int) -> dict[int, dict[str, Any]]:
    n = plan.writes
    # Room for one copy of every chunk per pass, plus metadata.
    store, origin = make_store(
        directory, f"snaps{number}", (len(LEVELS) + 1) * n * CHUNK + (64 << 20), n * CHUNK
    )
    fill_file(origin, n * CHUNK, 0x3C)
    out: dict[int, dict[str, Any]] = {}
    async with (
        csnapd(store, origin, directory / "snaps.log", "--log-level", "warning") as server,
        open_admin(server.connect) as admin,
        data_clients(server.connect, CLIENTS, None) as clients,
    ):
        live = 0
        for k in (0, *LEVELS):
            while live < k:
                live += 1
                await admin.create_snapshot(live)
            operation = origin_write_copy if k else origin_write_unique
            before = await _store(admin)
            chunks = Chunks(0, n, wrap=False)
            done = await run_round(server, admin, clients, operation, chunks, n, 600)
            after = await _store(admin)
            figs = figures([done], 1)  # a copy-out commit syncs once
            out[k] = {
                "seconds": done.elapsed_ns / 1e9,
                "writes_per_s": figs["chunks_per_s"],
                "p50_ms": figs["p50_ms"],
                "p99_ms": figs["p99_ms"],
                "batch": figs["batch"],
                "copied_bytes_per_write": (before["data_free"] - after["data_free"]) * CHUNK / n,
                "metadata_blocks_per_write": (before["meta_free"] - after["meta_free"]) / n,
                "exceptions": after["exceptions"],
            }
            progress(f"snapshots round {number + 1}/{plan.rounds} k={k}: {out[k]}")
    store.unlink()
    origin.unlink()
    return out


def snapshots_part(directory: Path, *, quick: bool) -> Part:
    plan = QUICK if quick else FULL
    rounds = [trio.run(sweep, directory, plan, number) for number in range(plan.rounds)]
    levels: dict[int, dict[str, Any]] = {}
    for k in (0, *LEVELS):
        runs = [r[k] for r in rounds]
        levels[k] = {
            key: median([r[key] for r in runs])
            for key in runs[0]
            if all(r[key] is not None for r in runs)
        }
        levels[k]["round_seconds"] = [r["seconds"] for r in runs]
    base = levels[1]["seconds"]
    for k in LEVELS:
        levels[k]["time_vs_1_snapshot"] = levels[k]["seconds"] / base
    rows = [
        [
            f"{k}" if k else "0 (no copy)",
            levels[k]["seconds"],
            levels[k]["writes_per_s"],
            levels[k]["p50_ms"],
            levels[k]["p99_ms"],
            levels[k].get("batch"),
            levels[k]["copied_bytes_per_write"],
            levels[k]["metadata_blocks_per_write"],
            fmt_ratio(levels[k].get("time_vs_1_snapshot")) if k else "-",
        ]
        for k in (0, *LEVELS)
    ]
    notes = [
        f"{plan.writes:,} first writes of one {CHUNK // 1024} KiB chunk each after the newest"
        f" snapshot, {CLIENTS} clients; medians of {plan.rounds} rounds",
        "copied bytes and metadata blocks per write: from the store's free counts",
    ]
    headers = [
        "snapshots",
        "time s",
        "writes/s",
        "p50 ms",
        "p99 ms",
        "batch",
        "copied B/write",
        "meta blk/write",
        "time vs k=1",
    ]
    figs: dict[str, Any] = {
        "writes": plan.writes,
        "chunk_bytes": CHUNK,
        "clients": CLIENTS,
        "rounds": plan.rounds,
        "levels": {str(k): v for k, v in levels.items()},
        "time_64_vs_1": levels[64]["time_vs_1_snapshot"],
    }
    return Part(figs, table(headers, rows, notes=notes))
