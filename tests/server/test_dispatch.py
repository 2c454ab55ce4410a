"""The dispatcher without any transport: batches built by hand, to pin down
orderings a real server produces only by chance.
"""

from __future__ import annotations

from csnap_protocol import (
    Barrier,
    BarrierDone,
    CreateSnapshot,
    DeleteSnapshot,
    Identified,
    Identify,
    ListSnapshots,
    QueryWrite,
    RevertReply,
    RevertSnapshot,
    Role,
    SnapshotReply,
    WriteOk,
)
from csnapd.dispatch import (
    Connected,
    Disconnected,
    Dispatcher,
    Item,
    Outcome,
    Peer,
    Received,
    SweepTick,
)
from csnapd.engine import Engine
from tests.engine.helpers import new_store, write_origin


def sent(outcome: Outcome, peer: Peer) -> list[object]:
    return [message for to, message in outcome.sends if to is peer]


def test_a_write_applied_before_the_last_barrier_done_copies_for_the_new_snapshot() -> None:
    store, origin, _ = new_store()
    engine = Engine.open(store, origin)
    dispatcher = Dispatcher(engine, address="test", store="test", max_chunks=64)
    admin = Peer(1, Role.ADMIN, "admin")
    writer = Peer(2, Role.CLIENT, "writer")
    out = dispatcher.apply(
        [Connected(admin), Connected(writer), Received(writer, Identify(1, 42, None))]
    )
    assert isinstance(sent(out, writer)[0], Identified)
    out = dispatcher.apply([Received(admin, CreateSnapshot(1, 5, 0))])
    (barrier,) = sent(out, writer)
    assert isinstance(barrier, Barrier)
    # One batch: a write arrives, then the barrier_done that lets the create
    # happen. The write was applied while snapshot 5 did not exist yet.
    out = dispatcher.apply(
        [
            Received(writer, QueryWrite(2, ((3, 1),))),
            Received(writer, BarrierDone(barrier.barrier)),
        ]
    )
    (created,) = sent(out, admin)
    assert isinstance(created, SnapshotReply) and created.snapshot.tag == 5
    (granted,) = sent(out, writer)
    assert granted == WriteOk(2, 1)  # chunk 3 was copied out for snapshot 5
    segments = engine.snapshot_read(5, [(3, 1)])
    assert segments[0].store_chunk is not None
    engine.close()


def test_a_sweep_is_due_once_the_deleted_snapshots_clients_left() -> None:
    store, origin, _ = new_store()
    engine = Engine.open(store, origin)
    dispatcher = Dispatcher(engine, address="test", store="test", max_chunks=64)
    admin, writer, reader = (
        Peer(n, r, str(n)) for n, r in ((1, Role.ADMIN), (2, Role.CLIENT), (3, Role.CLIENT))
    )

    def apply(*items: Item) -> Outcome:
        return dispatcher.apply(items)

    apply(Connected(admin), Connected(writer), Connected(reader))
    apply(Received(admin, CreateSnapshot(1, 5, 0)))  # no origin client yet: no barrier
    apply(Received(writer, Identify(1, 42, None)), Received(reader, Identify(1, 43, 5)))
    apply(Received(writer, QueryWrite(2, ((3, 1),))))  # copies chunk 3 out for snapshot 5
    assert not dispatcher.sweep_due()  # nothing deleted
    out = apply(Received(admin, DeleteSnapshot(2, 5)))
    assert out.detached == [reader] and engine.sweep_pending
    # Sweep after detach: not while the deleted snapshot's client is connected.
    assert not dispatcher.sweep_due()
    apply(Disconnected(reader))
    assert dispatcher.sweep_due()
    apply(Received(admin, ListSnapshots(3)))
    assert dispatcher.sweep_due()  # requests in between change nothing
    apply(SweepTick())
    assert not engine.sweep_pending  # one step reclaimed the one copied chunk
    assert not dispatcher.sweep_due()
    engine.close()


def test_barrier_done_while_no_barrier_runs_ends_nothing() -> None:
    store, origin, _ = new_store()
    engine = Engine.open(store, origin)
    dispatcher = Dispatcher(engine, address="test", store="test", max_chunks=64)
    writer = Peer(1, Role.CLIENT, "writer")
    dispatcher.apply([Connected(writer), Received(writer, Identify(1, 7, None))])
    # An answer to barrier 0 (none runs) must not count as a barrier ending:
    # each one would otherwise apply every parked write again.
    assert not dispatcher.create_barrier.done(writer, 0, [])
    assert not dispatcher.create_barrier.running
    engine.close()


