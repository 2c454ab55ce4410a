"""The store-full policy against a model: a small store filled by origin and
snapshot writes, snapshots of mixed priorities and use counts, deletes,
sweeps, restarts, crashes and power cuts in the middle of a squash.

The model knows each snapshot's priority, creation order, use count and
contents, and from them the documented squash order (docs/rules.md, "full
store squashes first"). After every write: the snapshots squashed are the
first ones of that order, in that order; a write fails with store_full only
when no snapshot is expendable; squashed snapshots refuse reads and keep
their tags; every other view reads what the model says; the full check
finds nothing.
"""

from __future__ import annotations

import os
import random

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from csnapd.engine import (
    BlockDevice,
    Engine,
    EngineError,
    MemoryDevice,
    SnapshotUnavailableError,
    StoreFullError,
)
from tests.engine.helpers import (
    CutDevice,
    assert_clean,
    format_device,
    new_geometry,
    pattern,
    read_snapshot,
    still_timer,
    write_origin,
)

#: Each machine runs for tens of seconds.
pytestmark = pytest.mark.slow

N = 512  # origin chunks; the store holds about 620 copies
TAGS = st.integers(0, 7)
STEPS = int(os.environ.get("CSNAP_SQUASH_STEPS", "30"))
EXAMPLES = int(os.environ.get("CSNAP_SQUASH_EXAMPLES", "40"))


@st.composite
def chunk_ranges(draw: st.DrawFn) -> tuple[int, int]:
    start = draw(st.integers(0, N - 1))
    count = draw(st.sampled_from([1, 8, 64, 200, 400, N]))
    return start, min(count, N - start)


