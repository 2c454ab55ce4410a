"""The engine against a plain model of what every view (the origin and each
snapshot) should read, chunk by chunk, through creates, deletes, sweeps,
origin and snapshot writes, reverts advanced a step at a time among the
other requests, the origin and the store resized, clean restarts, crashes
that lose or tear unsynced writes, and power cuts in the middle of a commit.

A revert makes the origin the snapshot's content: below the revert's
cursor the origin reads the snapshot (where the snapshot shares the origin
the two are equal already), above it what it read before, and every other
snapshot is unchanged. While it runs, origin writes are held (the server's
write gate: the model issues none), creates are refused, and so are writes
to and deletes of the snapshot being reverted. Every snapshot keeps the
origin size it was taken at.

After every step: the engine's snapshots are the model's, the full check
finds nothing, and a sample of chunks of every view reads what the model
says. After every restart or crash, every chunk of every view is compared.
After every step the changelist between two views (snapshots or the origin)
is the set of chunks whose model contents differ, but for chunks a granted
write may have left as they were (which the model calls identical rewrites).
"""

from __future__ import annotations

import os
import random
import tempfile
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, Phase, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from csnap_format import store_capacity
from csnapd.engine import (
    BeyondCapacityError,
    BlockDevice,
    Engine,
    EngineFailedError,
    FileDevice,
    MemoryDevice,
    RequestTooLargeError,
    RevertInProgressError,
    ShrinkRefusedError,
    SnapshotBusyError,
    SnapshotExistsError,
    SnapshotNotFoundError,
)
from csnapd.engine import revert as revert_module
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

N = 1024  # origin chunks at the start
#: What the origin may grow to (its device's size).
GROWN_N = N + 256
TAGS = st.integers(0, 5)


@st.composite
def chunk_ranges(draw: st.DrawFn) -> tuple[int, int]:
    start = draw(st.integers(0, N - 1))
    if draw(st.integers(0, 4)) == 0:
        count = draw(st.integers(64, 700))
    else:
        count = draw(st.integers(1, 48))
    return start, min(count, N - start)


def fit(r: tuple[int, int], size: int) -> tuple[int, int]:
    """A drawn range moved into a view of `size` chunks: the same start
    while it fits (a grown origin's new chunks are reached from its end)."""
    start, count = r
    if size > N and start >= N - count:
        start += size - N
    start = min(start, size - 1)
    return start, min(count, size - start)


#: Chunks a revert step restores here: few, so that a revert takes several
#: steps, with other requests, crashes and resizes between them.
REVERT_STEP_CHUNKS = 24


@pytest.fixture(autouse=True)
def small_revert_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(revert_module, "RESTORE_CHUNKS_PER_STEP", REVERT_STEP_CHUNKS)


OPS = st.sampled_from(["origin", "snapshot", "create", "delete"])
STEPS = int(os.environ.get("CSNAP_MODEL_STEPS", "40"))
EXAMPLES = int(os.environ.get("CSNAP_MODEL_EXAMPLES", "60"))