def test_a_revert_starts_behind_the_barrier_and_holds_origin_writes_until_done() -> None:
    store, origin, g = new_store(origin_bytes=64 * 4096)
    engine = Engine.open(store, origin)
    dispatcher = Dispatcher(engine, address="test", store="test", max_chunks=64)
    admin = Peer(1, Role.ADMIN, "admin")
    writer = Peer(2, Role.CLIENT, "writer")
    dispatcher.apply([Connected(admin), Received(admin, CreateSnapshot(1, 5, 0))])
    dispatcher.apply([Connected(writer), Received(writer, Identify(1, 42, None))])
    out = dispatcher.apply([Received(writer, QueryWrite(2, ((0, 4),)))])
    assert sent(out, writer) == [WriteOk(2, 4)]
    for chunk in range(4):
        write_origin(origin, g, chunk, 1)
    out = dispatcher.apply([Received(admin, RevertSnapshot(2, 5))])
    (barrier,) = sent(out, writer)
    assert isinstance(barrier, Barrier) and not sent(out, admin)
    out = dispatcher.apply([Received(writer, BarrierDone(barrier.barrier))])
    assert sent(out, admin) == [RevertReply(2, 5, 4)]
    # Held: a write asked for while the revert runs waits for its end.
    out = dispatcher.apply([Received(writer, QueryWrite(3, ((1, 1),)))])
    assert not sent(out, writer) and dispatcher.sweep_due()
    out = dispatcher.apply([SweepTick()])
    assert sent(out, writer) == [WriteOk(3, 0)] and engine.revert_progress is None
    assert origin.read(0, 4 * 4096) == bytes(4 * 4096)
    engine.close()


def test_a_store_opened_mid_revert_holds_origin_writes_until_it_finished_it() -> None:
    store, origin, g = new_store(origin_bytes=64 * 4096)
    engine = Engine.open(store, origin)
    engine.create_snapshot(5)
    engine.commit()
    engine.origin_write([(0, 4)])
    engine.commit()
    for chunk in range(4):
        write_origin(origin, g, chunk, 1)
    engine.start_revert(5)
    engine.commit()
    engine.close()  # stopped before a step: the store carries the revert
    engine = Engine.open(store, origin)
    dispatcher = Dispatcher(engine, address="test", store="test", max_chunks=64)
    writer = Peer(1, Role.CLIENT, "writer")
    dispatcher.apply([Connected(writer), Received(writer, Identify(1, 42, None))])
    out = dispatcher.apply([Received(writer, QueryWrite(2, ((2, 1),)))])
    assert not sent(out, writer)
    out = dispatcher.apply([SweepTick()])
    assert sent(out, writer) == [WriteOk(2, 0)]
    assert origin.read(0, 4 * 4096) == bytes(4 * 4096)
    engine.close()


def test_origin_writes_asked_during_a_revert_copy_nothing_until_it_ends() -> None:
    store, origin, g = new_store(store_bytes=32 << 20, origin_bytes=8 << 20)
    engine = Engine.open(store, origin)
    engine.create_snapshot(1)
    engine.origin_write([(0, 300)])
    for chunk in range(300):
        write_origin(origin, g, chunk, 1)
    engine.commit()
    engine.start_revert(1)
    engine.commit()
    dispatcher = Dispatcher(engine, address="test", store="test", max_chunks=1024)
    writer = Peer(1, Role.CLIENT, "writer")
    dispatcher.apply([Connected(writer), Received(writer, Identify(1, 7, None))])
    # Chunks snapshot 1 still shares with the origin: copied out now, they
    # would be exceptions the revert counts past its total, and the store
    # would not open again.
    out = dispatcher.apply([Received(writer, QueryWrite(2, ((1000, 600),)))])
    assert not sent(out, writer) and len(dispatcher.parked) == 1
    progress = engine.revert_progress
    assert progress is not None and (progress.restored, progress.total) == (0, 300)
    out = dispatcher.apply([SweepTick()])
    progress = engine.revert_progress
    assert progress is not None and progress.restored == 256
    out = dispatcher.apply([SweepTick()])
    # Done with its 300 chunks; the write is let through and copies then.
    assert engine.revert_progress is None
    assert sent(out, writer) == [WriteOk(2, 600)]
    engine.close()
    engine = Engine.open(store, origin)
    assert engine.revert_progress is None
    assert origin.read(0, 300 * 4096) == bytes(300 * 4096)
    engine.close()
