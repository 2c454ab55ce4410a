"""Crash-state enumeration: run a seeded workload on a recording memory store,
then rebuild the store as a power cut would leave it at every write
boundary, recover each image, and check it.

The trace is one ordered list of events:
  ("write", offset, data)    a store write the engine issued (not yet durable)
  ("sync", 0, b"")           a store sync: every earlier write is durable
  ("durable", offset, data)  a client's own write to a snapshot's store chunk,
                             durable when issued (it flushes itself)
  ("origin", chunk, version) a client write to the origin (after its ack)
  ("view", tag, chunk|version) the model learns a snapshot chunk's new version
  ("ack", n, b"")            commit n returned: its effects are acknowledged

A request that finds the store full squashes snapshots in commits of its
own before the one that acknowledges it: those squashes are effects of the
acknowledging commit, and a crash state may hold any of them early (a
squashed snapshot keeps its tag and is no longer read).

A crash state at a write boundary keeps everything synced, every client
write, and a chosen subset of the unsynced engine writes since the last
sync, some of them torn at 512-byte sectors. It must recover to a store
that the full check finds clean, whose snapshots are those acknowledged,
plus possibly the effects of the one commit in flight (acknowledged ⊆
recovered ⊆ issued), each reading exactly what the model says. And every
copy the btree points at, live or being deleted, must hold data of its own
chunk, which is what makes a chunk reused before its free was durable
(rule: no reuse before durable) visible.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from csnap_format import Geometry
from csnapd.engine import (
    Engine,
    MemoryDevice,
    RequestTooLargeError,
    SnapshotBusyError,
    SnapshotUnavailableError,
    StoreFullError,
    WriteSegment,
)
from csnapd.engine.check import check_store
from tests.engine.helpers import format_device, new_geometry, pattern, read_snapshot

Event = tuple[str, int, bytes]
#: A commit's effect on the snapshot set: (kind, tag, created_ns); kind is
#: "create", "delete" or "squash".
Effect = tuple[str, int, int]

#: Geometry of the crash workloads: small, so that a state costs milliseconds,
#: with the minimum journal so that it wraps and checkpoints all the time.
ORIGIN_CHUNKS = 256


def crash_geometry(store_bytes: int = 4 << 20) -> Geometry:
    return new_geometry(
        store_bytes=store_bytes, origin_bytes=ORIGIN_CHUNKS * 4096, journal_bytes=64 * 4096
    )


@dataclass
class Workload:
    """A recorded run: the formatted image, the trace, and commit effects."""

    geometry: Geometry
    base: MemoryDevice
    trace: list[Event]
    #: Effects of commit n: ("create" | "delete" | "squash", tag, snapshot's created_ns).
    effects: dict[int, list[Effect]] = field(default_factory=dict)
    #: Times the data allocation cursor went back to the area's start.
    data_wraps: int = 0
    #: Times the journal's next slot went back to its first slot.
    journal_wraps: int = 0


def _pack(chunk: int, version: int) -> bytes:
    return struct.pack("<QQ", chunk, version)


class _Runner:
    """Drives an Engine with random operations, recording the trace."""

    def __init__(self, seed: int, g: Geometry, *, filling: bool = False, reclaim: bool = True):
        #: Mostly creates and large origin writes: the store fills and squashes.
        self.filling = filling
        #: Whether a full store makes room (the store-full policy) or refuses.
        self.reclaim = reclaim
        self.rng = random.Random(seed)
        self.g = g
        self.trace: list[Event] = []
        self.base = MemoryDevice(g.store_bytes)
        format_device(self.base, g)
        self.store = self.base.durable_copy()
        self.store.log = self.trace
        self.origin = MemoryDevice(g.origin_bytes)
        self.clock = 0
        self.engine = self._open()
        self.live: dict[int, int] = {}  # tag -> created_ns, squashed ones too
        self.squashed: set[int] = set()
        self.used: dict[int, int] = {}
        self.version = 0
        self.commits = 0
        self.effects: dict[int, list[Effect]] = {}

    def _tick(self) -> int:
        self.clock += 1
        return self.clock

    def _open(self) -> Engine:
        return Engine.open(self.store, self.origin, cache_bytes=32 * 4096, clock=self._tick)

    def _range(self) -> tuple[int, int]:
        start = self.rng.randrange(ORIGIN_CHUNKS)
        count = self.rng.choice((17, 64, 128, 256) if self.filling else (1, 1, 2, 3, 8, 17, 40))
        return start, min(count, ORIGIN_CHUNKS - start)

    def _commit(self, effects: list[Effect]) -> None:
        self.engine.commit()
        self.commits += 1
        self.effects[self.commits] = effects
        self.trace.append(("ack", self.commits, b""))

    # -- one request, staged; returns its effect and the client's follow-up --

    def _stage(self, after_origin_write: bool) -> tuple[str, list[Effect], Callable[[], object]]:
        kind = self.rng.choices(
            ["create", "delete", "origin", "snapshot", "priority"],
            weights=[4, 1, 8, 2, 1] if self.filling else [3, 2, 8, 5, 1],
        )[0]
        # A server never commits a create after an origin write it granted in
        # the same transaction: that write lands after the snapshot was taken.
        # (The protocol's create barrier; docs/protocol.md.)
        if kind == "create" and len(self.live) < 6 and not after_origin_write:
            tag = self.rng.choice([t for t in range(10) if t not in self.live])
            info = self.engine.create_snapshot(tag, self.rng.randrange(-128, 128))
            self.live[tag] = info.created_ns
            return kind, [("create", tag, info.created_ns)], lambda: None
        if kind == "delete" and self.live:
            tag = self.rng.choice(sorted(self.live))
            self.engine.delete_snapshot(tag)
            self.squashed.discard(tag)
            return kind, [("delete", tag, self.live.pop(tag))], lambda: None
        if kind == "snapshot" and self.live:
            tag = self.rng.choice(sorted(self.live))
            segments = self.engine.snapshot_write(tag, [self._range()], reclaim=self.reclaim)
            # A client whose snapshot is deleted (or squashed) in the same
            # commit never writes.
            return (
                kind,
                [],
                lambda: (
                    tag in self.live
                    and tag not in self.squashed
                    and self._client_snapshot_writes(tag, segments)
                ),
            )
        if kind == "priority" and self.live:
            self.engine.set_priority(
                self.rng.choice(sorted(self.live)), self.rng.randrange(-128, 128)
            )
            return kind, [], lambda: None
        r = self._range()
        self.engine.origin_write([r], reclaim=self.reclaim)
        return "origin", [], lambda: self._client_origin_writes(r)

    def _squashes(self) -> list[Effect]:
        """The snapshots the last request squashed to make room, as effects."""
        effects: list[Effect] = []
        for squashed in self.engine.take_squashed():
            self.squashed.add(squashed.tag)
            effects.append(("squash", squashed.tag, self.live[squashed.tag]))
        return effects

    def _client_origin_writes(self, r: tuple[int, int]) -> None:
        self.version += 1
        size = self.g.chunk_size
        for chunk in range(r[0], r[0] + r[1]):
            self.trace.append(("origin", chunk, struct.pack("<Q", self.version)))
            self.origin.write(chunk * size, pattern(chunk, self.version, size))

    def _client_snapshot_writes(self, tag: int, segments: list[WriteSegment]) -> bool:
        self.version += 1
        size = self.g.chunk_size
        for segment in segments:
            for k in range(segment.count):
                chunk = segment.chunk + k
                self.trace.append(("view", tag, _pack(chunk, self.version)))
                address = (segment.store_chunk + k) * size
                self.store.write_through(address, pattern(chunk, self.version, size))
        return True

    def step(self) -> None:
        roll = self.rng.random()
        if roll < 0.04:
            self.engine.close()
            self.engine = self._open()
            return
        batch = 1 if roll < 0.8 else self.rng.randrange(2, 4)
        if roll < 0.14 and self.engine.sweep_pending:
            # A sweep step, alone or sharing its transaction with requests.
            self.engine.sweep()
            if roll < 0.09:
                self._commit([])
                return
        effects: list[Effect] = []
        followups: list[Callable[[], object]] = []
        granted = False
        for _ in range(batch):
            try:
                kind, effect, followup = self._stage(granted)
            except (
                StoreFullError,
                RequestTooLargeError,
                SnapshotBusyError,
                SnapshotUnavailableError,
            ):
                # Snapshots it squashed before it failed stay squashed.
                effects += self._squashes()
                continue
            effects += self._squashes()
            granted |= kind == "origin"
            effects += effect
            followups.append(followup)
        self._commit(effects)
        for followup in followups:
            followup()


def run_workload(
    seed: int,
    operations: int,
    *,
    store_bytes: int = 4 << 20,
    filling: bool = False,
    reclaim: bool = True,
) -> Workload:
    """Run `operations` random steps and return the recorded trace.

    A small `store_bytes` keeps the store nearly full, so allocation wraps
    around onto chunks freed moments before; `filling` favours creates and
    large origin writes, so that the store-full policy squashes often;
    without `reclaim` a full store refuses copy-outs instead.
    """
    g = crash_geometry(store_bytes)
    runner = _Runner(seed, g, filling=filling, reclaim=reclaim)
    data_wraps = journal_wraps = 0
    cursor, slot = runner.engine._state.data_cursor, runner.engine._journal.next_slot
    for _ in range(operations):
        runner.step()
        now_cursor, now_slot = runner.engine._state.data_cursor, runner.engine._journal.next_slot
        data_wraps += now_cursor < cursor
        journal_wraps += now_slot < slot
        cursor, slot = now_cursor, now_slot
    runner.engine.close()
    return Workload(
        g,
        runner.base,
        runner.trace,
        runner.effects,
        data_wraps=data_wraps,
        journal_wraps=journal_wraps,
    )


# -- replay and verification -------------------------------------------------


@dataclass
class _Model:
    """What each view reads, as versions per chunk, at a point of the trace."""

    origin: list[int]
    #: Live snapshots: tag -> created_ns.
    snaps: dict[int, int]
    #: Contents of every snapshot ever created, by created_ns.
    contents: dict[int, list[int]]
    #: Snapshots squashed, by created_ns.
    squashed: set[int] = field(default_factory=set)


@dataclass
class CrashStats:
    points: int = 0
    states: int = 0
    torn: int = 0
    in_flight_landed: int = 0


class CrashCheckError(AssertionError):
    """A crash state that recovered wrongly, with what was kept."""


def crash_states(
    pending: list[int], sectors: list[int], rng: random.Random, subsets: int
) -> Iterator[tuple[str, dict[int, list[int] | None]]]:
    """Which unsynced writes survive: every one, none, each one dropped or
    kept alone, random subsets, and torn variants."""
    yield "prefix", dict.fromkeys(pending)
    if not pending:
        return
    yield "none", {}
    for index in pending[:4]:
        yield f"drop {index}", {i: None for i in pending if i != index}
        if len(pending) > 1:
            yield f"only {index}", {index: None}
    for n in range(subsets):
        chosen = [i for i in pending if rng.random() < 0.5]
        yield f"subset {n}", dict.fromkeys(chosen)
    tearable = [i for i in pending if sectors[i] > 1]
    if tearable:
        victim = rng.choice(tearable)
        kept: dict[int, list[int] | None] = {i: None for i in pending if rng.random() < 0.7}
        kept[victim] = [s for s in range(sectors[victim]) if rng.random() < 0.5]
        yield f"torn {victim}", kept


def enumerate_crashes(
    workload: Workload,
    *,
    seed: int = 0,
    subsets: int = 2,
    stride: int = 1,
    limit: int | None = None,
    stats: CrashStats | None = None,
) -> CrashStats:
    """Check crash states at every `stride`-th write boundary of the trace.

    Raises:
        CrashCheckError: the first state that recovered wrongly.
    """
    g = workload.geometry
    stats = stats if stats is not None else CrashStats()
    rng = random.Random(seed)
    replay = workload.base.durable_copy()
    origin = MemoryDevice(g.origin_bytes)
    model = _Model([0] * ORIGIN_CHUNKS, {}, {})
    acked = 0
    boundary = 0
    for index, (kind, a, data) in enumerate(workload.trace):
        if kind == "write":
            replay.write(a, data)
        elif kind == "durable":
            replay.write_through(a, data)
        elif kind == "sync":
            replay.sync()
        elif kind == "origin":
            version = struct.unpack("<Q", data)[0]
            origin.write(a * g.chunk_size, pattern(a, version, g.chunk_size))
            model.origin[a] = version
            continue
        elif kind == "view":
            chunk, version = struct.unpack("<QQ", data)
            model.contents[model.snaps[a]][chunk] = version
            continue
        elif kind == "ack":
            acked = a
            _apply(model, workload.effects[a])
            continue
        boundary += 1
        if boundary % stride:
            continue
        stats.points += 1
        pending = [i for i, w in enumerate(replay.pending) if not w.durable]
        sectors = [w.sectors for w in replay.pending]
        in_flight = workload.effects.get(acked + 1, [])
        for label, kept in crash_states(pending, sectors, rng, subsets):
            image = replay.crash(kept)
            try:
                landed = _verify(image, origin, model, in_flight, g)
            except AssertionError as exc:
                raise CrashCheckError(
                    f"trace event {index} ({kind}), state {label!r}: {exc}"
                ) from exc
            stats.states += 1
            stats.torn += label.startswith("torn")
            stats.in_flight_landed += landed
            if limit is not None and stats.states >= limit:
                return stats
    return stats


def _apply(model: _Model, effects: list[Effect]) -> None:
    for kind, tag, created_ns in effects:
        if kind == "create":
            model.snaps[tag] = created_ns
            model.contents[created_ns] = list(model.origin)
        elif kind == "squash":
            model.squashed.add(created_ns)
        else:
            del model.snaps[tag]


def _verify(
    image: MemoryDevice,
    origin: MemoryDevice,
    model: _Model,
    in_flight: list[Effect],
    g: Geometry,
) -> bool:
    """Check one crash image; returns whether the in-flight commit landed."""
    report = check_store(image)
    assert report.fatal is None, f"check could not run: {report.fatal}"
    assert not report.problems, "; ".join(map(str, report.problems[:3]))
    engine = Engine.open(image, origin)
    assert engine.recovery.problem is None, engine.recovery.problem
    # Snapshots by tag and creation time: a batch may delete a tag and create
    # it again, and only the creation time tells the two snapshots apart.
    found = {(info.tag, info.created_ns) for info in engine.snapshots()}
    expected = _Model(model.origin, dict(model.snaps), dict(model.contents), set(model.squashed))
    squashed = {info.created_ns for info in engine.snapshots() if info.state == "squashed"}
    # Squashes are committed before the commit that acknowledges them: the
    # in-flight commit's may be there whether or not it landed.
    may_squash = expected.squashed | {t for kind, _, t in in_flight if kind == "squash"}
    assert expected.squashed & {created for _, created in found} <= squashed, "a squash was lost"
    assert squashed <= may_squash, f"squashed {sorted(squashed - may_squash)} unasked"
    landed = False
    if found != set(expected.snaps.items()) and in_flight:
        _apply(expected, in_flight)
        landed = True
    assert found == set(expected.snaps.items()), (
        f"snapshots {sorted(found)}, expected {sorted(expected.snaps.items())}"
    )
    size = g.chunk_size
    for tag, created_ns in expected.snaps.items():
        if created_ns in squashed:
            continue
        versions = expected.contents[created_ns]
        got = read_snapshot(engine, image, origin, tag, 0, ORIGIN_CHUNKS)
        for chunk, data in enumerate(got):
            if data != pattern(chunk, versions[chunk], size):
                raise AssertionError(f"snapshot {tag} chunk {chunk} reads the wrong data")
    problem = misplaced_copy(engine, image, size)
    if problem is not None:
        raise AssertionError(problem)
    return landed


def misplaced_copy(engine: Engine, image: MemoryDevice, size: int) -> str | None:
    """The first store copy that holds another chunk's data, described; or None.

    Every copy the btree points at holds data of its own logical chunk: a
    chunk handed out again while a durable exception still used it (no reuse before durable)
    holds another chunk's data. (Workload data is labelled with its chunk
    and version; version 0 is all zeros.)
    """
    zeros = bytes(size)
    for chunk, _, target in engine.exceptions(0, engine.origin_chunks):
        data = image.read(target * size, size)
        if data == zeros:
            continue
        label, version = struct.unpack_from("<QQ", data)
        if label != chunk or not version or data != pattern(chunk, version, size):
            return (
                f"store chunk {target}, a copy of chunk {chunk}, holds other data"
                f" (labelled chunk {label}, version {version})"
            )
    return None
