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

A snapshot write that brings its bytes (whole chunks of a new version) is
written into its copies by the engine, inside the request: which version a
snapshot reads is then an effect of the commit ("data"), in flight with it,
and a crash state that cannot tell from the snapshots whether that commit
landed tells from what the snapshot reads. When the engine hands the chunks
out instead, the client writes them after the commit, as for any snapshot
write.

A request that finds the store full squashes snapshots in commits of its
own before the one that acknowledges it: those squashes are effects of the
acknowledging commit, and a crash state may hold any of them early (a
squashed snapshot keeps its tag and is no longer read).

A lifecycle workload also reverts and grows. A revert is started by a
request and advanced by steps of their own, between other requests, sweeps
and restarts; while it runs the workload issues no origin write and no
create (the server holds them) and leaves the snapshot being reverted
alone. A step writes the origin and syncs it before its commit, so its
origin writes enter the trace as durable ("origin" events) before the
commit's store writes; a crash inside a step, origin writes lost or torn,
is tests/crash/test_revert_crash.py's. The origin grows once (to
GROWN_ORIGIN_CHUNKS) and later the store (by STORE_GROWTH), each a resize
of its own at a step drawn from the seed; every snapshot keeps the size it
was taken at.

A crash state at a write boundary keeps everything synced, every client
write, and a chosen subset of the unsynced engine writes since the last
sync, some of them torn at 512-byte sectors. It must recover to a store
that the full check finds clean, whose snapshots are those acknowledged,
plus possibly the effects of the one commit in flight (acknowledged ⊆
recovered ⊆ issued), each reading exactly what the model says; likewise the
revert in progress and the origin and store sizes. And every copy the btree
points at, live or being deleted, must hold data of its own chunk, which is
what makes a chunk reused before its free was durable (rule: no reuse
before durable) visible. A state that recovers with a revert in progress
(one sampled per write boundary) then finishes it: the origin must read the
snapshot's content, and every snapshot what it read before.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from csnap_format import Geometry, plan_geometry
from csnapd.engine import (
    Engine,
    MemoryDevice,
    RequestTooLargeError,
    RevertInProgressError,
    SnapshotBusyError,
    SnapshotUnavailableError,
    StoreFullError,
    WriteSegment,
)
from csnapd.engine.check import check_store
from tests.engine.helpers import UUID, format_device, pattern, read_snapshot

Event = tuple[str, int, bytes]
#: A commit's effect: (kind, tag, created_ns) for "create", "delete",
#: "squash", "revert" (started) and "reverted" (finished); ("grow_origin",
#: origin chunks, 0) and ("grow_store", store chunks, 0) for a resize;
#: ("data", created_ns, version and chunk) for a chunk csnapd wrote into a
#: snapshot's copy (data_effect).
Effect = tuple[str, int, int]

#: Geometry of the crash workloads: small, so that a state costs milliseconds,
#: with the minimum journal so that it wraps and checkpoints all the time.
ORIGIN_CHUNKS = 256
#: What a lifecycle workload grows the origin to, and the store by.
GROWN_ORIGIN_CHUNKS = 320
STORE_GROWTH = 1 << 20


def lifecycle_seed(seed: int) -> bool:
    """Whether the workload of `seed` also reverts and grows the origin and
    the store: all but every third, so that the plain mix of writes keeps
    its share (the same seeds in CI and in the long run)."""
    return seed % 3 != 1


