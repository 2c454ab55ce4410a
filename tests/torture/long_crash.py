"""The long crash-state enumeration, outside CI: the workloads and checks of
tests/crash/harness.py over many seeds, in parallel worker processes, until
every seed is done (or enough states are explored). Prints one line per
seed and a total; exits 1 at the first state that recovers wrongly, naming
its seed so that the CI harness can replay it.

  python -m tests.torture.long_crash --seeds 0:150 --ops 100 --jobs 2
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from collections.abc import Sequence

from tests.crash.harness import (
    CrashCheckError,
    CrashStats,
    enumerate_crashes,
    lifecycle_seed,
    run_workload,
)

__all__ = ["main"]


def _one(job: tuple[int, int, int]) -> tuple[int, CrashStats | str]:
    seed, operations, subsets = job
    try:
        workload = run_workload(seed, operations, lifecycle=lifecycle_seed(seed))
        return seed, enumerate_crashes(workload, seed=seed, subsets=subsets)
    except CrashCheckError as exc:
        return seed, f"{exc}"


def _seeds(text: str) -> range:
    first, _, last = text.partition(":")
    return range(int(first), int(last)) if last else range(int(first))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.torture.long_crash")
    parser.add_argument("--seeds", default="0:150", help="FIRST:END, or a count (default 0:150)")
    parser.add_argument("--ops", type=int, default=100, help="operations per workload")
    parser.add_argument("--subsets", type=int, default=2, help="random subsets per boundary")
    parser.add_argument("--jobs", type=int, default=multiprocessing.cpu_count())
    parser.add_argument(
        "--until", type=int, default=0, help="stop once this many states are explored"
    )
    args = parser.parse_args(argv)
    total = CrashStats()
    seeds = _seeds(args.seeds)
    started = time.monotonic()
    jobs = [(seed, args.ops, args.subsets) for seed in seeds]
    done = 0
    with multiprocessing.Pool(args.jobs) as pool:
        for seed, result in pool.imap_unordered(_one, jobs):
            if isinstance(result, str):
                print(f"seed {seed}: a crash state recovered wrongly: {result}", flush=True)
                pool.terminate()
                return 1
            done += 1
            total.points += result.points
            total.states += result.states
            total.torn += result.torn
            total.in_flight_landed += result.in_flight_landed
            print(
                f"seed {seed}: {result.states} states at {result.points} boundaries;"
                f" total {total.states} states, {done}/{len(jobs)} seeds,"
                f" {time.monotonic() - started:.0f}s",
                flush=True,
            )
            if args.until and total.states >= args.until:
                pool.terminate()
                break
    print(
        f"crash states explored: {total.states} at {total.points} write boundaries"
        f" ({total.torn} torn, {total.in_flight_landed} with the in-flight commit landed),"
        f" {done} seeds x {args.ops} operations, none recovered wrongly",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
