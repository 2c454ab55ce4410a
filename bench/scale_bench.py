"""Scale: a store holding at least a million exceptions across 64 snapshots,
built directly through the engine (bench.engine_bench.build_large: each
of 64 rounds creates a snapshot and copies every other origin chunk once
more for it), then:

  csnapd       start-up time (spawn to "listening", and to the first
               status reply), resident memory with the default metadata
               cache (VmRSS and peak VmHWM from /proc after the lookups),
               and lookup latency: snapshot reads of chunks the store
               holds, one at a time over loopback, each to a random one
               of the 64 snapshots, covering every such chunk once in a
               shuffled order (p50, p99). Several starts; medians.
  engine       the same lookups in-process, without the protocol
               (bench.engine_bench.probe_large), for comparison.
  csnap-check  the command, timed from spawn to exit, on the stopped store.
  thin_check   the peer (thin-provisioning-tools), on dm-thin metadata
               with the same number of mappings (64 thin devices, one
               mapping per exception, each to its own data block), made
               by thin_restore from generated XML.
  repair       csnap-check --repair on a copy whose btree root is zeroed
               (the scan finds every leaf, the whole tree is rebuilt)
               beside thin_repair rebuilding the dm-thin metadata; once.

The two checkers run alternately, several rounds; the figures are the
median seconds, mappings (exceptions) per second and peak resident memory
(from GNU time), and the ratio of csnap-check's rate to thin_check's. The
page cache is warm for both: the files were just written.
"""

from __future__ import annotations

import json
import random
import subprocess
import time
from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from bench.common import (
    Part,
    console_script,
    find_tool,
    fmt_ratio,
    median,
    missing_tools,
    progress,
    ratio,
    rss_kib,
    table,
)
from bench.engine_bench import build_large, probe_large
from bench.server_bench import csnapd, percentile
from csnap_client import DataClient, open_admin, open_client

SNAPSHOTS = 64


@dataclass(frozen=True)
class Plan:
    exceptions: int
    #: csnapd starts measured (each with a full lookup pass).
    starts: int
    #: Alternating rounds of csnap-check and thin_check.
    check_rounds: int


FULL = Plan(exceptions=1_000_000, starts=3, check_rounds=5)
QUICK = Plan(exceptions=20_000, starts=1, check_rounds=1)


# -- csnapd on the large store -----------------------------------------------------


async def _lookups(clients: Sequence[DataClient], chunks: Sequence[int], seed: int) -> list[int]:
    rng = random.Random(seed)
    order = list(chunks)
    rng.shuffle(order)
    latencies = []
    for chunk in order:
        client = clients[rng.randrange(len(clients))]
        t0 = time.perf_counter_ns()
        async with client.snapshot_read([(chunk, 1)]) as plan:
            assert plan.store and not plan.origin, f"chunk {chunk} is not in the store"
        latencies.append(time.perf_counter_ns() - t0)
    return latencies


async def server_start(store: Path, origin: Path, log: Path, seed: int) -> dict[str, float]:
    """One start of csnapd on the store, a full lookup pass, its memory."""
    async with csnapd(store, origin, log) as server, open_admin(server.connect) as admin:
        status = await admin.status()
        ready_ns = time.perf_counter_ns()
        chunks = range(0, status.store.origin_chunks, 2)
        async with AsyncExitStack() as stack:
            clients = [
                await stack.enter_async_context(
                    open_client(server.connect, snapshot=tag, reconnect=False)
                )
                for tag in range(SNAPSHOTS)
            ]
            latencies = await _lookups(clients, chunks, seed)
        memory = rss_kib(server.pid)
    return {
        "startup_s": (server.listening_ns - server.spawned_ns) / 1e9,
        "ready_s": (ready_ns - server.spawned_ns) / 1e9,
        "lookups": len(latencies),
        "lookup_p50_us": percentile(latencies, 0.5) / 1e3,
        "lookup_p99_us": percentile(latencies, 0.99) / 1e3,
        "rss_mib": memory.get("VmRSS", 0) / 1024,
        "peak_rss_mib": memory.get("VmHWM", 0) / 1024,
    }


# -- checkers ------------------------------------------------------------------------


