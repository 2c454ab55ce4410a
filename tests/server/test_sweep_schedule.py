"""The sweep yields to clients: background steps between client batches.

The schedule alone, on a clock the test moves (its rule, step by step), then
csnapd in-process under a steady load of lookups while the space of a
snapshot spread over every leaf is reclaimed in many steps: every lookup is
answered meanwhile, some while a step's commit is written, and the sweep
still ends while the load goes on.
"""

from __future__ import annotations

from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import trio

from csnap_client import DataClient
from csnapd.engine import Engine
from csnapd.server import ServerConfig
from csnapd.sweep_schedule import BUSY_SHARE, QUIET_SECONDS, SweepSchedule
from tests.server.support import make_store, running


class Clock:
    """Seconds that pass only when the test says."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_idle_steps_run_back_to_back() -> None:
    clock = Clock()
    schedule = SweepSchedule(clock)
    for _ in range(3):
        assert schedule.due(queued=False)
        clock.now += 0.01
        schedule.stepped(0.01)
        # No client since long ago: the next step is due at once.
        assert schedule.due(queued=False)
        assert schedule.wait() == 0.0


def test_busy_steps_take_their_share_of_the_time_and_no_more() -> None:
    clock = Clock()
    schedule = SweepSchedule(clock)
    schedule.requests_answered()
    assert schedule.due(queued=False)  # no step yet: the first is due
    step = 0.004
    clock.now += step
    schedule.stepped(step)
    gap = step * (1 / BUSY_SHARE - 1)
    schedule.requests_answered()
    # Clients are busy: no step until the clients have had their share.
    assert not schedule.due(queued=False)
    assert not schedule.due(queued=True)
    assert schedule.wait() == pytest.approx(gap)
    clock.now += gap / 2
    schedule.requests_answered()
    assert not schedule.due(queued=True)
    clock.now += gap / 2
    assert schedule.due(queued=False)


def test_a_step_due_while_requests_wait_comes_after_their_batch() -> None:
    clock = Clock()
    schedule = SweepSchedule(clock)
    schedule.requests_answered()
    clock.now += 0.001
    schedule.stepped(0.001)
    clock.now += 1.0
    assert not schedule.owed
    # Due, but requests are queued: they go first, the step is owed.
    assert schedule.due(queued=True)
    assert schedule.owed
    schedule.requests_answered()
    clock.now += 0.002
    schedule.stepped(0.001)
    assert not schedule.owed


def test_quiet_clients_count_as_idle() -> None:
    clock = Clock()
    schedule = SweepSchedule(clock)
    schedule.requests_answered()
    clock.now += 0.1
    schedule.stepped(0.1)  # a long step: the busy turn is far away
    schedule.requests_answered()
    assert not schedule.due(queued=False)
    assert schedule.wait() == pytest.approx(QUIET_SECONDS)
    clock.now += QUIET_SECONDS * 1.01
    assert schedule.due(queued=False)
    # Even so, requests waiting in the queue go first.
    assert not schedule.due(queued=True)


#: Origin chunks of the store; the background snapshot has a copy of each.
CHUNKS = 16_384
#: The deleted snapshot has a copy of every SPREAD-th chunk: a bit in every leaf.
SPREAD = 8
BACKGROUND, SPREAD_OUT = 1, 2


def build(tmp_path: Path) -> ServerConfig:
    """A store whose snapshot SPREAD_OUT has an exception in every leaf."""
    config = make_store(
        tmp_path, store_size=CHUNKS * 4096 * 5 // 4 + (16 << 20), origin_size=CHUNKS * 4096
    )
    engine = Engine.open_files(config.store, config.origin)
    engine.create_snapshot(BACKGROUND)
    engine.commit()
    for first in range(0, CHUNKS, 2048):
        engine.origin_write([(first, 2048)])
        engine.commit()
    engine.create_snapshot(SPREAD_OUT)
    engine.origin_write([(chunk, 1) for chunk in range(0, CHUNKS, SPREAD)])
    engine.commit()
    engine.close()
    return config


async def test_lookups_are_answered_while_a_long_sweep_runs_and_it_ends_under_load(
    tmp_path: Path,
) -> None:
    config = build(tmp_path)
    deleting = trio.Event()
    swept = trio.Event()
    #: Lookups answered while the sweep was pending, per client.
    answered = [0] * 4

    async def lookups(client: DataClient, n: int) -> None:
        chunk = n
        # Bounded: far more than the test needs, each a loopback round trip.
        for _ in range(200_000):
            if swept.is_set():
                return
            async with client.snapshot_read([(chunk, 1)]) as plan:
                assert plan.store and not plan.origin
            if deleting.is_set() and not swept.is_set():
                answered[n] += 1
            chunk = (chunk + 7919) % CHUNKS
        raise AssertionError("the sweep did not end within the lookups' bound")

    with trio.fail_after(120):
        async with (
            running(config) as server,
            server.admin() as admin,
            AsyncExitStack() as stack,
        ):
            clients = [
                await stack.enter_async_context(server.client(BACKGROUND, reconnect=False))
                for _ in answered
            ]
            info = await admin.server_info()
            async with trio.open_nursery() as nursery:
                for n, client in enumerate(clients):
                    nursery.start_soon(lookups, client, n)
                await trio.sleep(0.2)  # the load is steady before the delete
                await admin.delete_snapshot(SPREAD_OUT)
                deleting.set()
                # Polled: status is a request like the lookups.
                for _ in range(10_000):
                    if not (await admin.status()).deleting:
                        break
                    await trio.sleep(0.01)
                swept.set()
            status = await admin.status()
            after = await admin.server_info()
    # The slot is free and the background snapshot untouched.
    assert [s.tag for s in status.snapshots] == [BACKGROUND]
    assert status.snapshots[0].unique_chunks == CHUNKS
    # The sweep took many steps (commits), and every client was answered
    # while it ran, not only before and after.
    assert after["commits"] - info["commits"] >= 5
    assert all(count > 0 for count in answered), answered
    # Lookups that arrived while a step's commit was written were answered
    # then, not after it (docs/rules.md, "lookups during a commit").
    assert server.server.stats.lookups_during_commit > 0
