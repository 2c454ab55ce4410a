"""python -m bench: the whole benchmark suite, on loopback, in one command.

Runs each part in turn in a temporary directory (under $CSNAP_BENCH_DIR
when set), prints one table per part on stdout (progress on stderr), and
writes every figure, with a description of the machine, as JSON.

  server     csnapd under 1/8/64 clients (bench.server_bench)
  nbd        end to end through csnap-nbd with qemu-img bench, beside
             qemu-nbd + qcow2 and nbdkit file (bench.nbd_bench)
  snapshots  first-write cost against 1..64 live snapshots (bench.snapshots_bench)
  scale      a million exceptions: csnapd memory, start-up, lookups, and
             csnap-check beside thin_check (bench.scale_bench)
  lifecycle  snapshot create and delete latency, sweep rate (bench.server_bench)
  recovery   start to ready after SIGKILL with a full journal (bench.recovery_bench)
  failover   SIGKILL of the active csnapd to the first write granted by the
             next one, two nodes electing through etcd (bench.failover_bench)
  cluster    metadata queries/s from clients on three nodes (each through
             its own agent) against one server, beside one node
             (bench.cluster_bench)
  metrics    csnapd's metadata query rate with and without --metrics
             (bench.metrics_bench)
  changes    the changelist over a million exceptions; delta size and speed
             (bench.changes_bench)
  reclaim    delete and squash of snapshots owning 1 and 1/64 of a million
             exceptions: acknowledgement, time until free, commits, leaves
             visited, longest pause (bench.reclaim_bench)
  tls        metadata queries and connections per second, plaintext beside
             mutual TLS (bench.tls_bench)
  floor      server CPU per request and reply of a bare trio echo server
             beside csnapd's per lookup, plaintext and TLS (bench.floor_bench)

After the parts, the speed targets (bench.targets) are checked against
the figures of the server and nbd parts, when either ran: a table, and
"targets" in the JSON.

--quick runs every part small, in seconds, as a smoke test; --only PART
(repeatable) runs only those parts. Peers whose tools are missing are
reported as skipped, with the reason, and the rest still runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.changes_bench import changes_part
from bench.cluster_bench import cluster_part
from bench.common import Part, machine, progress, scratch_directory
from bench.failover_bench import failover_part
from bench.floor_bench import floor_part
from bench.metrics_bench import metrics_part
from bench.nbd_bench import nbd_part
from bench.reclaim_bench import reclaim_part
from bench.recovery_bench import recovery_part
from bench.scale_bench import scale_part
from bench.server_bench import lifecycle_part, server_part
from bench.snapshots_bench import snapshots_part
from bench.targets import evaluate, targets_table
from bench.tls_bench import tls_part

PARTS: dict[str, tuple[str, Callable[..., Part]]] = {
    "server": ("the metadata server under 1, 8 and 64 clients", server_part),
    "nbd": ("end to end through csnap-nbd, beside qemu-nbd + qcow2 and nbdkit file", nbd_part),
    "snapshots": ("first-write cost against the number of live snapshots", snapshots_part),
    "scale": ("a million exceptions across 64 snapshots, beside thin_check", scale_part),
    "lifecycle": ("snapshot create and delete latency, sweep rate", lifecycle_part),
    "recovery": ("start to ready after SIGKILL with a full journal", recovery_part),
    "failover": ("kill -9 of the active csnapd to the next granted write, via etcd", failover_part),
    "cluster": ("metadata queries/s from clients on three nodes against one server", cluster_part),
    "metrics": ("the metadata query rate with and without --metrics", metrics_part),
    "changes": ("the changelist over a million exceptions; delta size and speed", changes_part),
    "reclaim": ("delete and squash cost against what the snapshot owns", reclaim_part),
    "tls": ("metadata queries and connections per second, plaintext beside TLS", tls_part),
    "floor": ("the event loop's cost per request beside csnapd's per lookup", floor_part),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="csnap's benchmark suite: every part on loopback, tables on stdout,"
        " figures as JSON.",
    )
    parser.add_argument("--quick", action="store_true", help="a small smoke run of every part")
    parser.add_argument(
        "--only",
        action="append",
        choices=list(PARTS),
        metavar="PART",
        help=f"run only this part (repeatable): {', '.join(PARTS)}",
    )
    parser.add_argument(
        "--json",
        default="bench-results.json",
        metavar="FILE",
        help="where to write the figures (default bench-results.json)",
    )
    args = parser.parse_args(argv)
    chosen = [name for name in PARTS if args.only is None or name in args.only]
    results: dict[str, Any] = {"machine": machine(), "quick": args.quick, "parts": {}}
    failed = []
    with scratch_directory("csnap-bench-") as tmp:
        for name in chosen:
            title, run = PARTS[name]
            directory = Path(tmp) / name
            directory.mkdir()
            progress(f"== {name}: {title}")
            t0 = time.perf_counter()
            try:
                part = run(directory, quick=args.quick)
            except Exception:
                failed.append(name)
                progress(traceback.format_exc())
                results["parts"][name] = {"error": traceback.format_exc(limit=3)}
                print(f"\n== {name}: {title}\nFAILED (see stderr)", flush=True)
                continue
            seconds = time.perf_counter() - t0
            results["parts"][name] = {**part.figures, "part_seconds": seconds}
            print(f"\n== {name}: {title} ({seconds:.0f} s)\n{part.table}", flush=True)
            # Written after every part: a long run that fails late keeps the rest.
            Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    targets = evaluate(results["parts"])
    if any(row["measured"] is not None for row in targets):
        results["targets"] = targets
        print(f"\n== targets\n{targets_table(targets, quick=args.quick)}", flush=True)
    results["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    if failed:
        print(f"\nfailed parts: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
