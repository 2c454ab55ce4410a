"""Recovery: how long csnapd takes from start to ready after a crash with a
full journal, against a clean start of the same store.

One round, for each journal size, on a freshly formatted store (4 KiB
chunks, sparse origin):
  1. csnapd starts, a snapshot is created, and 16 origin clients write
     chunks, so that each write copies its chunk out, one chunk per
     request, never the same chunk twice, so that every group commit
     writes a journal transaction;
  2. once the journal has wrapped (its last slot, zero after mkcsnap, has
     been written: slots are written in order, so every one holds part of
     a transaction), and 0.1 s more, csnapd gets SIGKILL with requests in
     flight;
  3. commit records in the journal are counted (the slots recovery must
     decode), then csnapd starts again on the store: the time from spawn to
     "listening" (journal scanned and replayed, store open) and to the
     first status reply (ready), and what it says it replayed;
  4. SIGTERM, then a clean start of the same store, timed the same way;
  5. csnap-check must find the store clean.
Figures are medians over rounds. The Python start-up floor (interpreter
plus csnapd's imports, nothing opened) is measured once for comparison.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from bench.common import PYTHON_ENV, Part, console_script, median, progress, table
from bench.server_bench import Server, counters, csnapd, data_clients
from csnap_client import (
    ClientClosedError,
    ConnectionLostError,
    DataClient,
    ServerError,
    open_admin,
)
from csnap_format import BlockType, Geometry
from csnap_format.constants import MAGIC
from csnap_format.mkcsnap import format_store

CHUNK = 4096
CLIENTS = 16
#: How a commit record starts its block (docs/format.md).
COMMIT_HEAD = MAGIC + int(BlockType.COMMIT).to_bytes(2, "little")
#: Errors a load client sees when its server is killed under it.
GONE = (
    ConnectionLostError,
    ClientClosedError,
    ServerError,
    OSError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
)


@dataclass(frozen=True)
class Plan:
    rounds: int
    #: Journal sizes in bytes (None: mkcsnap's default).
    journals: tuple[int | None, ...]
    origin_chunks: int


FULL = Plan(rounds=3, journals=(None, 64 << 20), origin_chunks=1 << 18)
QUICK = Plan(rounds=1, journals=(256 << 10,), origin_chunks=1 << 13)


def _slot_written(store: Path, address: int, size: int) -> bool:
    """Whether the block at `address` holds anything (mkcsnap leaves it zero)."""
    with open(store, "rb") as f:
        f.seek(address * size)
        return any(f.read(size))


async def _load_until_wrapped(server: Server, store: Path, g: Geometry) -> dict[str, Any]:
    """Copy-outs from CLIENTS clients until the journal's last slot is written; SIGKILL."""
    last_slot = g.journal_start + g.journal_blocks - 1
    async with open_admin(server.connect) as admin:
        await admin.create_snapshot(1)
        before = await counters(admin)
        next_chunk = 0
        copied = 0

        async def client_loop(client: DataClient) -> None:
            nonlocal next_chunk, copied
            with suppress(*GONE):
                while next_chunk < g.origin_chunks:
                    chunk, next_chunk = next_chunk, next_chunk + 1
                    async with client.origin_write([(chunk, 1)]):
                        pass
                    copied += 1

        async with (
            data_clients(server.connect, CLIENTS, None) as clients,
            trio.open_nursery() as nursery,
        ):
            for client in clients:
                nursery.start_soon(client_loop, client)
            with trio.fail_after(600):
                while not _slot_written(store, last_slot, g.block_size):
                    await trio.sleep(0.02)
                    if next_chunk >= g.origin_chunks:
                        raise RuntimeError("the origin ran out before the journal wrapped")
            # The journal writes its slots in order: the last one written
            # means every one was. A little more load lands the kill
            # somewhere in the second pass.
            await trio.sleep(0.1)
            now = await counters(admin)
            server.process.send_signal(signal.SIGKILL)
            await server.process.wait()
    return {"copied_before_kill": copied, "commits_before_kill": now.commits - before.commits}


def _journal_records(store: Path, start: int, blocks: int, size: int) -> int:
    with open(store, "rb") as f:
        f.seek(start * size)
        raw = f.read(blocks * size)
    return sum(1 for at in range(0, len(raw), size) if raw[at : at + 6] == COMMIT_HEAD)


def _log_size(log: Path) -> int:
    return log.stat().st_size if log.exists() else 0


def _log_since(log: Path, mark: int) -> str:
    with open(log, "rb") as f:
        f.seek(mark)
        return f.read().decode(errors="replace")


