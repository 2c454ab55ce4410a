"""Injected faults through the block device (rules 1, 5 and 10 of DESIGN.md).

Engine level: a seeded workload runs on a FaultyDevice store once per
fault, the fault enumerated over every sync, every write and every read the
workload issues (a stride in CI, all of them in the long run). A failed
sync, or a failed journal or home write, must stop the engine for good:
every later request refused, nothing written or synced any more (so no
retried fsync can ever report success over lost pages), and the store as a
crash or the failure left it recovers clean, with acknowledged ⊆ recovered
⊆ issued. A failed read, or a failed copy-out write (EIO, ENOSPC, short),
fails its one request and the engine goes on.

Server level: the same through csnapd over real files and TCP: the callers
of a failed batch get server_failed and the server stops; an I/O error on a
read or a copy-out reaches only its caller; a full store with no snapshot
to squash refuses copy-outs with store_full while reads, unique writes and
other snapshots go on.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from csnap_client import ServerError
from csnap_protocol import CreateSnapshot, ErrorCode, Identify, QueryWrite, Role, WriteOk
from csnapd.dispatch import SWEEP_RETRY, Connected, Dispatcher, Peer, Received
from csnapd.engine import Engine, EngineError, EngineFailedError, FileDevice, MemoryDevice
from csnapd.engine import journal as journal_module
from csnapd.engine.check import check_store
from csnapd.server import ServerConfig
from tests.engine.helpers import format_device, new_geometry
from tests.server.support import CHUNK, label, pread, pwrite
from tests.torture.faulty import Fault, FaultyDevice
from tests.torture.support import Served, make_files, open_store, serving
from tests.torture.workload import FaultRun, RecoveryCheckError

SEEDS = int(os.environ.get("CSNAP_FAULT_SEEDS", "2"))
#: Inject at every STRIDE-th operation of a kind (1 in the long run: all).
STRIDE = int(os.environ.get("CSNAP_FAULT_STRIDE", "4"))
STEPS = int(os.environ.get("CSNAP_FAULT_STEPS", "80"))


@dataclass
class Tally:
    """What an enumeration did, for the test output."""

    faults: int = 0
    stopped: int = 0
    refused_alone: int = 0
    images: int = 0
    landed: int = 0

    def report(self, what: str) -> None:
        print(
            f"\n{what}: {self.faults} faults injected; {self.stopped} runs stopped"
            f" (fail-stop, or a store that would not open), {self.refused_alone} requests"
            " refused alone;"
            f" {self.images} recovered images checked ({self.landed} with part of the"
            " batch in flight)"
        )


def _base_counts(seed: int) -> dict[str, int]:
    """How many reads, writes and syncs the fault-free run issues."""
    run = FaultRun(seed, steps=STEPS).run()
    assert run.failure is None and run.io_errors == 0
    return dict(run.store.counts)


def _check_stopped(run: FaultRun) -> None:
    """A stopped engine refuses everything and touches the device no more."""
    engine = run.engine
    if engine is None or not engine.failed:
        return  # stopped while opening or closing: there is no engine to ask
    before = dict(run.store.counts)
    refusals: list[Callable[[], object]] = [
        engine.commit,
        lambda: engine.origin_write([(0, 1)]),
        lambda: engine.create_snapshot(99),
        lambda: engine.delete_snapshot(0),
        lambda: engine.snapshot_read(0, [(0, 1)]),
        lambda: engine.snapshot_write(0, [(0, 1)]),
        engine.status,
        engine.snapshots,
        engine.sweep,
        engine.registered_clients,
        lambda: engine.set_registered_clients(frozenset({1})),
    ]
    for call in refusals:
        with pytest.raises(EngineFailedError):
            call()
    engine.close()  # releases the store without committing anything
    after = run.store.counts
    assert (after["write"], after["sync"]) == (before["write"], before["sync"])


def _recover(run: FaultRun, tally: Tally) -> None:
    for name, image in run.images().items():
        try:
            tally.landed += bool(run.verify(image))
        except RecoveryCheckError as exc:
            raise AssertionError(
                f"seed {run.seed}, fault {run.fault}, image {name!r}: {exc}"
            ) from exc
        tally.images += 1


def _faults(kind: str, count: int) -> list[Fault]:
    out: list[Fault] = []
    for n in range(0, count, STRIDE):
        if kind == "write":
            # Alternate the ways a write fails: EIO, a short write then EIO,
            # and ENOSPC after part of it landed (a full filesystem).
            variant = (n // STRIDE) % 3
            code = errno.ENOSPC if variant == 2 else errno.EIO
            out.append(Fault("write", n, code=code, short=variant > 0))
        else:
            out.append(Fault(kind, n))
    return out


@pytest.mark.slow
def test_a_failed_sync_stops_the_engine_and_the_store_recovers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("CRITICAL", logger="csnapd.engine")
    tally = Tally()
    for seed in range(SEEDS):
        for fault in _faults("sync", _base_counts(seed)["sync"]):
            run = FaultRun(seed, fault, steps=STEPS).run()
            tally.faults += 1
            # Linux reports a failed writeback once: a retried sync would
            # succeed over lost pages. The engine must never sync again.
            assert run.failure is not None, f"seed {seed}, {fault}: the run went on"
            assert run.store.sync_failed and run.store.after_failed_sync == []
            tally.stopped += 1
            _check_stopped(run)
            _recover(run, tally)
    tally.report("sync failures")


@pytest.mark.slow
def test_a_failed_write_stops_the_engine_unless_it_was_a_copy(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("CRITICAL", logger="csnapd.engine")
    tally = Tally()
    for seed in range(SEEDS):
        for fault in _faults("write", _base_counts(seed)["write"]):
            run = FaultRun(seed, fault, steps=STEPS).run()
            tally.faults += 1
            (injected,) = run.store.injected
            if injected.offset >= run.g.metadata_bytes:
                # Copy-out data: only the request that copied fails.
                assert run.failure is None, f"seed {seed}, {fault}: {run.failure}"
                assert run.io_errors == 1
                tally.refused_alone += 1
            else:
                # Journal, home or superblock: nothing is known any more.
                assert run.failure is not None, f"seed {seed}, {fault}: the run went on"
                assert run.io_errors == 0
                tally.stopped += 1
                _check_stopped(run)
            _recover(run, tally)
    tally.report("write failures")


@pytest.mark.slow
def test_a_failed_read_fails_only_its_request(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("CRITICAL", logger="csnapd.engine")
    tally = Tally()
    for seed in range(SEEDS):
        for fault in _faults("read", _base_counts(seed)["read"]):
            run = FaultRun(seed, fault, steps=STEPS).run()
            tally.faults += 1
            assert len(run.store.injected) == 1
            if run.failure is not None:
                # Only opening the store stops on a read error: there is no
                # engine yet. A running engine never fails for a read.
                assert run.engine is None or not run.engine.failed
                # What opening reads: the superblock, the journal, and the
                # geometry backup it compares with the superblock's.
                assert any(
                    what in str(run.failure)
                    for what in ("superblock", "journal", "geometry backup")
                ), run.failure
                tally.stopped += 1
            else:
                assert run.io_errors == 1
                tally.refused_alone += 1
            _recover(run, tally)
    tally.report("read failures")


def test_the_fault_harness_catches_a_retried_sync(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The harness proves itself: an engine that retries a failed sync and
    carries on (PostgreSQL before 2018) is caught."""
    caplog.set_level("CRITICAL", logger="csnapd.engine")
    original = journal_module.Journal._sync

    def retrying(self: journal_module.Journal) -> None:
        try:
            original(self)
        except OSError:
            original(self)

    monkeypatch.setattr(journal_module.Journal, "_sync", retrying)
    caught = 0
    for fault in _faults("sync", _base_counts(0)["sync"])[:20]:
        run = FaultRun(0, fault, steps=STEPS)
        try:
            run.run()
            if run.store.after_failed_sync:
                caught += 1
                continue
            _recover(run, Tally())
        except (AssertionError, EngineError):
            caught += 1  # a wrong recovery, or damage found while running
    assert caught >= 10


