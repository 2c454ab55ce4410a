"""The data area's early warning and free-space reserve, at the dispatcher
(docs/rules.md, "the store warns before it is full" and "the reserve
squashes in the background"): batches built by hand over a real engine on a
memory store.
"""

from __future__ import annotations

import argparse
import logging

import pytest

from csnap_protocol import (
    Barrier,
    BarrierDone,
    ChangeUseCount,
    CreateSnapshot,
    DeleteSnapshot,
    GetStatus,
    Identify,
    QueryWrite,
    Role,
    SnapshotReply,
    StatusReply,
    StoreRecord,
    WriteOk,
)
from csnapd.dispatch import Connected, Dispatcher, Outcome, Peer, Received, SweepTick
from csnapd.engine import Engine
from csnapd.space_watch import SpacePolicy, keep_free_arg, warn_at_arg
from tests.engine.helpers import new_store

#: 2388 data chunks for a 2048-chunk origin.
STORE_BYTES = 10 << 20
#: Bounds every loop of sweep ticks.
MAX_TICKS = 500


class Harness:
    """A dispatcher with an admin, an origin writer and a snapshot reader."""

    def __init__(self, policy: SpacePolicy):
        store, origin, _ = new_store(store_bytes=STORE_BYTES)
        self.engine = Engine.open(store, origin)
        self.dispatcher = Dispatcher(
            self.engine, address="test", store="test", max_chunks=1024, space=policy
        )
        self.admin = Peer(1, Role.ADMIN, "admin")
        self.writer = Peer(2, Role.CLIENT, "writer")
        self.reader = Peer(3, Role.CLIENT, "reader")
        self.ids = iter(range(1, 1_000_000))
        self.dispatcher.apply(
            [
                Connected(self.admin),
                Connected(self.writer),
                Connected(self.reader),
                Received(self.writer, Identify(next(self.ids), 42, None)),
            ]
        )

    def sent(self, out: Outcome, peer: Peer) -> list[object]:
        return [message for to, message in out.sends if to is peer]

    def create(self, tag: int, priority: int) -> None:
        out = self.dispatcher.apply(
            [Received(self.admin, CreateSnapshot(next(self.ids), tag, priority))]
        )
        (barrier,) = self.sent(out, self.writer)
        assert isinstance(barrier, Barrier)
        out = self.dispatcher.apply([Received(self.writer, BarrierDone(barrier.barrier))])
        (created,) = self.sent(out, self.admin)
        assert isinstance(created, SnapshotReply) and created.snapshot.tag == tag

    def write(self, first: int, count: int) -> None:
        """Origin writes of chunks first..first+count-1, 200 chunks a request."""
        for start in range(first, first + count, 200):
            request = next(self.ids)
            ranges = ((start, min(200, first + count - start)),)
            out = self.dispatcher.apply([Received(self.writer, QueryWrite(request, ranges))])
            (granted,) = self.sent(out, self.writer)
            assert isinstance(granted, WriteOk) and granted.id == request, granted

    def admin_request(self, message: object) -> object:
        out = self.dispatcher.apply([Received(self.admin, message)])  # type: ignore[arg-type]
        (reply,) = self.sent(out, self.admin)
        return reply

    def store(self) -> StoreRecord:
        reply = self.admin_request(GetStatus(next(self.ids)))
        assert isinstance(reply, StatusReply)
        return reply.store

    def states(self) -> dict[int, str]:
        reply = self.admin_request(GetStatus(next(self.ids)))
        assert isinstance(reply, StatusReply)
        return {s.tag: s.state for s in reply.snapshots}

    def tick_while_due(self) -> int:
        """Sweep ticks while one is due (idle); returns how many."""
        for ticks in range(MAX_TICKS):
            if not self.dispatcher.sweep_due():
                return ticks
            self.dispatcher.apply([SweepTick()])
        raise AssertionError(f"still due after {MAX_TICKS} ticks")


