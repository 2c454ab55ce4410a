"""Changes: the changelist over a million exceptions, and the size and speed of deltas.

  changelist  a store of a million exceptions across 64 snapshots (built as
              for the scale part: each round creates a snapshot and copies
              every other origin chunk once more for it), then, in a fresh
              process, the whole changelist between two snapshots and
              between a snapshot and the origin, in answers of at most
              MAX_RANGES runs: seconds, exceptions walked per second, and
              peak resident memory (against the same process before the
              walk).
  delta       a store whose origin had every other chunk rewritten between
              snapshots 1 and 2 (the worst case for extents: each changed
              chunk is an extent of its own), csnapd running: `csnap delta`'s
              work (csnap_delta.write_delta over loopback) timed and its
              bytes per changed chunk against the chunk size, without and
              with compression; then applying it to an image of snapshot 1.

python -m bench.changes_bench [--quick] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import trio

from bench.common import Part, median, progress, run_tool, scratch_directory, table
from bench.common import listening as listening_process
from bench.engine_bench import CHUNK, build_large, make_store
from bench.server_bench import Server, csnapd
from csnap_common.credentials import (
    ROLE_ADMIN,
    client_context,
    server_context,
    store_credentials,
)
from csnap_delta import apply_delta, write_delta
from csnap_delta.transfer import send_delta, serve_receive
from csnapd.engine import Engine

_WALK = """
import resource, sys, time
from csnapd.engine import Engine
engine = Engine.open_files(sys.argv[1], sys.argv[2])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
base = None if sys.argv[3] == "origin" else int(sys.argv[3])
target = int(sys.argv[4])
n = engine.origin_chunks
t0 = time.perf_counter()
start, runs, chunks, answers = 0, 0, 0, 0
while start is not None:
    answer = engine.changes(base, target, start, n - start, max_runs=8192)
    runs += len(answer.runs)
    chunks += sum(count for _, count in answer.runs)
    answers += 1
    start = answer.next
elapsed = time.perf_counter() - t0
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(elapsed, runs, chunks, answers, before, after)
engine.close()
"""


def walk(store: Path, origin: Path, base: str, target: int) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", _WALK, str(store), str(origin), base, str(target)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    elapsed, runs, chunks, answers, before, after = (float(x) for x in out)
    return {
        "seconds": elapsed,
        "runs": runs,
        "chunks": chunks,
        "answers": answers,
        "rss_before_mib": before / 1024,
        "peak_rss_mib": after / 1024,
    }


def changed_store(directory: Path, chunks: int) -> tuple[Path, Path, int]:
    """Snapshot 1, every other origin chunk rewritten, snapshot 2; the changed count."""
    store, origin = make_store(directory, chunks * CHUNK * 3, chunks * CHUNK)
    with open(origin, "r+b") as f:
        for _ in range(chunks):
            f.write(os.urandom(CHUNK // 2) + bytes(CHUNK // 2))
    # Snapshot 1's image, kept for the apply.
    (directory / "snap-1.raw").write_bytes(origin.read_bytes())
    engine = Engine.open_files(store, origin)
    engine.create_snapshot(1)
    engine.commit()
    changed = list(range(0, chunks, 2))
    fd = os.open(origin, os.O_WRONLY)
    try:
        for first in range(0, len(changed), 256):
            part = changed[first : first + 256]
            engine.origin_write([(c, 1) for c in part])
            engine.commit()
            for chunk in part:
                os.pwrite(fd, os.urandom(CHUNK // 2) + bytes(CHUNK // 2), chunk * CHUNK)
        os.fsync(fd)
    finally:
        os.close(fd)
    engine.create_snapshot(2)
    engine.close()
    return store, origin, len(changed)


async def deltas(directory: Path, chunks: int, rounds: int) -> dict[str, Any]:
    store, origin, changed = changed_store(directory, chunks)
    image = directory / "snap-1.raw"
    figures: dict[str, Any] = {"changed_chunks": changed, "chunk_size": CHUNK}
    async with csnapd(store, origin, directory / "csnapd.log") as server:
        for compressed in (False, True):
            name = "compressed" if compressed else "plain"
            output = directory / f"{name}.delta"
            seconds = []
            for _ in range(rounds):
                t0 = time.perf_counter()
                report = await write_delta(
                    server.connect, server.connect, 1, 2, output, compressed=compressed
                )
                seconds.append(time.perf_counter() - t0)
            size = output.stat().st_size
            figures[name] = {
                "seconds": median(seconds),
                "mib_per_s": report.data_bytes / median(seconds) / (1 << 20),
                "file_bytes": size,
                "bytes_per_changed_chunk": size / changed,
                "per_chunk_size": size / changed / CHUNK,
            }
        figures["transfer"] = await transfer(directory, server, origin)
    # Snapshot 1's image plus the delta is snapshot 2, which is the origin
    # (it did not change after snapshot 2 was taken).
    plain = directory / "plain.delta"
    t0 = time.perf_counter()
    applied = apply_delta(plain, image)
    figures["apply_s"] = time.perf_counter() - t0
    figures["apply_mib_per_s"] = applied.chunks * CHUNK / figures["apply_s"] / (1 << 20)
    if image.read_bytes() != origin.read_bytes():
        raise AssertionError("snapshot 1's image plus the delta is not snapshot 2")
    return figures


def replica_store(replica: Path, image: Path, delta: Path) -> tuple[Path, Path, int]:
    """A store whose origin is `image` and which holds snapshot 1 of it; the delta's size."""
    replica.mkdir()
    (replica / "spool").mkdir()
    size = image.stat().st_size
    store, origin = make_store(replica, size * 3, size)
    shutil.copyfile(image, origin)
    engine = Engine.open_files(store, origin)
    engine.create_snapshot(1)
    engine.close()
    return store, origin, delta.stat().st_size