async def _timed_start(store: Path, origin: Path, log: Path) -> dict[str, Any]:
    mark = _log_size(log)
    async with csnapd(store, origin, log) as server, open_admin(server.connect) as admin:
        info = await admin.server_info()
        ready_ns = time.perf_counter_ns()
    said = _log_since(log, mark)
    found = re.search(r"replayed (\d+) transactions \((\d+) blocks\)", said)
    return {
        "listening_s": (server.listening_ns - server.spawned_ns) / 1e9,
        "ready_s": (ready_ns - server.spawned_ns) / 1e9,
        "state": info["state"],
        "replayed_transactions": int(found.group(1)) if found else None,
        "replayed_blocks": int(found.group(2)) if found else None,
    }


async def crash_round(directory: Path, plan: Plan, journal: int | None) -> dict[str, Any]:
    store, origin = directory / "recovery.store", directory / "recovery.origin"
    for path in (store, origin):
        path.unlink(missing_ok=True)
    made = format_store(
        str(store),
        str(origin),
        store_size=2 * plan.origin_chunks * CHUNK + (64 << 20) + (journal or 0),
        origin_size=plan.origin_chunks * CHUNK,
        journal_size=journal,
        progress=False,
    )
    g = made.geometry
    log = directory / "recovery.log"
    async with csnapd(store, origin, log) as server:
        load = await _load_until_wrapped(server, store, g)
    records = _journal_records(store, g.journal_start, g.journal_blocks, g.block_size)
    crashed = await _timed_start(store, origin, log)
    clean = await _timed_start(store, origin, log)
    checked = await trio.run_process(
        [*console_script("csnap-check"), str(store)], capture_stdout=True, check=False
    )
    store.unlink()
    origin.unlink()
    return {
        "journal_bytes": g.journal_blocks * g.block_size,
        **load,
        "journal_commit_records": records,
        "after_crash": crashed,
        "clean": clean,
        "check_clean": checked.returncode == 0,
    }


def python_floor() -> float:
    """Seconds to start Python and import csnapd's server, opening nothing."""
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", "import csnapd.cli, csnapd.server"], check=True, env=PYTHON_ENV
    )
    return time.perf_counter() - t0


def recovery_part(directory: Path, *, quick: bool) -> Part:
    plan = QUICK if quick else FULL
    floor = median([python_floor() for _ in range(3)])
    results: dict[str, Any] = {"python_import_floor_s": floor, "journals": {}}
    rows: list[list[Any]] = []
    for journal in plan.journals:
        runs = []
        for number in range(plan.rounds):
            run = trio.run(crash_round, directory, plan, journal)
            runs.append(run)
            progress(f"recovery journal {journal} round {number + 1}/{plan.rounds}: {run}")
        size = runs[0]["journal_bytes"]
        figs: dict[str, Any] = {
            "journal_bytes": size,
            "journal_commit_records": int(median([r["journal_commit_records"] for r in runs])),
            "copied_before_kill": int(median([r["copied_before_kill"] for r in runs])),
            "crash_listening_s": median([r["after_crash"]["listening_s"] for r in runs]),
            "crash_ready_s": median([r["after_crash"]["ready_s"] for r in runs]),
            "clean_listening_s": median([r["clean"]["listening_s"] for r in runs]),
            "clean_ready_s": median([r["clean"]["ready_s"] for r in runs]),
            "replayed_transactions": [r["after_crash"]["replayed_transactions"] for r in runs],
            "state_after_crash": [r["after_crash"]["state"] for r in runs],
            "check_clean": all(r["check_clean"] for r in runs),
            "rounds": runs,
        }
        figs["recovery_extra_s"] = figs["crash_ready_s"] - figs["clean_ready_s"]
        results["journals"][str(size)] = figs
        rows.append(
            [
                f"{size >> 20} MiB" if size >= 1 << 20 else f"{size >> 10} KiB",
                figs["journal_commit_records"],
                figs["crash_listening_s"],
                figs["crash_ready_s"],
                figs["clean_ready_s"],
                figs["recovery_extra_s"],
                "/".join(str(x) for x in figs["replayed_transactions"]),
                figs["check_clean"],
            ]
        )
    notes = [
        f"SIGKILL under {CLIENTS}-client copy-out load once the journal wrapped;"
        f" medians of {plan.rounds} rounds",
        f"Python start-up and csnapd imports alone: {floor:.3f} s",
    ]
    headers = [
        "journal",
        "commit records",
        "crash: listening s",
        "crash: ready s",
        "clean: ready s",
        "recovery extra s",
        "replayed txns",
        "check clean",
    ]
    return Part(results, table(headers, rows, notes=notes))