def events(caplog: pytest.LogCaptureFixture, name: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", None) == name]


def test_crossing_the_threshold_warns_once_and_falling_well_under_clears(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="csnapd")
    harness = Harness(SpacePolicy(warn_at=50))
    data_chunks = harness.store().data_chunks
    assert data_chunks == 2388
    harness.create(1, 0)
    harness.write(0, 1150)  # 48.2% used: under 50%
    store = harness.store()
    assert (store.warn_at, store.keep_free, store.space_warning) == (50, 0, False)
    assert not events(caplog, "store.filling")
    harness.create(2, 0)
    harness.write(0, 60)  # 60 more copies for snapshot 2: 50.7%
    (filling,) = events(caplog, "store.filling")
    assert filling.levelno == logging.WARNING
    assert "50.7% used, past the warning threshold of 50%" in filling.getMessage()
    assert harness.store().space_warning
    harness.write(1150, 30)  # further up (51.9%): no second line
    assert len(events(caplog, "store.filling")) == 1
    # Snapshot 2's 60 unique copies go back: 49.4% is under 50% but not by
    # the hysteresis' 2 points.
    harness.admin_request(DeleteSnapshot(next(harness.ids), 2))
    harness.tick_while_due()
    assert harness.engine.data_use == (data_chunks, data_chunks - 1180)
    assert harness.store().space_warning and not events(caplog, "store.filling_cleared")
    harness.admin_request(DeleteSnapshot(next(harness.ids), 1))
    harness.tick_while_due()
    assert harness.store().space_warning is False
    assert len(events(caplog, "store.filling_cleared")) == 1
    assert len(events(caplog, "store.filling")) == 1
    harness.engine.close()


def test_off_never_warns(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="csnapd")
    harness = Harness(SpacePolicy(warn_at=None))
    harness.create(1, 0)
    harness.write(0, 2048)  # 86% used
    store = harness.store()
    assert (store.warn_at, store.space_warning) == (0, False)
    assert not events(caplog, "store.filling")
    harness.engine.close()


def test_the_reserve_squashes_in_the_documented_order_and_spares_the_protected(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="csnapd")
    harness = Harness(SpacePolicy(warn_at=None, keep_free=40))
    # Each snapshot owns the 400 copies made while it was the newest.
    for tag, priority in ((1, 0), (2, -10), (3, 0), (4, -20), (5, -30)):
        harness.create(tag, priority)
        if tag == 5:
            harness.dispatcher.apply([Received(harness.reader, Identify(next(harness.ids), 43, 5))])
        harness.write(0, 400)
    harness.admin_request(ChangeUseCount(next(harness.ids), 4, 1))
    data_chunks, free = harness.engine.data_use
    assert free == data_chunks - 2000  # 16% free: the reserve is short
    # Lowest priority first among the expendable: 2 (-10), then 1 and 3
    # (0, 1 the older). 4 has a use count, 5 a reader: both spared.
    harness.tick_while_due()
    assert harness.states() == {1: "squashed", 2: "squashed", 3: "live", 4: "live", 5: "live"}
    data_chunks, free = harness.engine.data_use
    assert free == data_chunks - 1200 and free * 100 >= 40 * data_chunks
    squashed = events(caplog, "snapshot.squashed")
    assert [r.snapshot for r in squashed] == [2, 1]  # type: ignore[attr-defined]
    assert all("to keep the free-space reserve" in r.getMessage() for r in squashed)
    # A reserve that cannot be met: 3 goes too, and then nothing is due,
    # however short the reserve stays.
    harness.dispatcher.space.policy = SpacePolicy(warn_at=None, keep_free=99)
    harness.tick_while_due()
    assert harness.states() == {1: "squashed", 2: "squashed", 3: "squashed", 4: "live", 5: "live"}
    assert harness.engine.data_use == (data_chunks, data_chunks - 800)
    assert not harness.dispatcher.sweep_due()
    assert [r.snapshot for r in events(caplog, "snapshot.squashed")] == [2, 1, 3]  # type: ignore[attr-defined]
    harness.engine.close()


def test_the_reserve_squashes_at_most_once_per_tick_and_waits_for_the_sweep() -> None:
    harness = Harness(SpacePolicy(warn_at=None, keep_free=90))
    for tag in (1, 2):
        harness.create(tag, 0)
        harness.write(0, 400)
    harness.dispatcher.apply([SweepTick()])
    assert harness.states() == {1: "squashed", 2: "live"}
    # Snapshot 1's copies are not reclaimed yet: no second squash before
    # the sweep has freed them, even though the reserve is still short.
    assert harness.engine.sweep_pending
    harness.dispatcher.apply([SweepTick()])
    assert harness.states() == {1: "squashed", 2: "live"}
    harness.tick_while_due()
    assert harness.states() == {1: "squashed", 2: "squashed"}
    assert harness.engine.data_use[1] == harness.engine.data_use[0]
    harness.engine.close()


def test_the_flags_take_whole_percentages_or_off() -> None:
    assert (warn_at_arg("80%"), warn_at_arg("100"), warn_at_arg("off")) == (80, 100, None)
    assert (keep_free_arg("5%"), keep_free_arg(" OFF ")) == (5, None)
    for bad in ("0", "101", "80.5%", "%", "-5", "eighty"):
        with pytest.raises(argparse.ArgumentTypeError):
            warn_at_arg(bad)
    for bad in ("0%", "100%"):
        with pytest.raises(argparse.ArgumentTypeError):
            keep_free_arg(bad)