async def transfer(directory: Path, server: Server, origin: Path) -> dict[str, Any]:
    """csnap send / receive of the delta 1 -> 2 into a replica, beside nbdcopy of snapshot 2.

    The replica's origin is snapshot 1's image and it holds snapshot 1.
    """
    replica = directory / "replica"
    store_b, origin_b, delta_bytes = replica_store(
        replica, directory / "snap-1.raw", directory / "plain.delta"
    )
    plain = directory / "plain.delta"
    spool = replica / "spool"
    figures: dict[str, Any] = {"delta_bytes": delta_bytes}
    async with csnapd(store_b, origin_b, replica / "csnapd.log") as receiver:
        ready = trio.Event()
        where: list[str] = []

        def listening(address: str) -> None:
            where.append(address)
            ready.set()

        t0 = time.perf_counter()
        async with trio.open_nursery() as nursery:

            async def serve() -> None:
                await serve_receive(
                    ("127.0.0.1", 0), spool, receiver.connect, receiver.connect,
                    tls=server_context(store_credentials(store_b)), listening=listening,
                )  # fmt: skip

            nursery.start_soon(serve)
            await ready.wait()
            host, _, port = where[0].rpartition(":")
            admin = client_context(store_credentials(store_b), ROLE_ADMIN)
            await send_delta(plain, host, int(port), tls=admin)
        seconds = time.perf_counter() - t0
        figures["send_receive_s"] = seconds
        figures["send_receive_mib_per_s"] = delta_bytes / seconds / (1 << 20)
    if shutil.which("nbdcopy") is None:
        figures["nbdcopy_skipped"] = "nbdcopy is not installed (libnbd-bin)"
        return figures
    sock = directory / "nbd.sock"
    gateway = [sys.executable, "-m", "csnap_nbd", "--unix", str(sock), "--log-level", "warning"]
    store_a = directory / "store"
    async with listening_process(
        [*gateway, "--server", server.address, "--origin", str(origin), "--store", str(store_a)],
        directory / "nbd.log",
    ):
        copy = directory / "full-copy.raw"
        t0 = time.perf_counter()
        await run_tool(["nbdcopy", f"nbd+unix:///snap-2?socket={sock}", str(copy)])
        seconds = time.perf_counter() - t0
    size = (await trio.Path(copy).stat()).st_size
    await trio.Path(copy).unlink()
    figures["nbdcopy_full_s"] = seconds
    figures["nbdcopy_full_mib_per_s"] = size / seconds / (1 << 20)
    return figures


def changes_part(directory: Path, *, quick: bool) -> Part:
    exceptions = 20_000 if quick else 1_000_000
    progress(f"changes: building a store of {exceptions:,} exceptions through the engine")
    large = directory / "large"
    large.mkdir(parents=True, exist_ok=True)
    store, origin = build_large(large, exceptions)
    between = walk(store, origin, "0", 63)
    from_origin = walk(store, origin, "origin", 0)
    progress(f"changes: changelist walks {between} {from_origin}")
    small = directory / "small"
    small.mkdir(parents=True, exist_ok=True)
    delta = trio.run(deltas, small, 2048 if quick else 32768, 1 if quick else 3)
    figures: dict[str, Any] = {
        "exceptions": exceptions,
        "changelist_between_snapshots": {
            **between,
            "exceptions_per_s": exceptions / between["seconds"],
        },
        "changelist_from_origin": {
            **from_origin,
            "exceptions_per_s": exceptions / from_origin["seconds"],
        },
        "delta": delta,
    }
    rows: list[list[Any]] = [
        ["changelist snapshot 0 -> 63 (s)", between["seconds"]],
        ["  exceptions walked per s", exceptions / between["seconds"]],
        ["  chunks listed / answers", f"{between['chunks']:.0f} / {between['answers']:.0f}"],
        ["  RSS after open / peak (MiB)", f"{between['rss_before_mib']:.1f} / "
         f"{between['peak_rss_mib']:.1f}"],
        ["changelist origin -> snapshot 0 (s)", from_origin["seconds"]],
        ["delta write, plain (MiB/s of chunk data)", delta["plain"]["mib_per_s"]],
        ["delta bytes per changed chunk / chunk size", delta["plain"]["per_chunk_size"]],
        ["delta write, zstd (MiB/s)", delta["compressed"]["mib_per_s"]],
        ["zstd delta bytes per changed chunk / chunk size",
         delta["compressed"]["per_chunk_size"]],
        ["apply onto snapshot 1's image (MiB/s of chunk data)", delta["apply_mib_per_s"]],
        ["send + receive into a replica (s)", delta["transfer"]["send_receive_s"]],
        ["  MiB/s of delta", delta["transfer"]["send_receive_mib_per_s"]],
        ["nbdcopy of all of snapshot 2 (s)", delta["transfer"].get("nbdcopy_full_s", "skipped")],
        ["  MiB/s", delta["transfer"].get("nbdcopy_full_mib_per_s", "skipped")],
    ]  # fmt: skip
    notes = [
        f"changelist: {exceptions:,} exceptions across 64 snapshots, answers of at most"
        " 8192 runs, in a fresh process",
        f"delta: {delta['changed_chunks']:,} changed chunks of {CHUNK} bytes, every other"
        " chunk (one extent each: the most overhead per chunk), half of each chunk random",
    ]
    return Part(figures, table(["figure", "value"], rows, notes=notes))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.changes_bench")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", default=None, metavar="FILE")
    args = parser.parse_args(argv)
    with scratch_directory() as tmp:
        part = changes_part(Path(tmp), quick=args.quick)
    print(part.table)
    if args.json:
        Path(args.json).write_text(json.dumps(part.figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
