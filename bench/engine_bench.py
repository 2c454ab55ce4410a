"""Engine benchmarks: copy-outs and lookups per second with 1 and 64 live
snapshots, fsyncs per committed request under group commit, and the cost
of a store holding a million exceptions (resident memory with the default
cache, open time, lookup p99, csnap-check time).

Real files with real fdatasync in a temporary directory. Prints a table;
--json FILE writes the same figures. --quick is a smoke run for CI.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.common import scratch_directory
from csnap_format import decode_superblock, format_blocks, plan_geometry
from csnapd.engine import Engine, FileDevice
from csnapd.engine.check import check_store

CHUNK = 4096


def make_store(directory: Path, store_bytes: int, origin_bytes: int) -> tuple[Path, Path]:
    store, origin = directory / "store", directory / "origin"
    for path, size in ((store, store_bytes), (origin, origin_bytes)):
        with open(path, "wb") as f:
            f.truncate(size)
    g = plan_geometry(
        store_bytes=store_bytes,
        origin_bytes=origin_bytes,
        uuid=os.urandom(16),
        created_ns=time.time_ns(),
    )
    device = FileDevice(store)
    for address, block in format_blocks(g):
        device.write(address * g.block_size, block)
    device.sync()
    device.close()
    return store, origin


def copy_outs(directory: Path, snapshots: int, batch: int, requests: int) -> dict[str, float]:
    """Origin writes of one fresh chunk each, committed `batch` at a time."""
    store, origin = make_store(directory, 1 << 30, 1 << 30)
    engine = Engine.open_files(store, origin)
    for tag in range(snapshots):
        engine.create_snapshot(tag)
    engine.commit()
    device_syncs = engine._store.stats.syncs
    latencies = []
    start = time.perf_counter()
    for first in range(0, requests, batch):
        t0 = time.perf_counter()
        for chunk in range(first, min(first + batch, requests)):
            engine.origin_write([(chunk * 7 % engine.origin_chunks, 1)])
        engine.commit()
        latencies.append(time.perf_counter() - t0)
    elapsed = time.perf_counter() - start
    syncs = engine._store.stats.syncs - device_syncs
    engine.close()
    return {
        "copy_outs_per_s": requests / elapsed,
        "commit_p50_ms": statistics.median(latencies) * 1e3,
        "fsyncs_per_request": syncs / requests,
    }


def lookups(directory: Path, snapshots: int, count: int) -> dict[str, float]:
    """Snapshot reads of chunks that have copies, all metadata cached."""
    store, origin = make_store(directory, 1 << 30, 1 << 30)
    engine = Engine.open_files(store, origin)
    for tag in range(snapshots):
        engine.create_snapshot(tag)
    engine.commit()
    for first in range(0, 20_000, 1000):
        engine.origin_write([(first, 1000)])
        engine.commit()
    start = time.perf_counter()
    for i in range(count):
        engine.snapshot_read(i % snapshots, [(i * 13 % 20_000, 1)])
    elapsed = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(count):
        engine.origin_write([(i * 13 % 20_000, 1)])  # already unique: no copy
    unique = time.perf_counter() - start
    engine.close()
    return {"snapshot_reads_per_s": count / elapsed, "unique_checks_per_s": count / unique}


class _MetadataOnly(FileDevice):
    """A store file whose data area is never written: it stays sparse."""

    def __init__(self, path: Path, data_offset: int):
        super().__init__(path)
        self._data_offset = data_offset

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        if offset < self._data_offset:
            super().write(offset, data)


def build_large(directory: Path, exceptions: int, *, write_data: bool = True) -> tuple[Path, Path]:
    """A store with `exceptions` exceptions across 64 snapshots.

    Without `write_data` the copies are not written to the data area (the
    metadata is the same): for the checkers, which read only metadata, at a
    size whose copies would not fit the disk.
    """
    origin_chunks = exceptions // 64 * 2
    store, origin = make_store(
        directory, (exceptions + 4 * origin_chunks) * CHUNK * 11 // 10, origin_chunks * CHUNK
    )
    if write_data:
        engine = Engine.open_files(store, origin)
    else:
        with open(store, "rb") as f:
            head = f.read(4096)
        g = decode_superblock(head).geometry
        engine = Engine.open(
            _MetadataOnly(store, g.data_start * g.chunk_size),
            FileDevice(origin, writable=False),
        )
    per_round = exceptions // 64
    for tag in range(64):
        engine.create_snapshot(tag)
        engine.commit()
        # Each round copies every other chunk once more, for the new snapshot:
        # requests of 128 chunks (with 64 snapshots a leaf holds only a few
        # chunks' exceptions), committed 16 at a time.
        for first in range(0, 2 * per_round, 256):
            count = min(256, 2 * per_round - first)
            engine.origin_write([(c, 1) for c in range(first, first + count, 2)])
            if first % 4096 == 0:
                engine.commit()
        engine.commit()
    engine.close()
    return store, origin


_PROBE = """
import resource, sys, time, statistics
from csnapd.engine import Engine
t0 = time.perf_counter()
engine = Engine.open_files(sys.argv[1], sys.argv[2])
opened = time.perf_counter() - t0
n = engine.origin_chunks
lat = []
for i in range(0, n, 2):
    t = time.perf_counter()
    engine.snapshot_read(i % 64, [(i, 1)])
    lat.append(time.perf_counter() - t)