class SquashMachine(RuleBasedStateMachine):
    """Drives an Engine on a store small enough to fill in a few writes."""

    def __init__(self) -> None:
        super().__init__()
        self.g = new_geometry(store_bytes=3 << 20, origin_bytes=N * 4096, journal_bytes=64 * 4096)
        self.mem = MemoryDevice(self.g.store_bytes)
        format_device(self.mem, self.g)
        self.store = CutDevice(self.mem)
        self.origin: BlockDevice = MemoryDevice(self.g.origin_bytes)
        self.origin_v = [0] * N
        #: Live snapshots: contents by chunk.
        self.snaps: dict[int, list[int]] = {}
        #: Every snapshot with a tag (live and squashed): priority, creation
        #: order, use count.
        self.priority: dict[int, int] = {}
        self.born: dict[int, int] = {}
        self.use: dict[int, int] = {}
        self.squashed: set[int] = set()
        self.version = 0
        self.clock = 0
        self.rng = random.Random(0)
        self.engine = self.open()

    def tick(self) -> int:
        self.clock += 1
        return self.clock

    def open(self) -> Engine:
        return Engine.open(
            self.store, self.origin, cache_bytes=48 * 4096, clock=self.tick, step_timer=still_timer
        )

    def order(self, spare: int | None = None) -> list[int]:
        """The model's squash order: the documented rule."""
        expendable = [t for t in self.snaps if not self.use[t] and t != spare]
        return sorted(expendable, key=lambda t: (self.priority[t], self.born[t]))

    def take_squashed(self, spare: int | None = None) -> None:
        """The engine squashed exactly the first snapshots of the model's order."""
        got = [s.tag for s in self.engine.take_squashed()]
        assert got == self.order(spare)[: len(got)], (got, self.order(spare))
        for tag in got:
            self.squash_in_model(tag)

    def squash_in_model(self, tag: int) -> None:
        del self.snaps[tag]
        self.squashed.add(tag)

    def pick_tag(self, data: st.DataObject) -> int:
        known = sorted(self.priority)
        if known and data.draw(st.integers(0, 9), label="existing") > 0:
            return data.draw(st.sampled_from(known), label="tag")
        return data.draw(TAGS, label="tag")

    def verify_everything(self) -> None:
        size = self.g.chunk_size
        for tag, versions in self.snaps.items():
            got = read_snapshot(self.engine, self.mem, self.origin, tag, 0, N)
            for chunk, data in enumerate(got):
                assert data == pattern(chunk, versions[chunk], size), (tag, chunk)
        for chunk in range(0, N, 37):
            assert self.origin.read(chunk * size, size) == pattern(
                chunk, self.origin_v[chunk], size
            )

    # -- setup -------------------------------------------------------------------

    @initialize(
        rng=st.randoms(use_true_random=False),
        seeds=st.lists(
            st.tuples(st.integers(-2, 2), st.integers(0, 2), chunk_ranges()),
            min_size=1,
            max_size=4,
        ),
    )
    def seed(self, rng: random.Random, seeds: list[tuple[int, int, tuple[int, int]]]) -> None:
        """Snapshots of mixed priorities, each followed by an origin write.

        A third of them are in use. Two or three writes of the whole origin
        already fill the store, so most runs squash in their first steps.
        """
        self.rng = rng
        for tag, (priority, used, r) in enumerate(seeds):
            self.create(tag, priority)
            if used == 0:
                self.engine.change_use_count(tag, 1)
                self.engine.commit()
                self.use[tag] = 1
            self.origin_write(r)

    # -- snapshots ---------------------------------------------------------------

    @rule(tag=TAGS, priority=st.integers(-3, 3))
    def create(self, tag: int, priority: int) -> None:
        if tag in self.priority:
            return
        try:
            self.engine.create_snapshot(tag, priority)
        except Exception as exc:  # all 64 slots cannot run out here
            raise AssertionError(exc) from exc
        self.engine.commit()
        self.snaps[tag] = list(self.origin_v)
        self.priority[tag], self.born[tag], self.use[tag] = priority, self.clock, 0

    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        tag = self.pick_tag(data)
        if tag not in self.priority or self.use[tag]:
            return
        self.engine.delete_snapshot(tag)
        self.engine.commit()
        self.snaps.pop(tag, None)
        self.squashed.discard(tag)
        del self.priority[tag], self.born[tag], self.use[tag]

    @rule(data=st.data(), delta=st.sampled_from([-1, 1]))
    def use_count(self, data: st.DataObject, delta: int) -> None:
        tag = self.pick_tag(data)
        if tag not in self.priority or self.use[tag] + delta < 0:
            return
        self.engine.change_use_count(tag, delta)
        self.engine.commit()
        self.use[tag] += delta

    @rule()
    def sweep(self) -> None:
        for _ in range(10_000):
            more = self.engine.sweep()
            self.engine.commit()
            if not more:
                break
        assert not self.engine.sweep_pending

    # -- data --------------------------------------------------------------------

    @rule(r=chunk_ranges())
    def origin_write(self, r: tuple[int, int]) -> None:
        start, count = r
        try:
            self.engine.origin_write([r])
        except StoreFullError:
            self.take_squashed()
            assert not self.order(), "store_full while a snapshot was expendable"
            return
        self.take_squashed()
        self.engine.commit()
        self.version += 1
        for chunk in range(start, start + count):
            write_origin(self.origin, self.g, chunk, self.version)
            self.origin_v[chunk] = self.version

    @rule(data=st.data(), r=chunk_ranges())
    def snapshot_write(self, data: st.DataObject, r: tuple[int, int]) -> None:
        tag = self.pick_tag(data)
        if tag in self.squashed:
            with pytest.raises(SnapshotUnavailableError):
                self.engine.snapshot_write(tag, [r])
            return
        if tag not in self.snaps:
            return
        try:
            segments = self.engine.snapshot_write(tag, [r])
        except StoreFullError:
            self.take_squashed(spare=tag)
            assert not self.order(spare=tag), "store_full while a snapshot was expendable"
            return
        self.take_squashed(spare=tag)
        self.engine.commit()
        self.version += 1
        size = self.g.chunk_size
        for segment in segments:
            for k in range(segment.count):
                chunk = segment.chunk + k
                self.mem.write_through(
                    (segment.store_chunk + k) * size, pattern(chunk, self.version, size)
                )
                self.snaps[tag][chunk] = self.version

    # -- restarts and crashes ----------------------------------------------------

    @rule()
    def restart(self) -> None:
        self.engine.close()
        self.engine = self.open()
        self.verify_everything()

    def reopen_after_crash(self) -> None:
        crashed = self.mem.random_crash(self.rng)
        self.mem = crashed
        self.store = CutDevice(crashed)
        self.engine = self.open()
        assert self.engine.recovery.problem is None

    @rule(r=chunk_ranges(), cut=st.integers(0, 12))
    def power_cut_while_making_room(self, r: tuple[int, int], cut: int) -> None:
        """A power cut inside an origin write's squashes and sweeps.

        Each squash is a transaction of its own: after recovery, the
        snapshots found squashed are a prefix of the documented order, and
        every snapshot still live reads as before.
        """
        order = self.order()
        self.store.budget = cut
        try:
            self.engine.origin_write([r])
            self.engine.commit()
        except EngineError:
            pass  # the cut, or a full store: recovery says what landed
        self.store.budget = 1 << 62
        self.engine.take_squashed()
        self.reopen_after_crash()
        found = {
            info.tag for info in self.engine.snapshots() if info.state == "squashed"
        } - self.squashed
        assert found == set(order[: len(found)]), (found, order)
        for tag in order[: len(found)]:
            self.squash_in_model(tag)
        # The client never wrote the origin: its contents are unchanged.
        self.verify_everything()

    # -- invariants --------------------------------------------------------------

    @invariant()
    def matches_model(self) -> None:
        infos = {info.tag: info for info in self.engine.snapshots()}
        assert set(infos) == set(self.priority)
        for tag, info in infos.items():
            assert info.state == ("squashed" if tag in self.squashed else "live"), tag
            assert info.use_count == self.use[tag]
            assert info.priority == self.priority[tag]
        assert not self.engine.pending
        assert self.engine.squash_order() == self.order()
        assert_clean(self.mem)
        for tag in self.squashed:
            with pytest.raises(SnapshotUnavailableError):
                self.engine.snapshot_read(tag, [(0, 1)])
        sample = [self.rng.randrange(N) for _ in range(4)]
        size = self.g.chunk_size
        for tag, versions in self.snaps.items():
            for chunk in sample:
                got = read_snapshot(self.engine, self.mem, self.origin, tag, chunk, 1)[0]
                assert got == pattern(chunk, versions[chunk], size), (tag, chunk)


HUNTING = bool(os.environ.get("CSNAP_HYPOTHESIS_PROFILE"))
TestSquashModel = SquashMachine.TestCase
TestSquashModel.settings = settings(
    max_examples=EXAMPLES,
    stateful_step_count=STEPS,
    derandomize=not HUNTING,
    database=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate, *([Phase.shrink] if HUNTING else [])],
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