def crash_geometry(store_bytes: int = 4 << 20, max_store_bytes: int | None = None) -> Geometry:
    """The workloads' geometry; `max_store_bytes`: what the store may grow to."""
    return plan_geometry(
        store_bytes=store_bytes,
        origin_bytes=ORIGIN_CHUNKS * 4096,
        journal_bytes=64 * 4096,
        max_store_bytes=max_store_bytes,
        uuid=UUID,
        created_ns=1_700_000_000_000_000_000,
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
    #: Size of the origin device (room to grow in a lifecycle workload).
    origin_bytes: int = ORIGIN_CHUNKS * 4096


def _pack(chunk: int, version: int) -> bytes:
    return struct.pack("<QQ", chunk, version)


#: A "data" effect packs the chunk into the low bits of its third field.
_DATA_CHUNK_BITS = 24


def data_effect(created_ns: int, chunk: int, version: int) -> Effect:
    """The effect of a commit that wrote `version` of `chunk` into the copy
    of the snapshot created at `created_ns` (a snapshot data write)."""
    return ("data", created_ns, version << _DATA_CHUNK_BITS | chunk)


class _Runner:
    """Drives an Engine with random operations, recording the trace."""

    def __init__(
        self,
        seed: int,
        g: Geometry,
        *,
        filling: bool = False,
        reclaim: bool = True,
        lifecycle: bool = False,
    ):
        #: Mostly creates and large origin writes: the store fills and squashes.
        self.filling = filling
        #: Whether a full store makes room (the store-full policy) or refuses.
        self.reclaim = reclaim
        #: Whether reverts and resizes are among the steps.
        self.lifecycle = lifecycle
        self.rng = random.Random(seed)
        self.g = g
        self.trace: list[Event] = []
        self.base = MemoryDevice(g.store_bytes + STORE_GROWTH if lifecycle else g.store_bytes)
        format_device(self.base, g)
        self.store = self.base.durable_copy()
        self.store.log = self.trace
        self.origin_bytes = GROWN_ORIGIN_CHUNKS * g.chunk_size if lifecycle else g.origin_bytes
        self.origin = MemoryDevice(self.origin_bytes)
        #: The snapshot the origin is being reverted to, if a revert runs.
        self.reverting: int | None = None
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

    def _range(self, chunks: int | None = None) -> tuple[int, int]:
        """A random run of chunks below `chunks` (the origin's size by default)."""
        end = self.engine.geometry.origin_chunks if chunks is None else chunks
        start = self.rng.randrange(end)
        count = self.rng.choice((17, 64, 128, 256) if self.filling else (1, 1, 2, 3, 8, 17, 40))
        return start, min(count, end - start)

    def _commit(self, effects: list[Effect]) -> None:
        self.engine.commit()
        self.commits += 1
        self.effects[self.commits] = effects
        self.trace.append(("ack", self.commits, b""))

    # -- one request, staged; returns its effect and the client's follow-up --

    def _stage(self, after_origin_write: bool) -> tuple[str, list[Effect], Callable[[], object]]:
        # A filling workload's mix is the store-full policy's: no data writes.
        kinds = ["create", "delete", "origin", "snapshot", "data", "priority"]
        weights = [4, 1, 8, 2, 0, 1] if self.filling else [3, 2, 8, 3, 2, 1]
        if self.lifecycle:
            kinds.append("revert")
            weights.append(1)
        kind = self.rng.choices(kinds, weights=weights)[0]
        # While a revert runs, the server holds origin writes and refuses
        # creates; the snapshot being reverted is neither written nor deleted.
        others = sorted(t for t in self.live if t != self.reverting)
        # A server never commits a create after an origin write it granted in
        # the same transaction: that write lands after the snapshot was taken.
        # (The protocol's create barrier; docs/protocol.md.)
        if (
            kind == "create"
            and len(self.live) < 6
            and not after_origin_write
            and self.reverting is None
        ):
            tag = self.rng.choice([t for t in range(10) if t not in self.live])
            info = self.engine.create_snapshot(tag, self.rng.randrange(-128, 128))
            self.live[tag] = info.created_ns
            return kind, [("create", tag, info.created_ns)], lambda: None
        if kind == "delete" and others:
            tag = self.rng.choice(others)
            self.engine.delete_snapshot(tag)
            self.squashed.discard(tag)
            return kind, [("delete", tag, self.live.pop(tag))], lambda: None
        if kind == "snapshot" and others:
            tag = self.rng.choice(others)
            size = self.engine.snapshot(tag).origin_chunks
            segments = self.engine.snapshot_write(tag, [self._range(size)], reclaim=self.reclaim)
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
        if kind == "data" and others:
            return self._data_write(self.rng.choice(others))
        if kind == "priority" and self.live:
            self.engine.set_priority(
                self.rng.choice(sorted(self.live)), self.rng.randrange(-128, 128)
            )
            return kind, [], lambda: None
        # The same transaction as an origin write it granted: no (the
        # server starts a revert only once granted writes have ended).
        if kind == "revert" and self.reverting is None and not after_origin_write:
            usable = sorted(t for t in self.live if t not in self.squashed)
            if usable:
                tag = self.rng.choice(usable)
                self.engine.start_revert(tag)
                self.reverting = tag
                return kind, [("revert", tag, self.live[tag])], lambda: None
        if self.reverting is not None:
            return "held", [], lambda: None  # an origin write waits for the revert
        r = self._range()
        self.engine.origin_write([r], reclaim=self.reclaim)
        return "origin", [], lambda: self._client_origin_writes(r)

    def _data_write(self, tag: int) -> tuple[str, list[Effect], Callable[[], object]]:
        """A snapshot write that brings its bytes (whole chunks of a new
        version): csnapd writes them into the copies, part of the commit
        (effects "data"), or hands the chunks out for the client to write
        after it, as a snapshot write's."""
        size = self.g.chunk_size
        start, count = self._range(self.engine.snapshot(tag).origin_chunks)
        count = min(count, 16)
        self.version += 1
        version = self.version
        data = b"".join(pattern(start + k, version, size) for k in range(count))
        segments, written = self.engine.snapshot_write_data(tag, start * size, data)
        if written:
            created_ns = self.live[tag]
            return (
                "data",
                [data_effect(created_ns, start + k, version) for k in range(count)],
                (lambda: None),
            )
        return (
            "data",
            [],
            lambda: (
                tag in self.live
                and tag not in self.squashed
                and self._client_snapshot_writes(tag, segments, version)
            ),
        )

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

    def _client_snapshot_writes(
        self, tag: int, segments: list[WriteSegment], version: int | None = None
    ) -> bool:
        if version is None:
            self.version += 1
            version = self.version
        size = self.g.chunk_size
        for segment in segments:
            for k in range(segment.count):
                chunk = segment.chunk + k
                self.trace.append(("view", tag, _pack(chunk, version)))
                address = (segment.store_chunk + k) * size
                self.store.write_through(address, pattern(chunk, version, size))
        return True

    def _revert_step(self) -> None:
        """One step of the revert in progress, committed on its own."""
        assert self.reverting is not None
        tag = self.reverting
        written: list[Event] = []
        self.origin.log = written
        try:
            more = self.engine.revert_step(reclaim=self.reclaim)
        except (StoreFullError, SnapshotBusyError, SnapshotUnavailableError):
            # No room for other snapshots' copies: tried again later.
            self._commit(self._squashes())
            return
        finally:
            self.origin.log = None
        effects = self._squashes()
        self._restored(written)
        if not more:
            effects.append(("reverted", tag, self.live[tag]))
            self.reverting = None
        self._commit(effects)

    def _restored(self, written: list[Event]) -> None:
        """The origin writes of a revert step (synced already), as origin events."""
        size = self.g.chunk_size
        for kind, offset, data in written:
            if kind == "sync":
                continue
            for k in range(len(data) // size):
                chunk = offset // size + k
                content = bytes(data[k * size : (k + 1) * size])
                version = struct.unpack_from("<QQ", content)[1] if any(content) else 0
                assert content == pattern(chunk, version, size), f"restored chunk {chunk}"
                self.trace.append(("origin", chunk, struct.pack("<Q", version)))

    def _resize(
        self, effect: Effect, *, origin_bytes: int | None = None, store_bytes: int | None = None
    ) -> None:
        """A resize, committed on its own (Engine.resize commits what is pending)."""
        self.engine.resize(origin_bytes=origin_bytes, store_bytes=store_bytes)
        self.commits += 1
        self.effects[self.commits] = [effect]
        self.trace.append(("ack", self.commits, b""))

    def grow_origin(self) -> None:
        grown = GROWN_ORIGIN_CHUNKS
        self._resize(("grow_origin", grown, 0), origin_bytes=grown * self.g.chunk_size)

    def grow_store(self) -> None:
        store_bytes = self.engine.geometry.store_bytes + STORE_GROWTH
        self._resize(("grow_store", store_bytes // self.g.chunk_size, 0), store_bytes=store_bytes)

    def step(self) -> None:
        roll = self.rng.random()
        if roll < 0.04:
            self.engine.close()
            self.engine = self._open()
            return
        if self.reverting is not None and self.rng.random() < 0.3:
            self._revert_step()
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
                RevertInProgressError,
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
    lifecycle: bool = False,
) -> Workload:
    """Run `operations` random steps and return the recorded trace.

    A small `store_bytes` keeps the store nearly full, so allocation wraps
    around onto chunks freed moments before; `filling` favours creates and
    large origin writes, so that the store-full policy squashes often;
    without `reclaim` a full store refuses copy-outs instead; `lifecycle`
    adds reverts and the growing of the origin and the store.
    """
    g = crash_geometry(store_bytes, store_bytes + STORE_GROWTH if lifecycle else None)
    runner = _Runner(seed, g, filling=filling, reclaim=reclaim, lifecycle=lifecycle)
    # When the origin grows, and later the store: at steps drawn apart from
    # the workload's own, among its first and last halves.
    plan = random.Random(seed + 7919)
    grow_origin_at = plan.randrange(operations // 5, operations // 2) if lifecycle else -1
    grow_store_at = plan.randrange(operations // 2, operations * 4 // 5) if lifecycle else -1
    data_wraps = journal_wraps = 0
    cursor, slot = runner.engine._state.data_cursor, runner.engine._journal.next_slot
    for number in range(operations):
        if number == grow_origin_at:
            runner.grow_origin()
        elif number == grow_store_at:
            runner.grow_store()
        else:
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
        origin_bytes=runner.origin_bytes,
    )


# -- replay and verification -------------------------------------------------


@dataclass
class _Model:
    """What each view reads, as versions per chunk, at a point of the trace."""

    #: Versions of every chunk of the origin device, past the origin's end too.
    origin: list[int]
    #: Live snapshots: tag -> created_ns.
    snaps: dict[int, int]
    #: Contents of every snapshot ever created, by created_ns (its size long).
    contents: dict[int, list[int]]
    #: Snapshots squashed, by created_ns.
    squashed: set[int] = field(default_factory=set)
    origin_chunks: int = ORIGIN_CHUNKS
    store_chunks: int = 0
    #: The snapshot the origin is being reverted to, by created_ns.
    reverting: int | None = None

    def copy(self) -> _Model:
        return _Model(
            self.origin,
            dict(self.snaps),
            dict(self.contents),
            set(self.squashed),
            self.origin_chunks,
            self.store_chunks,
            self.reverting,
        )


@dataclass
class CrashStats:
    points: int = 0
    states: int = 0
    torn: int = 0
    in_flight_landed: int = 0
    #: States that recovered with a revert in progress, and those of them
    #: whose revert was finished and checked.
    reverting: int = 0
    reverts_finished: int = 0


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
    origin = MemoryDevice(workload.origin_bytes)
    model = _Model(
        [0] * (workload.origin_bytes // g.chunk_size),
        {},
        {},
        origin_chunks=g.origin_chunks,
        store_chunks=g.store_chunks,
    )
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
            # Durable at once, as the trace says; and every read of a device
            # looks through its unsynced writes, which would pile up here.
            origin.sync()
            model.origin[a] = version
            continue
        elif kind == "view":
            chunk, version = struct.unpack("<QQ", data)
            model.contents[model.snaps[a]][chunk] = version
            continue
        elif kind == "ack":
            acked = a
            _check_reverted(model, workload.effects[a], index)
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
                landed = _verify(
                    image, origin, model, in_flight, g, finish_revert=label == "prefix", stats=stats
                )
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


def _check_reverted(model: _Model, effects: list[Effect], index: int) -> None:
    """A revert acknowledged as finished left the origin reading its snapshot."""
    for kind, tag, created_ns in effects:
        target = model.contents[created_ns] if kind == "reverted" else None
        if target is not None and model.origin[: len(target)] != target:
            raise CrashCheckError(f"trace event {index}: the origin reverted to {tag} differs")


def _apply(model: _Model, effects: list[Effect]) -> None:
    for kind, tag, created_ns in effects:
        if kind == "create":
            model.snaps[tag] = created_ns
            model.contents[created_ns] = model.origin[: model.origin_chunks]
        elif kind == "squash":
            model.squashed.add(created_ns)
        elif kind == "delete":
            del model.snaps[tag]
        elif kind == "revert":
            model.reverting = created_ns
        elif kind == "reverted":
            model.reverting = None
        elif kind == "data":
            # `tag` is the snapshot's created_ns here; the list may be shared
            # with the model this one was copied from.
            versions = model.contents[tag] = list(model.contents[tag])
            chunk = created_ns & ((1 << _DATA_CHUNK_BITS) - 1)
            versions[chunk] = created_ns >> _DATA_CHUNK_BITS
        elif kind == "grow_origin":
            model.origin_chunks = tag
        else:
            assert kind == "grow_store", kind
            model.store_chunks = tag


def _verify(
    image: MemoryDevice,
    origin: MemoryDevice,
    model: _Model,
    in_flight: list[Effect],
    g: Geometry,
    *,
    finish_revert: bool = False,
    stats: CrashStats | None = None,
) -> bool:
    """Check one crash image; returns whether the in-flight commit landed.

    With `finish_revert`, a revert the store recovers with is run to its end
    (on a copy of the origin) and checked.
    """
    report = check_store(image)
    assert report.fatal is None, f"check could not run: {report.fatal}"
    assert not report.problems, "; ".join(map(str, report.problems[:3]))
    engine = Engine.open(image, origin)
    assert engine.recovery.problem is None, engine.recovery.problem
    # Snapshots by tag and creation time: a batch may delete a tag and create
    # it again, and only the creation time tells the two snapshots apart.
    found = {(info.tag, info.created_ns) for info in engine.snapshots()}
    expected = model.copy()
    squashed = {info.created_ns for info in engine.snapshots() if info.state == "squashed"}
    # Squashes are committed before the commit that acknowledges them: the
    # in-flight commit's may be there whether or not it landed.
    may_squash = expected.squashed | {t for kind, _, t in in_flight if kind == "squash"}
    assert expected.squashed & {created for _, created in found} <= squashed, "a squash was lost"
    assert squashed <= may_squash, f"squashed {sorted(squashed - may_squash)} unasked"
    revert = engine.revert_progress
    now = (
        found,
        engine.geometry.origin_chunks,
        engine.geometry.store_chunks,
        None if revert is None else engine.snapshot(revert.tag).created_ns,
    )

    def wanted() -> tuple[set[tuple[int, int]], int, int, int | None]:
        return (
            set(expected.snaps.items()),
            expected.origin_chunks,
            expected.store_chunks,
            expected.reverting,
        )

    def reads_as_modelled() -> bool:
        try:
            _check_snapshots(engine, image, origin, expected, squashed, g)
        except AssertionError:
            return False
        return True

    landed = False
    if in_flight and (
        now != wanted()
        # Only a snapshot's data may tell whether the commit landed.
        or (any(kind == "data" for kind, _, _ in in_flight) and not reads_as_modelled())
    ):
        _apply(expected, in_flight)
        landed = True
    assert now == wanted(), (
        f"recovered (snapshots, origin and store size, revert) {now}, expected {wanted()}"
    )
    _check_snapshots(engine, image, origin, expected, squashed, g)
    problem = misplaced_copy(engine, image, g.chunk_size)
    if problem is not None:
        raise AssertionError(problem)
    if revert is not None and stats is not None:
        stats.reverting += 1
    if revert is not None and finish_revert:
        _finish_revert(engine, image, origin, expected, squashed, g)
        if stats is not None:
            stats.reverts_finished += 1
    return landed


def _check_snapshots(
    engine: Engine,
    image: MemoryDevice,
    origin: MemoryDevice,
    expected: _Model,
    squashed: set[int],
    g: Geometry,
) -> None:
    """Every snapshot not squashed has its size and reads what the model says."""
    size = g.chunk_size
    for tag, created_ns in expected.snaps.items():
        if created_ns in squashed:
            continue
        versions = expected.contents[created_ns]
        assert engine.snapshot(tag).origin_chunks == len(versions), f"snapshot {tag}'s size"
        got = read_snapshot(engine, image, origin, tag, 0, len(versions))
        for chunk, data in enumerate(got):
            if data != pattern(chunk, versions[chunk], size):
                raise AssertionError(f"snapshot {tag} chunk {chunk} reads the wrong data")


def _finish_revert(
    engine: Engine,
    image: MemoryDevice,
    origin: MemoryDevice,
    expected: _Model,
    squashed: set[int],
    g: Geometry,
) -> None:
    """Run the recovered revert to its end on a copy of the origin: the origin
    then reads the snapshot's content, every snapshot as before."""
    assert expected.reverting is not None
    engine.close()
    copy = origin.snapshot_copy()
    engine = Engine.open(image, copy)
    engine.finish_revert()
    assert engine.revert_progress is None
    target = expected.contents[expected.reverting]
    size = g.chunk_size
    for chunk, version in enumerate(target):
        if copy.read(chunk * size, size) != pattern(chunk, version, size):
            raise AssertionError(f"reverted origin chunk {chunk} differs from the snapshot")
    # Finishing may squash expendable snapshots for room, as the store-full
    # policy lets any copy-out do: those are no longer read.
    squashed = {info.created_ns for info in engine.snapshots() if info.state == "squashed"}
    _check_snapshots(engine, image, copy, expected, squashed, g)
    engine.close()


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