def test_short_syscall_writes_are_finished(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """pwrite and pwritev may write less than asked: FileDevice finishes the
    rest, and the store is as if every write had been whole."""
    config = make_files(tmp_path, store_size=16 << 20, origin_size=4 << 20)
    for chunk in range(64):
        pwrite(Path(config.origin), chunk, label(chunk, 1))
    real_pwrite, real_pwritev = os.pwrite, os.pwritev
    shorts = [0]

    def short_pwrite(fd: int, data: bytes | memoryview, offset: int) -> int:
        if len(data) > 1:
            shorts[0] += 1
            data = memoryview(data)[: len(data) // 2 or 1]
        return real_pwrite(fd, data, offset)

    def short_pwritev(fd: int, buffers: list[bytes], offset: int) -> int:
        joined = b"".join(buffers)
        shorts[0] += 1
        return real_pwrite(fd, joined[: max(1, len(joined) // 3)], offset)

    monkeypatch.setattr(os, "pwrite", short_pwrite)
    monkeypatch.setattr(os, "pwritev", short_pwritev)
    engine = Engine.open_files(config.store, config.origin)
    engine.create_snapshot(1)
    engine.origin_write([(0, 64)])
    engine.commit()
    monkeypatch.setattr(os, "pwrite", real_pwrite)
    monkeypatch.setattr(os, "pwritev", real_pwritev)
    for chunk in range(64):
        pwrite(Path(config.origin), chunk, label(chunk, 2))
    engine.close()
    assert shorts[0] > 10
    _assert_clean(config)
    engine = Engine.open_files(config.store, config.origin)
    try:
        for segment in engine.snapshot_read(1, [(0, 64)]):
            assert segment.store_chunk is not None
            for k in range(segment.count):
                data = pread(Path(config.store), segment.store_chunk + k)
                assert data == label(segment.chunk + k, 1)
    finally:
        engine.close()


def test_fdatasync_failing_on_a_real_file_stops_the_engine(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Real files, real fdatasync: a failed sync loses what it did not write,
    the engine stops, and the reopened store holds every acknowledged copy."""
    caplog.set_level("CRITICAL", logger="csnapd.engine")
    config = make_files(tmp_path, store_size=16 << 20, origin_size=4 << 20)
    origin = Path(config.origin)
    for chunk in range(256):
        pwrite(origin, chunk, label(chunk, 1))
    opened = open_store(config, seed=7)
    engine = opened.engine
    engine.create_snapshot(1)
    engine.commit()
    opened.store.arm(Fault("sync", 9))
    acknowledged: list[int] = []
    failure = None
    for chunk in range(0, 256, 3):
        try:
            engine.origin_write([(chunk, 2)])
            engine.commit()
        except EngineFailedError as exc:
            failure = exc
            break
        acknowledged += [chunk, chunk + 1]
        for n in (chunk, chunk + 1):
            pwrite(origin, n, label(n, 2))
    assert failure is not None and opened.store.sync_failed and acknowledged
    engine.close()
    assert opened.store.after_failed_sync == []
    _assert_clean(config)
    engine = Engine.open_files(config.store, config.origin)
    try:
        assert [info.tag for info in engine.snapshots()] == [1]
        segments = engine.snapshot_read(1, [(0, 256)])
        for segment in segments:
            for k in range(segment.count):
                chunk = segment.chunk + k
                if segment.store_chunk is None:
                    # Never copied: the origin was never overwritten either.
                    assert chunk not in acknowledged
                    continue
                assert pread(Path(config.store), segment.store_chunk + k) == label(chunk, 1)
    finally:
        engine.close()


def _assert_clean(config: ServerConfig) -> None:
    device = FileDevice(config.store, writable=False)
    try:
        report = check_store(device)
    finally:
        device.close()
    assert report.fatal is None, report.fatal
    assert not report.problems, "; ".join(map(str, report.problems[:5]))


# -- the dispatcher: a commit that fails in the middle of a batch ---------------------


def test_a_commit_failing_inside_a_batch_answers_every_request(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A request too big to share its transaction makes the batch commit the
    requests before it first. If that commit fails, every request of the
    batch is answered server_failed, none is granted, and the server stops."""
    caplog.set_level("CRITICAL", logger="csnapd.engine")
    g = new_geometry(store_bytes=64 << 20, origin_bytes=32 << 20, journal_bytes=64 * 4096)
    mem = MemoryDevice(g.store_bytes)
    format_device(mem, g)
    store = FaultyDevice(mem)
    engine = Engine.open(store, MemoryDevice(g.origin_bytes))
    dispatcher = Dispatcher(engine, address="test", store="test", max_chunks=8192)
    peers = [Peer(n, Role.CLIENT, f"peer {n}") for n in range(3)]
    admin = Peer(9, Role.ADMIN, "admin")
    dispatcher.apply([Connected(p) for p in [*peers, admin]])
    # The snapshot first: with origin clients identified, a create waits for a barrier.
    dispatcher.apply([Received(admin, CreateSnapshot(1, 1, 0))])
    dispatcher.apply([Received(p, Identify(1, p.number, None)) for p in peers])
    store.arm(Fault("sync"))  # the next sync fails
    batch = [
        Received(peers[0], QueryWrite(2, ((0, 1),))),
        Received(peers[1], QueryWrite(2, ((100, 6000),))),  # more than a transaction holds
        Received(peers[2], QueryWrite(2, ((7000, 1),))),
    ]
    outcome = dispatcher.apply(batch)
    assert outcome.failed
    answers = {(peer.number, getattr(m, "id", None)): m for peer, m in outcome.sends}
    assert set(answers) == {(0, 2), (1, 2), (2, 2)}
    for message in answers.values():
        assert not isinstance(message, WriteOk)
        assert getattr(message, "code", None) == ErrorCode.SERVER_FAILED
    assert engine.failed and store.after_failed_sync == []
    engine.close()


# -- through csnapd ---------------------------------------------------------------------


async def _busy_writer(
    served: Served,
    origin: Path,
    number: int,
    acknowledged: list[tuple[int, int]],
    outcomes: list[str],
) -> None:
    """Origin writes as a client does them, until the server stops answering."""
    try:
        async with served.client() as client:
            for step in range(200):
                start = (number * 997 + step * 61) % 6000
                # Now and then a write too big to share a transaction: the
                # batch commits the requests before it early.
                count = 1500 if step % 7 == 6 else 1 + (step * number) % 40
                try:
                    async with client.origin_write([(start, count)]):
                        for chunk in range(start, start + count):
                            pwrite(origin, chunk, label(chunk, 2))
                except ServerError as exc:
                    if exc.error is not ErrorCode.REQUEST_TOO_LARGE:
                        raise
                    continue  # too big for a transaction of its own
                acknowledged.append((start, count))
    except ServerError as exc:
        outcomes.append(exc.name)
    except Exception as exc:  # the connection closed under it
        outcomes.append(type(exc).__name__)
    else:
        outcomes.append("finished")


@pytest.mark.slow
async def test_a_failed_sync_under_load_answers_server_failed_and_stops(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("CRITICAL")
    # A small journal: transactions overflow and commit early, inside batches.
    config = make_files(tmp_path, origin_size=32 << 20, journal_size=64 * 4096)
    origin = Path(config.origin)
    for chunk in range(0, 8192, 7):
        pwrite(origin, chunk, label(chunk, 1))
    opened = open_store(config, seed=3)
    acknowledged: dict[int, list[tuple[int, int]]] = {}
    outcomes: list[str] = []
    with trio.fail_after(120):
        async with serving(config, opened.engine) as served:
            async with served.admin() as admin:
                await admin.create_snapshot(1)
            # Early enough that no writer has finished its 200 writes: a
            # commit syncs once, and batches gather several writers.
            opened.store.arm(Fault("sync", 8))

            async with trio.open_nursery() as nursery:
                for number in range(1, 9):
                    mine = acknowledged.setdefault(number, [])
                    nursery.start_soon(_busy_writer, served, origin, number, mine, outcomes)
            server = served.server
            assert server.failed
            # Nobody new is served once the engine failed: the listener is closed.
            with pytest.raises(OSError):
                await trio.open_tcp_stream(served.host, served.port)
    assert "server_failed" in outcomes, outcomes
    assert "finished" not in outcomes
    assert opened.store.sync_failed and opened.store.after_failed_sync == []
    _assert_clean(config)
    engine = Engine.open_files(config.store, config.origin)
    try:
        for ranges in acknowledged.values():
            for start, count in ranges:
                for segment in engine.snapshot_read(1, [(start, count)]):
                    assert segment.store_chunk is not None, "an acknowledged copy is missing"
                    for k in range(segment.count):
                        chunk = segment.chunk + k
                        old = label(chunk, 1) if chunk % 7 == 0 else bytes(CHUNK)
                        assert pread(Path(config.store), segment.store_chunk + k) == old
    finally:
        engine.close()


@pytest.mark.slow
@pytest.mark.parametrize("asked", [True, False], ids=["status-asked", "quiet"])
async def test_a_read_error_in_the_background_sweep_harms_nobody(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, asked: bool
) -> None:
    """The sweep that reclaims a deleted snapshot has no caller to tell: an I/O
    error stops that sweep step, is logged, and the sweep tries again later,
    whether or not anyone asks csnapd anything meanwhile; everybody else is
    served meanwhile."""
    caplog.set_level("CRITICAL")
    config = make_files(tmp_path)
    engine = Engine.open_files(config.store, config.origin)
    engine.create_snapshot(1)
    for start in range(0, 4096, 512):
        engine.origin_write([(start, 512)])
        engine.commit()
    engine.close()
    opened = open_store(config)  # a cold cache: the sweep reads the btree from the store
    g = opened.engine.geometry
    opened.store.arm(
        Fault("read", where=(g.meta_start * g.block_size, g.meta_end * g.block_size), times=3)
    )
    with trio.fail_after(60):
        async with serving(config, opened.engine) as served, served.admin() as admin:
            await admin.delete_snapshot(1)
            async with served.client() as client, client.origin_write([(100, 1)]) as grant:
                assert grant.copied == 0
            if asked:
                for _ in range(600):
                    status = await admin.status()
                    if not status.deleting:
                        break
                    await trio.sleep(0.05)
            else:
                # Nothing arrives: the end of each back-off alone must wake
                # the engine task for the next try.
                for _ in range(600):
                    if len(opened.store.injected) == 3:
                        break
                    await trio.sleep(0.05)
                await trio.sleep(3 * SWEEP_RETRY)
                status = await admin.status()
            assert not status.deleting and status.store.exceptions == 0
            assert len(opened.store.injected) == 3
    assert not served.server.failed
    _assert_clean(config)


@pytest.mark.slow
async def test_an_io_error_reaches_only_its_caller(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """EIO reading the origin for a copy, ENOSPC writing the copy, EIO reading
    a btree block: each fails the one request with io_error, changes nothing,
    and the next request (the same one again, too) is served."""
    caplog.set_level("CRITICAL")
    config = make_files(tmp_path)
    origin = Path(config.origin)
    for chunk in range(64):
        pwrite(origin, chunk, label(chunk, 1))
    engine = Engine.open_files(config.store, config.origin)
    engine.create_snapshot(1)
    engine.origin_write([(40, 8)])  # copies for the snapshot to read later
    engine.commit()
    engine.close()
    opened = open_store(config)
    g = opened.engine.geometry
    size = g.chunk_size
    meta = (g.meta_start * g.block_size, g.meta_end * g.block_size)
    with trio.fail_after(60):
        async with (
            serving(config, opened.engine) as served,
            served.client() as writer,
            served.client(1) as reader,
        ):
            # The btree is read for the first time here: that read fails.
            opened.store.arm(Fault("read", where=meta))
            with pytest.raises(ServerError) as failed:
                await reader.copied_ranges([(40, 8)])
            assert failed.value.error is ErrorCode.IO_ERROR
            assert "Input/output error" in failed.value.message
            assert await reader.copied_ranges([(40, 8)]) == ((40, 8),)

            opened.origin.arm(Fault("read", where=(7 * size, 8 * size)))
            with pytest.raises(ServerError) as failed:
                async with writer.origin_write([(7, 1)]):
                    raise AssertionError("granted a write whose copy failed")
            assert failed.value.error is ErrorCode.IO_ERROR
            async with writer.origin_write([(8, 1)]) as grant:
                assert grant.copied == 1
                pwrite(origin, 8, label(8, 2))

            data = (g.data_start * size, g.store_bytes)
            opened.store.arm(Fault("write", code=errno.ENOSPC, short=True, where=data))
            with pytest.raises(ServerError) as failed:
                async with writer.origin_write([(9, 3)]):
                    raise AssertionError("granted a write whose copy failed")
            assert failed.value.error is ErrorCode.IO_ERROR
            assert "No space left on device" in failed.value.message
            for chunk in (7, 9, 10, 11):  # the failed ones, again
                async with writer.origin_write([(chunk, 1)]) as grant:
                    assert grant.copied == 1
                    pwrite(origin, chunk, label(chunk, 2))
            for chunk in (7, 8, 9, 10, 11, 40, 12):
                async with reader.snapshot_read([(chunk, 1)]) as plan:
                    if plan.store:
                        got = pread(Path(config.store), plan.store[0][2])
                    else:
                        got = pread(origin, chunk)
                assert got == label(chunk, 1), f"snapshot chunk {chunk}"
    assert not served.server.failed
    assert len(opened.store.injected) == 2 and len(opened.origin.injected) == 1
    _assert_clean(config)


@pytest.mark.slow
async def test_a_full_store_refuses_copies_and_serves_the_rest(tmp_path: Path) -> None:
    config = make_files(tmp_path, store_size=4 << 20)
    origin = Path(config.origin)
    opened = open_store(config)
    room = opened.engine.status().data_free
    for chunk in range(room + 64):
        pwrite(origin, chunk, label(chunk, 1))
    with trio.fail_after(120):
        async with (
            serving(config, opened.engine) as served,
            served.admin() as admin,
            served.client() as writer,
        ):
            await admin.create_snapshot(1)
            # In use, so not expendable: the store-full policy has nothing to
            # squash and a copy that does not fit is refused.
            await admin.change_use_count(1, 1)
            full = None
            for chunk in range(room + 64):
                try:
                    async with writer.origin_write([(chunk, 1)]):
                        pwrite(origin, chunk, label(chunk, 2))
                except ServerError as exc:
                    full = chunk, exc
                    break
            assert full is not None, "the store never filled"
            first, refusal = full
            assert first == room
            assert refusal.error is ErrorCode.STORE_FULL
            assert "0 free chunks" in refusal.message
            status = await admin.status()
            assert status.store.data_free == 0 and status.store.exceptions == room
            async with served.client(1) as reader:
                # Reads go on: copies from the store, the rest from the origin.
                for chunk in (0, room - 1, first, first + 1):
                    async with reader.snapshot_read([(chunk, 1)]) as plan:
                        if plan.store:
                            got = pread(Path(config.store), plan.store[0][2])
                        else:
                            got = pread(origin, chunk)
                    assert got == label(chunk, 1)
                # A chunk the snapshot already has a copy of needs no space.
                async with writer.origin_write([(3, 1)]) as grant:
                    assert grant.copied == 0
                    pwrite(origin, 3, label(3, 3))
                # The snapshot writes its own copy in place; a chunk it still
                # shares with the origin would need a new one.
                async with reader.snapshot_write([(5, 1)]) as segments:
                    assert len(segments) == 1 and segments[0][:2] == (5, 1)
                with pytest.raises(ServerError) as again:
                    async with reader.snapshot_write([(first + 2, 1)]):
                        raise AssertionError("granted a copy in a full store")
                assert again.value.error is ErrorCode.STORE_FULL
            # Other snapshots go on: a new one, read through the origin.
            await admin.create_snapshot(2)
            async with served.client(2) as other, other.snapshot_read([(3, 1)]) as plan:
                assert plan.origin == ((3, 1),) and pread(origin, 3) == label(3, 3)
            # Deleting snapshot 1 frees its copies; copies for 2 fit again.
            await admin.change_use_count(1, -1)
            await admin.delete_snapshot(1)
            for _ in range(600):
                status = await admin.status()
                if not status.deleting:
                    break
                await trio.sleep(0.05)
            assert not status.deleting and status.store.data_free == room
            async with writer.origin_write([(first, 1)]) as grant:
                assert grant.copied == 1
    _assert_clean(config)


def test_a_client_registry_that_cannot_be_read_stops_the_server(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The registry names the snapshot clients whose read locks a restarted
    server must wait for. If it cannot be updated when one identifies, that
    client is not acknowledged and the server stops (as for a failed commit)
    rather than serve a client whose locks a restart would forget."""
    caplog.set_level("CRITICAL")
    g = new_geometry(store_bytes=64 << 20, origin_bytes=32 << 20)
    mem = MemoryDevice(g.store_bytes)
    format_device(mem, g)
    store = FaultyDevice(mem)
    engine = Engine.open(store, MemoryDevice(g.origin_bytes), cache_bytes=16 * 4096)
    dispatcher = Dispatcher(engine, address="test", store="test", max_chunks=8192)
    admin, first, second, writer = (Peer(n, Role.CLIENT, f"peer {n}") for n in range(4))
    admin.role = Role.ADMIN
    dispatcher.apply([Connected(p) for p in (admin, first, second, writer)])
    dispatcher.apply([Received(admin, CreateSnapshot(1, 1, 0))])
    dispatcher.apply([Received(first, Identify(1, 11, 1)), Received(writer, Identify(1, 33, None))])
    for n in range(8):  # enough btree leaves through the cache to evict the registry
        dispatcher.apply([Received(writer, QueryWrite(2 + n, ((n * 1000, 1000),)))])
    registry = engine._state.registry  # where the registry block is: no public way to ask
    assert registry
    size = g.block_size
    store.arm(Fault("read", where=(registry * size, (registry + 1) * size)))
    outcome = dispatcher.apply([Received(second, Identify(1, 22, 1))])
    assert store.injected, "the registry was still cached"
    assert outcome.failed
    assert [(p.number, getattr(m, "code", None)) for p, m in outcome.sends] == [
        (second.number, ErrorCode.SERVER_FAILED)
    ]
