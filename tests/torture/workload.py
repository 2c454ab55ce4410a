"""A seeded engine workload over a FaultyDevice store, with the model that
says what every snapshot must read, and the check of a store recovered
after the run stopped.

The run applies batches of requests (creates, deletes, priorities, origin
and snapshot writes, snapshot reads, sweep steps, clean close and reopen)
and commits each batch; a client's data writes follow only the commit that
acknowledged them. A request that fails on its own (an I/O error on a read
or on a copy-out write, ENOSPC, a full store) is dropped and the run goes
on; a commit that fails stops it (fail-stop). Afterwards every image the
store may be left in recovers to a store that the full check finds clean,
holding every acknowledged operation and, of the batch in flight, at most
a prefix (acknowledged ⊆ recovered ⊆ issued), each snapshot reading
exactly what the model says.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TypeVar

from csnap_format import Geometry
from csnapd.engine import (
    Engine,
    EngineError,
    EngineFailedError,
    MemoryDevice,
    RequestTooLargeError,
    SnapshotBusyError,
    StoreFullError,
    StoreIOError,
)
from csnapd.engine.check import check_store
from tests.crash.harness import ORIGIN_CHUNKS, crash_geometry, misplaced_copy
from tests.engine.helpers import format_device, pattern, read_snapshot
from tests.torture.faulty import Fault, FaultyDevice

__all__ = ["FaultRun", "Effect", "RecoveryCheckError"]

#: A staged request's effect on the snapshot set: ("create", tag, contents)
#: or ("delete", tag, None).
Effect = tuple[str, int, list[int] | None]

_T = TypeVar("_T")

#: Small cache, so that metadata is read back from the device (and reads can fail).
CACHE_BYTES = 16 * 4096


class RecoveryCheckError(AssertionError):
    """A store recovered after a fault that is not what the model allows."""


@dataclass
class FaultRun:
    """One seeded run; `run()` drives it until `steps` or the first fail-stop."""

    seed: int
    fault: Fault | None = None
    store_bytes: int = 4 << 20
    steps: int = 60
    #: Requests refused alone with an I/O error (the run went on).
    io_errors: int = 0
    #: The failure that stopped the engine, if one did.
    failure: EngineError | None = None
    #: Effects staged since the last acknowledged commit: the batch in flight.
    staged: list[Effect] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.g: Geometry = crash_geometry(self.store_bytes)
        self.mem = MemoryDevice(self.g.store_bytes)
        format_device(self.mem, self.g)
        self.store = FaultyDevice(self.mem, seed=self.seed)
        if self.fault is not None:
            self.store.arm(self.fault)
        self.origin = MemoryDevice(self.g.origin_bytes)
        self.clock = 0
        self.version = 0
        self.origin_versions = [0] * ORIGIN_CHUNKS
        #: Acknowledged live snapshots: tag -> version of each chunk.
        self.snaps: dict[int, list[int]] = {}
        self.engine: Engine | None = None

    # -- driving ---------------------------------------------------------------

    def _tick(self) -> int:
        self.clock += 1
        return self.clock

    def _open(self) -> Engine:
        return Engine.open(self.store, self.origin, cache_bytes=CACHE_BYTES, clock=self._tick)

    def run(self) -> FaultRun:
        try:
            self.engine = self._open()
            for _ in range(self.steps):
                self._step(self.engine)
            self.engine.close()
        except (EngineFailedError, StoreIOError) as exc:
            # A failed commit, or a store that cannot be opened or closed: stop.
            self.failure = exc
        return self

    def _range(self) -> tuple[int, int]:
        start = self.rng.randrange(ORIGIN_CHUNKS)
        count = self.rng.choice((1, 1, 2, 3, 8, 17))
        return start, min(count, ORIGIN_CHUNKS - start)

    def _step(self, engine: Engine) -> None:
        roll = self.rng.random()
        if roll < 0.04:
            engine.close()
            self.engine = engine = self._open()
            return
        if roll < 0.12 and engine.sweep_pending:
            self._alone(engine.sweep)
        followups: list[Callable[[], None]] = []
        granted = False
        for _ in range(1 if roll < 0.7 else self.rng.randrange(2, 5)):
            kind = self.rng.choices(
                ["create", "delete", "origin", "snapshot", "read", "priority"],
                weights=[3, 2, 8, 5, 3, 1],
            )[0]
            # A create after a granted origin write would see that write land
            # after the snapshot was taken (csnapd's barrier prevents it).
            if kind == "create" and granted:
                kind = "origin"
            staged = self._alone(partial(self._stage, engine, kind))
            if staged is not None:
                ran, followup = staged
                followups.append(followup)
                # What ran, not what was drawn: a kind with nothing to act
                # on stands in as an origin write.
                granted |= ran == "origin"
        engine.commit()
        self._acknowledge()
        for followup in followups:
            followup()

    def _alone(self, request: Callable[[], _T]) -> _T | None:
        """Run one request; a refusal of that request alone drops it."""
        try:
            return request()
        except (StoreFullError, RequestTooLargeError, SnapshotBusyError):
            return None
        except StoreIOError:
            assert self.engine is not None and not self.engine.failed
            self.io_errors += 1
            return None

    def _acknowledged_live(self) -> list[int]:
        deleted = {tag for kind, tag, _ in self.staged if kind == "delete"}
        return sorted(t for t in self.snaps if t not in deleted)

    def _stage(self, engine: Engine, kind: str) -> tuple[str, Callable[[], None]]:
        """Apply one request of `kind`, or an origin write when there is nothing for
        it to act on; returns the kind that ran and what its client does once
        acknowledged."""
        rng = self.rng
        live = self._acknowledged_live()
        if kind == "create" and len(self.snaps) + len(self.staged) < 6:
            taken = set(self.snaps) | {tag for _, tag, _ in self.staged}
            tag = rng.choice([t for t in range(12) if t not in taken])
            engine.create_snapshot(tag, rng.randrange(-128, 128))
            self.staged.append(("create", tag, list(self.origin_versions)))
            return kind, _nothing
        if kind == "delete" and live:
            tag = rng.choice(live)
            engine.delete_snapshot(tag)
            self.staged.append(("delete", tag, None))
            return kind, _nothing
        if kind == "snapshot" and live:
            return kind, self._snapshot_write(engine, rng.choice(live))
        if kind == "read" and live:
            self._read(engine, rng.choice(live))
            return kind, _nothing
        if kind == "priority" and live:
            engine.set_priority(rng.choice(live), rng.randrange(-128, 128))
            return kind, _nothing
        return "origin", self._origin_write(engine)

    def _snapshot_write(self, engine: Engine, tag: int) -> Callable[[], None]:
        # Without the store-full policy: this model knows no squashed
        # snapshots (tests/crash and tests/engine/test_squash_model.py do).
        segments = engine.snapshot_write(tag, [self._range()], reclaim=False)

        def write() -> None:
            if tag not in self.snaps:
                return  # deleted in the same batch: its client never writes
            self.version += 1
            size = self.g.chunk_size
            for segment in segments:
                for k in range(segment.count):
                    chunk = segment.chunk + k
                    data = pattern(chunk, self.version, size)
                    # The client writes the store itself and flushes.
                    self.mem.write_through((segment.store_chunk + k) * size, data)
                    self.snaps[tag][chunk] = self.version

        return write

    def _read(self, engine: Engine, tag: int) -> None:
        """A snapshot read, checked against the model as it happens."""
        start, count = self._range()
        got = read_snapshot(engine, self.mem, self.origin, tag, start, count)
        versions = self.snaps[tag]
        size = self.g.chunk_size
        for chunk, data in enumerate(got, start):
            if data != pattern(chunk, versions[chunk], size):
                raise RecoveryCheckError(f"snapshot {tag} chunk {chunk} reads wrong data")

    def _origin_write(self, engine: Engine) -> Callable[[], None]:
        start, count = self._range()
        engine.origin_write([(start, count)], reclaim=False)

        def write() -> None:
            self.version += 1
            size = self.g.chunk_size
            for chunk in range(start, start + count):
                self.origin.write(chunk * size, pattern(chunk, self.version, size))
                self.origin_versions[chunk] = self.version

        return write

    def _acknowledge(self) -> None:
        _apply(self.snaps, self.staged)
        self.staged = []

    # -- after the run -----------------------------------------------------------

    def images(self) -> dict[str, MemoryDevice]:
        """Every kind of store the run may leave behind: as it is (the machine
        stayed up), as synced (power cut now), and a random crash."""
        return {
            "as left": self.mem.snapshot_copy(),
            "power cut": self.mem.durable_copy(),
            "crash": self.mem.random_crash(random.Random(self.seed)),
        }

    def verify(self, image: MemoryDevice) -> int:
        """Check one recovered image; returns how much of the batch in flight landed.

        Raises:
            RecoveryCheckError: the image is damaged or contradicts the model.
        """
        report = check_store(image)
        if report.fatal is not None or report.problems:
            problems = report.fatal or "; ".join(map(str, report.problems[:3]))
            raise RecoveryCheckError(f"check: {problems}")
        origin = self.origin.snapshot_copy()
        engine = Engine.open(image, origin)
        if engine.recovery.problem is not None:
            raise RecoveryCheckError(f"recovery: {engine.recovery.problem}")
        found = {info.tag for info in engine.snapshots()}
        landed, expected = None, dict(self.snaps)
        for k in range(len(self.staged) + 1):
            candidate = {t: list(v) for t, v in self.snaps.items()}
            _apply(candidate, self.staged[:k])
            if set(candidate) == found:
                landed, expected = k, candidate
                break
        if landed is None:
            raise RecoveryCheckError(
                f"snapshots {sorted(found)}; acknowledged {sorted(self.snaps)},"
                f" in flight {[(kind, tag) for kind, tag, _ in self.staged]}"
            )
        size = self.g.chunk_size
        for tag, versions in expected.items():
            got = read_snapshot(engine, image, origin, tag, 0, ORIGIN_CHUNKS)
            for chunk, data in enumerate(got):
                if data != pattern(chunk, versions[chunk], size):
                    raise RecoveryCheckError(f"snapshot {tag} chunk {chunk} reads wrong data")
        problem = misplaced_copy(engine, image, size)
        if problem is not None:
            raise RecoveryCheckError(problem)
        engine.close()
        return landed


def _nothing() -> None:
    pass


def _apply(snaps: dict[int, list[int]], effects: list[Effect]) -> None:
    for kind, tag, contents in effects:
        if kind == "create":
            assert contents is not None
            snaps[tag] = list(contents)
        else:
            del snaps[tag]