class EngineMachine(RuleBasedStateMachine):
    """Drives an Engine on a memory store whose power can be cut."""

    crashes = True

    def __init__(self) -> None:
        super().__init__()
        self.g = new_geometry(store_bytes=24 << 20, origin_bytes=N * 4096, journal_bytes=128 * 4096)
        self.mem = MemoryDevice(self.g.store_bytes)
        format_device(self.mem, self.g)
        self.store = CutDevice(self.mem)
        self.origin: BlockDevice = MemoryDevice(GROWN_N * self.g.chunk_size)
        #: Versions of every chunk of the origin device, past the origin's end
        #: too (a shrunk origin grown again reads what its device kept).
        self.origin_v = [0] * GROWN_N
        #: The origin's size in chunks now.
        self.n = N
        self.snaps: dict[int, list[int]] = {}
        #: The snapshot the origin is being reverted to, if a revert runs.
        self.reverting: int | None = None
        #: Chunks whose write was granted but maybe never made (an identical
        #: rewrite, as far as contents go): the changelist may name them.
        self.rewritten: set[int] = set()
        self.use: dict[int, int] = {}
        self.version = 0
        self.clock = 0
        self.rng = random.Random(0)
        self.engine = self.open()

    # -- plumbing ----------------------------------------------------------

    def tick(self) -> int:
        self.clock += 1
        return self.clock

    def open(self) -> Engine:
        return Engine.open(
            self.store, self.origin, cache_bytes=48 * 4096, clock=self.tick, step_timer=still_timer
        )

    def store_device(self) -> BlockDevice:
        return self.mem

    def client_write(self, address: int, data: bytes) -> None:
        """A snapshot client's write into the store, durable when it returns."""
        self.mem.write_through(address, data)

    def pick_tag(self, data: st.DataObject) -> int:
        """Mostly a tag that exists, so that steps are rarely wasted."""
        if self.snaps and data.draw(st.integers(0, 9), label="existing") > 0:
            return data.draw(st.sampled_from(sorted(self.snaps)), label="tag")
        return data.draw(TAGS, label="tag")

    def next_version(self) -> int:
        self.version += 1
        return self.version

    def expect(self, tag: int | None) -> list[int]:
        return self.origin_v[: self.n] if tag is None else self.snaps[tag]

    def verify(self, tag: int | None, chunks: list[int]) -> None:
        size = self.g.chunk_size
        for chunk in chunks:
            if chunk >= len(self.expect(tag)):
                continue
            want = pattern(chunk, self.expect(tag)[chunk], size)
            if tag is None:
                got = self.origin.read(chunk * size, size)
            else:
                got = read_snapshot(self.engine, self.store_device(), self.origin, tag, chunk, 1)[0]
            assert got == want, f"view {tag} chunk {chunk}"

    def verify_everything(self) -> None:
        for tag in self.snaps:
            size = self.g.chunk_size
            assert self.engine.snapshot(tag).origin_chunks == len(self.snaps[tag])
            got = read_snapshot(
                self.engine, self.store_device(), self.origin, tag, 0, len(self.snaps[tag])
            )
            for chunk, data in enumerate(got):
                assert data == pattern(chunk, self.snaps[tag][chunk], size), (tag, chunk)

    # -- setup -------------------------------------------------------------

    @initialize(
        rng=st.randoms(use_true_random=False),
        sharing=st.integers(0, 3),
        r=chunk_ranges(),
    )
    def seed(self, rng: random.Random, sharing: int, r: tuple[int, int]) -> None:
        """Most runs start with copies shared by several snapshots.

        `sharing` snapshots are taken and then an origin write copies `r`
        out once for all of them: the state in which a delete or a sweep
        that touches the wrong share bits shows, reached in the first step
        rather than by luck.
        """
        self.rng = rng
        for tag in range(sharing):
            self.create(tag, 0)
        if sharing:
            self.origin_write(r)

    # -- snapshots -----------------------------------------------------------

    @rule(tag=TAGS, priority=st.integers(-128, 127))
    def create(self, tag: int, priority: int) -> None:
        if self.reverting is not None:
            with pytest.raises(RevertInProgressError):
                self.engine.create_snapshot(tag, priority)
            return
        if tag in self.snaps:
            with pytest.raises(SnapshotExistsError):
                self.engine.create_snapshot(tag, priority)
            return
        info = self.engine.create_snapshot(tag, priority)
        self.engine.commit()
        assert (info.tag, info.priority, info.unique_chunks, info.shared_chunks) == (
            tag,
            priority,
            0,
            0,
        )
        self.snaps[tag] = self.expect(None)
        self.use[tag] = 0

    @rule(data=st.data(), sweep_now=st.booleans())
    def delete(self, data: st.DataObject, sweep_now: bool) -> None:
        """Delete a snapshot; half the time its sweep runs to the end at once."""
        tag = self.pick_tag(data)
        if tag not in self.snaps:
            with pytest.raises(SnapshotNotFoundError):
                self.engine.delete_snapshot(tag)
        elif tag == self.reverting:
            with pytest.raises(RevertInProgressError):
                self.engine.delete_snapshot(tag)
        elif self.use[tag]:
            with pytest.raises(SnapshotBusyError):
                self.engine.delete_snapshot(tag)
        else:
            self.engine.delete_snapshot(tag)
            self.engine.commit()
            del self.snaps[tag], self.use[tag]
            if sweep_now:
                self.sweep()

    @rule(data=st.data(), delta=st.integers(-1, 1))
    def use_count(self, data: st.DataObject, delta: int) -> None:
        tag = self.pick_tag(data)
        if tag not in self.snaps:
            with pytest.raises(SnapshotNotFoundError):
                self.engine.change_use_count(tag, delta)
            return
        if self.use[tag] + delta < 0:
            with pytest.raises(Exception, match="would become -1"):
                self.engine.change_use_count(tag, delta)
            return
        assert self.engine.change_use_count(tag, delta).use_count == self.use[tag] + delta
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

    @rule(data=st.data(), at_once=st.booleans())
    def start_revert(self, data: st.DataObject, at_once: bool) -> None:
        """Begin reverting the origin to a snapshot; half the time run it to
        its end at once, else its steps come as rules of their own."""
        tag = self.pick_tag(data)
        if self.reverting is not None:
            with pytest.raises(RevertInProgressError):
                self.engine.start_revert(tag)
            return
        if tag not in self.snaps:
            with pytest.raises(SnapshotNotFoundError):
                self.engine.start_revert(tag)
            return
        # Chunks the revert writes: the changelist may name them between the
        # origin and any view from now on (identical rewrites, to the model).
        for segment in self.engine.snapshot_read(tag, [(0, len(self.snaps[tag]))]):
            if segment.store_chunk is not None:
                self.rewritten.update(range(segment.chunk, segment.chunk + segment.count))
        self.engine.start_revert(tag)
        self.engine.commit()
        self.reverting = tag
        if at_once:
            self.engine.finish_revert()
            self.reverted()
        event("revert run at once" if at_once else "revert started")

    @precondition(lambda self: self.reverting is not None)
    @rule()
    def revert_step(self) -> None:
        """One step of the revert: the origin reads the snapshot below its cursor."""
        more = self.engine.revert_step()
        self.engine.commit()
        self.reverted()
        assert more == (self.reverting is not None)
        event("revert step" if more else "revert finished in steps")

    def reverted(self) -> None:
        """The model's origin as far as the revert in progress (if still running) went."""
        assert self.reverting is not None
        target = self.snaps[self.reverting]
        progress = self.engine.revert_progress
        upto = len(target) if progress is None else min(progress.cursor, len(target))
        self.origin_v[:upto] = target[:upto]
        if progress is None:
            self.reverting = None

    # -- data ----------------------------------------------------------------

    @precondition(lambda self: self.reverting is None)  # held while a revert runs
    @rule(r=chunk_ranges())
    def origin_write(self, r: tuple[int, int]) -> None:
        r = fit(r, self.n)
        start, count = r
        try:
            self.engine.origin_write([r])
        except RequestTooLargeError:
            return
        self.engine.commit()
        version = self.next_version()
        for chunk in range(start, start + count):
            write_origin(self.origin, self.g, chunk, version)
            self.origin_v[chunk] = version

    @rule(data=st.data(), r=chunk_ranges())
    def snapshot_write(self, data: st.DataObject, r: tuple[int, int]) -> None:
        tag = self.pick_tag(data)
        if tag not in self.snaps:
            # Inside the origin, which may have shrunk below the drawn range:
            # a range outside it is refused before the tag is looked up.
            with pytest.raises(SnapshotNotFoundError):
                self.engine.snapshot_write(tag, [fit(r, self.n)])
            return
        r = fit(r, len(self.snaps[tag]))
        if tag == self.reverting:
            with pytest.raises(RevertInProgressError):
                self.engine.snapshot_write(tag, [r])
            return
        try:
            segments = self.engine.snapshot_write(tag, [r])
        except RequestTooLargeError:
            return
        self.engine.commit()
        assert sum(s.count for s in segments) == r[1]
        version = self.next_version()
        size = self.g.chunk_size
        for segment in segments:
            for k in range(segment.count):
                chunk = segment.chunk + k
                self.mem.write_through(
                    (segment.store_chunk + k) * size, pattern(chunk, version, size)
                )
                self.snaps[tag][chunk] = version

    @rule(data=st.data(), r=chunk_ranges())
    def snapshot_write_data(self, data: st.DataObject, r: tuple[int, int]) -> None:
        """A snapshot write bringing its bytes (a new version of whole chunks):
        written into the copies by the engine, or handed out to be written."""
        tag = self.pick_tag(data)
        if tag not in self.snaps or tag == self.reverting:
            return
        start, count = fit(r, len(self.snaps[tag]))
        count = min(count, 16)
        size = self.g.chunk_size
        version = self.next_version()
        whole = b"".join(pattern(start + k, version, size) for k in range(count))
        try:
            segments, written = self.engine.snapshot_write_data(tag, start * size, whole)
        except RequestTooLargeError:
            return
        self.engine.commit()
        assert sum(s.count for s in segments) == count
        for segment in segments:
            for k in range(segment.count):
                chunk = segment.chunk + k
                if not written:
                    self.client_write(
                        (segment.store_chunk + k) * size, pattern(chunk, version, size)
                    )
                self.snaps[tag][chunk] = version

    @rule(data=st.data(), r=chunk_ranges())
    def read(self, data: st.DataObject, r: tuple[int, int]) -> None:
        tag: int | None = None if data.draw(st.booleans(), label="origin") else self.pick_tag(data)
        if tag is not None and tag not in self.snaps:
            return
        start, count = fit(r, len(self.expect(tag)))
        self.verify(tag, list(range(start, start + min(count, 64))))

    # -- resizing ----------------------------------------------------------------

    @rule(data=st.data())
    def resize_store(self, data: st.DataObject) -> None:
        """Grow the store within its capacity, shrink it over free space, or
        try past its capacity or over chunks in use: a refused resize changes
        nothing."""
        g = self.engine.geometry
        capacity = store_capacity(g)
        # Never so small that a copy-out could find the store full: the model
        # has no squashes (every chunk copied for six snapshots fits).
        spare = self.engine.status().data_free - 6 * GROWN_N
        low = max(g.data_start + 1, g.store_chunks - max(0, spare))
        chunks = data.draw(st.integers(low, capacity + 4), label="store chunks")
        if chunks * g.chunk_size > self.mem.size:
            self.mem.resize_to(min(chunks, capacity) * g.chunk_size)
        before = self.engine.status()
        try:
            self.engine.resize(store_bytes=chunks * g.chunk_size, grow_files=True)
        except BeyondCapacityError:
            assert chunks > capacity
        except ShrinkRefusedError:
            assert chunks < g.store_chunks
        else:
            assert self.engine.geometry.store_chunks == chunks
            self.g = self.engine.geometry
            return
        # Refused: nothing changed.
        assert self.engine.geometry == g
        assert self.engine.status() == before

    @rule(chunks=st.integers(N - 64, GROWN_N))
    def resize_origin(self, chunks: int) -> None:
        """Grow the origin (its device is large enough), or try to shrink it:
        refused when a snapshot was taken larger, else safe. Snapshots keep
        their sizes; a refused resize changes nothing."""
        g = self.engine.geometry
        before = self.engine.status()
        try:
            self.engine.resize(origin_bytes=chunks * g.chunk_size)
        except ShrinkRefusedError:
            assert chunks < self.n
            assert self.engine.geometry == g
            assert self.engine.status() == before
            event("origin shrink refused")
            return
        event("origin grown" if chunks > self.n else "origin shrunk or kept")
        assert all(len(versions) <= chunks for versions in self.snaps.values())
        assert self.engine.geometry.origin_chunks == chunks
        self.g = self.engine.geometry
        self.n = chunks

    # -- restarts and crashes ----------------------------------------------------

    @rule()
    def restart(self) -> None:
        self.engine.close()
        self.engine = self.open()
        assert self.engine.recovery.problem is None
        self.verify_everything()

    def reopen_after_crash(self) -> None:
        crashed = self.mem.random_crash(self.rng)
        self.mem = crashed
        self.store = CutDevice(crashed)
        self.engine = self.open()
        assert self.engine.recovery.problem is None

    @precondition(lambda self: self.crashes)
    @rule()
    def crash(self) -> None:
        if self.reverting is not None:
            event("crash while reverting")
        self.reopen_after_crash()
        self.verify_everything()

    def stage(self, op: str, tag: int, r: tuple[int, int]) -> Callable[[], None] | None:
        """Apply `op` without committing; return what the model must do if it lands."""
        try:
            if op == "origin" and self.reverting is None:
                r = fit(r, self.n)
                self.engine.origin_write([r])
                self.rewritten.update(range(r[0], r[0] + r[1]))
                return lambda: None  # the client never wrote: contents unchanged
            if op == "snapshot" and tag in self.snaps:
                r = fit(r, len(self.snaps[tag]))
                self.engine.snapshot_write(tag, [r])
                self.rewritten.update(range(r[0], r[0] + r[1]))
                return lambda: None
            if op == "create" and tag not in self.snaps:
                self.engine.create_snapshot(tag)
                versions = self.expect(None)

                def created() -> None:
                    self.snaps[tag] = versions
                    self.use[tag] = 0

                return created
            if op == "delete" and tag in self.snaps and not self.use[tag]:
                self.engine.delete_snapshot(tag)

                def deleted() -> None:
                    del self.snaps[tag], self.use[tag]

                return deleted
        except (
            SnapshotExistsError,
            SnapshotNotFoundError,
            RequestTooLargeError,
            RevertInProgressError,
        ):
            return None
        return None

    @precondition(lambda self: self.crashes)
    @rule(op=OPS, data=st.data(), r=chunk_ranges())
    def crash_before_commit(self, op: str, data: st.DataObject, r: tuple[int, int]) -> None:
        """An applied but uncommitted request never survives a crash."""
        self.stage(op, self.pick_tag(data), r)
        self.reopen_after_crash()
        self.verify_everything()

    @precondition(lambda self: self.crashes)
    @rule(
        ops=st.lists(st.tuples(OPS, chunk_ranges()), min_size=1, max_size=3),
        data=st.data(),
        cut=st.integers(0, 16),
    )
    def power_cut_during_commit(
        self, ops: list[tuple[str, tuple[int, int]]], data: st.DataObject, cut: int
    ) -> None:
        """A commit cut short lands whole or not at all."""
        staged = (self.stage(op, self.pick_tag(data), r) for op, r in ops)
        effects = [e for e in staged if e is not None]
        before = set(self.snaps)
        self.store.budget = cut
        try:
            self.engine.commit()
            landed = True
        except EngineFailedError:
            landed = None  # unknown: it may or may not be durable
        self.store.budget = 1 << 62
        saved = ({t: list(v) for t, v in self.snaps.items()}, dict(self.use))
        for effect in effects:
            effect()
        after = set(self.snaps)
        self.reopen_after_crash()
        found = {info.tag for info in self.engine.snapshots()}
        if landed or found != before:
            assert found == after, (before, after, found)
        else:
            self.snaps, self.use = saved
        self.verify_everything()

    # -- invariants ------------------------------------------------------------

    @invariant()
    def matches_model(self) -> None:
        infos = self.engine.snapshots()
        assert {info.tag for info in infos} == set(self.snaps)
        for info in infos:
            assert info.use_count == self.use[info.tag]
        assert not self.engine.pending
        assert_clean(self.store_device())
        sample = [self.rng.randrange(self.n) for _ in range(8)]
        for tag in [None, *self.snaps]:
            self.verify(tag, sample)
        views: list[int | None] = [None, *sorted(self.snaps)]
        self.check_changes(self.rng.choice(views), self.rng.choice(views))

    def check_changes(self, base: int | None, target: int | None) -> None:
        """The changelist of the whole origin, in small answers, against the
        model, over the chunks both views have."""
        listed: set[int] = set()
        start: int | None = 0
        leaves = self.rng.choice([1, 2, 256])
        n = self.n
        for _ in range(n + 1):
            if start is None:
                break
            answer = self.engine.changes(
                base, target, start, n - start, max_runs=3, max_leaves=leaves
            )
            assert len(answer.runs) <= 3
            for first, count in answer.runs:
                assert first >= start and (answer.next is None or first + count <= answer.next)
                listed.update(range(first, first + count))
            assert answer.next is None or answer.next > start
            start = answer.next
        assert start is None, "the changelist did not finish"
        old, new = self.expect(base), self.expect(target)
        both = min(len(old), len(new))
        listed = {chunk for chunk in listed if chunk < both}
        differ = {chunk for chunk in range(both) if old[chunk] != new[chunk]}
        assert differ <= listed, (base, target, sorted(differ - listed)[:8])
        assert listed - differ <= self.rewritten, (base, target, sorted(listed - differ)[:8])