def timed(
    argv: Sequence[str], scratch: Path, codes: tuple[int, ...] = (0,)
) -> tuple[float, float | None]:
    """Seconds from spawn to exit of one command, and its peak resident MiB.

    The memory comes from GNU time when it is installed: wait4's figure for
    a child of this process would count the Python image it was forked from.
    """
    gnu_time = find_tool("time")
    report = scratch / "maxrss"
    wrapper = [gnu_time, "-f", "%M", "-o", str(report)] if gnu_time else []
    t0 = time.perf_counter()
    done = subprocess.run(
        [*wrapper, *argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False
    )
    elapsed = time.perf_counter() - t0
    if done.returncode not in codes:
        raise RuntimeError(
            f"{' '.join(argv)} exited {done.returncode}: {done.stderr.decode(errors='replace')}"
        )
    if not gnu_time:
        return elapsed, None
    kib = int(report.read_text().split()[-1])
    report.unlink()
    return elapsed, kib / 1024


def thin_xml(path: Path, mappings: int, devices: int = SNAPSHOTS) -> None:
    """dm-thin metadata as thin_dump writes it: `mappings` spread over `devices`."""
    per, extra = divmod(mappings, devices)
    with open(path, "w") as f:
        f.write(
            '<superblock uuid="" time="1" transaction="1" flags="0" version="2"'
            f' data_block_size="128" nr_data_blocks="{mappings}">\n'
        )
        data = 0
        for dev in range(devices):
            count = per + (1 if dev < extra else 0)
            f.write(
                f'  <device dev_id="{dev}" mapped_blocks="{count}" transaction="0"'
                ' creation_time="0" snap_time="0">\n'
            )
            f.writelines(
                f'    <single_mapping origin_block="{2 * i}" data_block="{data + i}" time="0"/>\n'
                for i in range(count)
            )
            data += count
            f.write("  </device>\n")
        f.write("</superblock>\n")


def thin_metadata(directory: Path, mappings: int) -> tuple[Path, float]:
    """Restored dm-thin metadata with `mappings` mappings, and thin_restore's seconds."""
    xml, meta = directory / "thin.xml", directory / "thin.meta"
    thin_xml(xml, mappings)
    with open(meta, "wb") as f:
        # Sparse; about 32 bytes of metadata per mapping is used.
        f.truncate(max(64 << 20, mappings * 256))
    restore = find_tool("thin_restore")
    assert restore is not None
    seconds, _ = timed([restore, "-i", str(xml), "-o", str(meta)], directory)
    xml.unlink()
    return meta, seconds


def checkers(
    directory: Path, store: Path, meta: Path | None, rounds: int
) -> dict[str, dict[str, list[Any]]]:
    check = find_tool("thin_check")
    runs: dict[str, dict[str, list[Any]]] = {"csnap": {"s": [], "mib": []}}
    argv = {"csnap": [*console_script("csnap-check"), str(store)]}
    if meta is not None and check is not None:
        runs["thin"] = {"s": [], "mib": []}
        argv["thin"] = [check, str(meta)]
    for number in range(rounds):
        order = list(argv) if number % 2 == 0 else list(reversed(argv))
        for name in order:
            seconds, mib = timed(argv[name], directory)
            runs[name]["s"].append(seconds)
            runs[name]["mib"].append(mib)
            progress(f"scale check round {number + 1}/{rounds} {name}: {seconds:.2f} s")
    return runs


def _root(store: Path) -> tuple[int, int]:
    """The btree root's block and the block size, from the superblock."""
    with open(store, "rb") as f:
        head = f.read(4096)
    block_size = int.from_bytes(head[80:84], "little")
    return int.from_bytes(head[512 + 8 : 512 + 16], "little"), block_size


def repairs(directory: Path, store: Path, meta: Path | None) -> dict[str, dict[str, Any]]:
    """csnap-check --repair with the btree's root zeroed (every leaf found by
    the scan, the whole tree rebuilt) beside thin_repair rebuilding the
    dm-thin metadata into a new file."""
    damaged = directory / "scale-damaged.img"
    subprocess.run(["cp", "--sparse=always", str(store), str(damaged)], check=True)
    root, block_size = _root(damaged)
    with open(damaged, "r+b") as f:
        f.seek(root * block_size)
        f.write(bytes(block_size))
    out: dict[str, dict[str, Any]] = {}
    seconds, mib = timed(
        [*console_script("csnap-check"), "--repair", str(damaged)], directory, (1,)
    )
    out["csnap"] = {"seconds": seconds, "peak_rss_mib": mib}
    progress(f"scale repair csnap-check: {seconds:.2f} s")
    damaged.unlink()
    repair = find_tool("thin_repair")
    if meta is not None and repair is not None:
        rebuilt = directory / "thin.repaired"
        with open(rebuilt, "wb") as f:
            f.truncate(meta.stat().st_size)
        seconds, mib = timed([repair, "-i", str(meta), "-o", str(rebuilt)], directory)
        out["thin"] = {"seconds": seconds, "peak_rss_mib": mib}
        progress(f"scale repair thin_repair: {seconds:.2f} s")
        rebuilt.unlink()
    return out


# -- the part --------------------------------------------------------------------------


def scale_part(directory: Path, *, quick: bool) -> Part:
    plan = QUICK if quick else FULL
    progress(f"scale: building a store of {plan.exceptions:,} exceptions through the engine")
    t0 = time.perf_counter()
    store, origin = build_large(directory, plan.exceptions)
    built = time.perf_counter() - t0
    engine = probe_large(store, origin)
    starts = []
    for number in range(plan.starts):
        figs = trio.run(server_start, store, origin, directory / "scale.log", number)
        starts.append(figs)
        progress(f"scale csnapd start {number + 1}/{plan.starts}: {figs}")
    server = {k: median([s[k] for s in starts]) for k in starts[0]}
    exceptions = _exceptions(store)
    skipped = {}
    reason = missing_tools("thin_check", "thin_restore")
    meta = None
    restore_s = None
    if reason is None:
        meta, restore_s = thin_metadata(directory, exceptions)
    else:
        skipped["thin_check"] = reason
    runs = checkers(directory, store, meta, plan.check_rounds)
    checks: dict[str, dict[str, Any]] = {}
    for name, values in runs.items():
        seconds = median(values["s"])
        checks[name] = {
            "seconds": seconds,
            "mappings_per_s": exceptions / seconds,
            "peak_rss_mib": None if None in values["mib"] else median(values["mib"]),
            "round_seconds": values["s"],
        }
    check_ratio = ratio(
        checks["csnap"]["mappings_per_s"], checks.get("thin", {}).get("mappings_per_s")
    )
    repaired = repairs(directory, store, meta)
    figures: dict[str, Any] = {
        "exceptions": exceptions,
        "snapshots": SNAPSHOTS,
        "build_s": built,
        "server": {**server, "starts": starts},
        "engine": engine,
        "csnap_check": checks["csnap"],
        "thin_check": checks.get("thin"),
        "thin_restore_s": restore_s,
        "check_ratio": check_ratio,
        "csnap_repair": repaired["csnap"],
        "thin_repair": repaired.get("thin"),
        "skipped": skipped,
    }
    rows: list[list[Any]] = [
        ["store built through the engine (s)", built],
        ["csnapd start to listening (s)", server["startup_s"]],
        ["csnapd start to first reply (s)", server["ready_s"]],
        ["csnapd RSS after lookups, default cache (MiB)", server["rss_mib"]],
        ["csnapd peak RSS (MiB)", server["peak_rss_mib"]],
        ["lookup p50 over loopback (us)", server["lookup_p50_us"]],
        ["lookup p99 over loopback (us)", server["lookup_p99_us"]],
        ["engine open (s)", engine["open_s"]],
        ["engine lookup p50 in-process (us)", engine["lookup_p50_us"]],
        ["engine lookup p99 in-process (us)", engine["lookup_p99_us"]],
        ["csnap-check (s)", checks["csnap"]["seconds"]],
        ["csnap-check mappings/s", checks["csnap"]["mappings_per_s"]],
        ["csnap-check peak RSS (MiB)", checks["csnap"]["peak_rss_mib"]],
    ]
    if "thin" in checks:
        rows += [
            ["thin_check (s)", checks["thin"]["seconds"]],
            ["thin_check mappings/s", checks["thin"]["mappings_per_s"]],
            ["thin_check peak RSS (MiB)", checks["thin"]["peak_rss_mib"]],
            ["csnap-check / thin_check, mappings/s", fmt_ratio(check_ratio)],
        ]
    rows += [
        ["csnap-check --repair, root lost (s)", repaired["csnap"]["seconds"]],
        ["csnap-check --repair peak RSS (MiB)", repaired["csnap"]["peak_rss_mib"]],
    ]
    if "thin" in repaired:
        rows += [
            ["thin_repair (s)", repaired["thin"]["seconds"]],
            ["thin_repair peak RSS (MiB)", repaired["thin"]["peak_rss_mib"]],
        ]
    notes = [
        f"{exceptions:,} exceptions across {SNAPSHOTS} snapshots; medians of {plan.starts}"
        f" csnapd starts and {plan.check_rounds} alternating checker rounds",
    ]
    notes += [f"skipped {s}: {why}" for s, why in skipped.items()]
    return Part(figures, table(["figure", "value"], rows, notes=notes), skipped)


def _exceptions(store: Path) -> int:
    out = subprocess.run(
        [*console_script("csnap-check"), "--json", str(store)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    count: int = json.loads(out)["btree"]["exceptions"]
    return count
