"""Every crash state of seeded workloads recovers to a clean store holding
every acknowledged operation and nothing that was never issued: writes,
snapshot creates and deletes, sweeps, squashes, restarts, and (in two
workloads of three) reverts run a step at a time among them and the origin
and store grown online.
"""

from __future__ import annotations

import os

import pytest

from tests.crash.harness import CrashStats, enumerate_crashes, lifecycle_seed, run_workload

SEEDS = int(os.environ.get("CSNAP_CRASH_SEEDS", "3"))
OPERATIONS = int(os.environ.get("CSNAP_CRASH_OPS", "110"))
#: Crash states each workload must reach (the three together about 20,000).
MINIMUM_STATES = int(os.environ.get("CSNAP_CRASH_MIN_STATES", "5000"))

#: Store sizes: every third workload runs on a store so small that its data
#: area fills up and allocation wraps onto chunks freed by deletes, while the
#: minimum journal wraps and checkpoints as it does on the larger one.
ROOMY, SMALL = 4 << 20, 2 << 20


def store_bytes(seed: int) -> int:
    return SMALL if seed % 3 == 2 else ROOMY


def operations(seed: int) -> int:
    """On the small store some requests find it full and change nothing, and
    while a revert runs origin writes and creates wait: half as many again
    keep such a workload's crash states as many as a plain roomy one's."""
    if store_bytes(seed) == SMALL or lifecycle_seed(seed):
        return OPERATIONS * 3 // 2
    return OPERATIONS


#: The small store first: what only wrapping allocation shows, shows soonest.
SEED_ORDER = sorted(range(SEEDS), key=lambda seed: store_bytes(seed) != SMALL)


@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("seed", SEED_ORDER)
def test_every_crash_state_recovers(seed: int) -> None:
    """One workload per seed (a test each, so a parallel run spreads them)."""
    stats = CrashStats()
    workload = run_workload(
        seed, operations(seed), store_bytes=store_bytes(seed), lifecycle=lifecycle_seed(seed)
    )
    # Four random subsets per boundary: a copy-out's data and its record
    # are unsynced together, so which of them land is worth sampling.
    enumerate_crashes(workload, seed=seed, subsets=4, stats=stats)
    done = [kind for effects in workload.effects.values() for kind, _, _ in effects]
    print(
        f"\ncrash states: {stats.states} at {stats.points} write boundaries,"
        f" {stats.torn} torn, {stats.in_flight_landed} with the in-flight commit landed,"
        f" {stats.reverting} mid-revert ({stats.reverts_finished} finished and checked);"
        f" {done.count('reverted')} of {done.count('revert')} reverts finished;"
        f" data allocation wrapped {workload.data_wraps} times,"
        f" the journal {workload.journal_wraps} times;"
        f" {done.count('data')} chunks written into copies by snapshot data writes"
    )
    assert stats.states >= MINIMUM_STATES
    assert stats.torn > 0 and stats.in_flight_landed > 0
    assert workload.journal_wraps > 0
    assert "data" in done
    if store_bytes(seed) == SMALL:
        assert workload.data_wraps > 0
    if lifecycle_seed(seed):
        assert {"revert", "reverted", "grow_origin", "grow_store"} <= set(done)
        assert stats.reverting > 0 and stats.reverts_finished > 0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_every_crash_state_around_squashes_recovers() -> None:
    """A store filled by large origin writes squashes snapshots to make room:
    every crash state, squashes and their sweeps in flight included,
    recovers to the acknowledged snapshots, none squashed that the policy
    did not choose, each live one reading exactly."""
    workload = run_workload(0, 30, store_bytes=SMALL, filling=True)
    squashes = [e for effects in workload.effects.values() for e in effects if e[0] == "squash"]
    stats = enumerate_crashes(workload, seed=0, stride=5, subsets=1)
    print(f"\n{len(squashes)} squashes; crash states: {stats.states} at {stats.points} boundaries")
    assert len(squashes) >= 3
    assert stats.states >= 500