class FileEngineMachine(EngineMachine):
    """The same, on real files with real fdatasync; restarts instead of crashes."""

    crashes = False

    def __init__(self) -> None:
        self.tmp = tempfile.TemporaryDirectory()
        super().__init__()

    def open(self) -> Engine:
        if not hasattr(self, "file_store"):
            path = os.path.join(self.tmp.name, "store")
            with open(path, "wb") as f:
                f.truncate(self.g.store_bytes)
            self.file_store = FileDevice(path)
            format_device(self.file_store, self.g)
        return Engine.open(
            self.file_store,
            self.origin,
            cache_bytes=48 * 4096,
            clock=self.tick,
            step_timer=still_timer,
        )

    def store_device(self) -> BlockDevice:
        return self.file_store

    def client_write(self, address: int, data: bytes) -> None:
        self.file_store.write(address, data)

    @rule(data=st.data(), r=chunk_ranges())
    def snapshot_write(self, data: st.DataObject, r: tuple[int, int]) -> None:
        tag = self.pick_tag(data)
        if tag not in self.snaps or tag == self.reverting:
            return
        r = fit(r, len(self.snaps[tag]))
        try:
            segments = self.engine.snapshot_write(tag, [r])
        except RequestTooLargeError:
            return
        self.engine.commit()
        version = self.next_version()
        size = self.g.chunk_size
        for segment in segments:
            for k in range(segment.count):
                chunk = segment.chunk + k
                self.file_store.write(
                    (segment.store_chunk + k) * size, pattern(chunk, version, size)
                )
                self.snaps[tag][chunk] = version

    def teardown(self) -> None:
        self.engine.close()
        self.file_store.close()
        self.tmp.cleanup()


# Derandomised unless a hunting profile is chosen: the same examples in every
# run, whatever ran before (no example database), so a defect the examples
# reach is found by this file alone, every time. Shrinking a failure can take
# hypothesis five minutes here; it is left to CSNAP_MODEL_SHRINK=1 (the
# unshrunk steps are printed all the same, and replay the same way).
HUNTING = bool(os.environ.get("CSNAP_HYPOTHESIS_PROFILE"))
SHRINK = HUNTING or bool(os.environ.get("CSNAP_MODEL_SHRINK"))
_settings = settings(
    max_examples=EXAMPLES,
    stateful_step_count=STEPS,
    derandomize=not HUNTING,
    database=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate, *([Phase.shrink] if SHRINK else [])],
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

TestEngineModel = EngineMachine.TestCase
TestEngineModel.settings = _settings
TestEngineOnFiles = FileEngineMachine.TestCase
TestEngineOnFiles.settings = _settings
