# The dispatcher without any transport: batches built by hand, to pin down
# orderings a real server produces only by chance.
from __future__ import annotations

from csnap_protocol import (
    Barrier,
    BarrierDone,
    CreateSnapshot,
    Identified,
    Identify,
    QueryWrite,
    Role,
    SnapshotReply,
    WriteOk,
)
from csnapd.dispatch import Connected, Dispatcher, Outcome, Peer, Received
from csnapd.engine import Engine
from tests.engine.helpers import new_store


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