lat.sort()
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(opened, lat[len(lat) // 2], lat[int(len(lat) * 0.99)], rss, engine.cached_pages)
engine.close()
"""


def probe_large(store: Path, origin: Path) -> dict[str, float]:
    """Open time, lookup p50/p99 and peak memory of the engine alone, in a fresh process."""
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, str(store), str(origin)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    opened, p50, p99, rss_kib, pages = (float(x) for x in out)
    return {
        "open_s": opened,
        "lookup_p50_us": p50 * 1e6,
        "lookup_p99_us": p99 * 1e6,
        "rss_mib": rss_kib / 1024,
        "cached_pages": pages,
    }


def check_large(store: Path) -> tuple[int, float]:
    """Exceptions found by a full in-process check, and the seconds it took."""
    device = FileDevice(store, writable=False)
    t0 = time.perf_counter()
    report = check_store(device)
    checked = time.perf_counter() - t0
    device.close()
    assert not report.problems, report.problems[:3]
    return report.exceptions, checked


def large_store(directory: Path, exceptions: int) -> dict[str, float]:
    t0 = time.perf_counter()
    store, origin = build_large(directory, exceptions)
    built = time.perf_counter() - t0
    probe = probe_large(store, origin)
    found, checked = check_large(store)
    return {
        "exceptions": found,
        "build_s": built,
        **probe,
        "check_s": checked,
        "check_exceptions_per_s": found / checked,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a small smoke run")
    parser.add_argument("--exceptions", type=int, default=1_000_000)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    requests = 500 if args.quick else 5000
    exceptions = 20_000 if args.quick else args.exceptions
    results: dict[str, object] = {}
    with scratch_directory() as tmp:
        directory = Path(tmp)
        for snapshots in (1, 64):
            for batch in (1, 64):
                key = f"copy_out_{snapshots}_snapshots_batch_{batch}"
                results[key] = copy_outs(directory, snapshots, batch, requests)
                print(key, _fmt(results[key]), flush=True)
            key = f"lookups_{snapshots}_snapshots"
            results[key] = lookups(directory, snapshots, requests * 4)
            print(key, _fmt(results[key]), flush=True)
        results["large_store"] = large_store(directory, exceptions)
        print("large_store", _fmt(results["large_store"]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


def _fmt(figures: object) -> str:
    assert isinstance(figures, dict)
    return "  ".join(
        f"{k}={v:,.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items()
    )


if __name__ == "__main__":
    raise SystemExit(main())
