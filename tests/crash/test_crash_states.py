# Every crash state of seeded workloads recovers to a clean store holding
# every acknowledged operation and nothing that was never issued.
from __future__ import annotations

import os

import pytest

from tests.crash.harness import CrashStats, enumerate_crashes, run_workload

SEEDS = int(os.environ.get("CSNAP_CRASH_SEEDS", "3"))
OPERATIONS = int(os.environ.get("CSNAP_CRASH_OPS", "100"))
MINIMUM_STATES = int(os.environ.get("CSNAP_CRASH_MIN_STATES", "20000"))


@pytest.mark.slow
def test_every_crash_state_recovers() -> None:
    stats = CrashStats()
    for seed in range(SEEDS):
        workload = run_workload(seed, OPERATIONS)
        enumerate_crashes(workload, seed=seed, stats=stats)
    print(
        f"\ncrash states: {stats.states} at {stats.points} write boundaries,"
        f" {stats.torn} torn, {stats.in_flight_landed} with the in-flight commit landed"
    )
    assert stats.states >= MINIMUM_STATES
    assert stats.torn > 0 and stats.in_flight_landed > 0
