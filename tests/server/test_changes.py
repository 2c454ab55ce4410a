"""query_changes through the dispatcher, without a transport: answers in
bounded steps that fit the peer's frame and continue where they stopped,
and refusals that say why.
"""

from __future__ import annotations

import msgpack

from csnap_protocol import (
    MAX_RANGES,
    MIN_MAX_FRAME,
    ChangesReply,
    Error,
    ErrorCode,
    Identify,
    Message,
    QueryChanges,
    Role,
)
from csnapd.dispatch import Connected, Dispatcher, Peer, Received
from csnapd.engine import Engine
from tests.engine.helpers import new_store

ORIGIN_CHUNKS = 1 << 15


def ask(dispatcher: Dispatcher, peer: Peer, message: Message) -> Message:
    out = dispatcher.apply([Received(peer, message)])
    (reply,) = [r for to, r in out.sends if to is peer]
    size = len(msgpack.packb(reply.to_wire(), use_bin_type=True))
    assert size <= peer.max_frame, (size, peer.max_frame)
    return reply


def test_changes_come_in_bounded_steps_that_fit_the_frame() -> None:
    store, origin, _ = new_store(store_bytes=96 << 20, origin_bytes=ORIGIN_CHUNKS * 4096)
    engine = Engine.open(store, origin)
    engine.create_snapshot(1)
    engine.commit()
    # Every other chunk copied out: as many runs as chunks, over many leaves.
    written = set(range(0, ORIGIN_CHUNKS, 2))
    for first in range(0, ORIGIN_CHUNKS, 1024):
        engine.origin_write([(c, 1) for c in range(first, first + 1024, 2)])
        engine.commit()
    dispatcher = Dispatcher(engine, address="test", store="test", max_chunks=1024)
    peers = []
    for number, frame in ((1, None), (2, MIN_MAX_FRAME)):
        peer = Peer(number, Role.CLIENT, f"peer {number}")
        if frame is not None:
            peer.max_frame = frame
        dispatcher.apply([Connected(peer), Received(peer, Identify(1, number, None))])
        peers.append(peer)

    for peer in peers:
        listed: set[int] = set()
        start: int | None = 0
        steps = 0
        for request in range(10, 10 + ORIGIN_CHUNKS):
            if start is None:
                break
            reply = ask(dispatcher, peer, QueryChanges(request, 1, start, 1 << 63))
            assert isinstance(reply, ChangesReply), reply
            if steps == 0:
                runs = len(reply.ranges)
            for first, count in reply.ranges:
                assert start <= first and (reply.next is None or first + count <= reply.next)
                listed.update(range(first, first + count))
            assert reply.next is None or reply.next > start
            start = reply.next
            steps += 1
        assert listed == written
        # Each answer but the last is full: MAX_RANGES runs in the default
        # frame, a few hundred in the smallest one.
        assert steps == -(-len(written) // runs)
        assert (runs == MAX_RANGES) == (peer.max_frame > MIN_MAX_FRAME), runs

    writer = peers[0]
    refusals = [
        (QueryChanges(90, 7, 0, 10), ErrorCode.NO_SUCH_SNAPSHOT),
        (QueryChanges(91, 1, 0, 0), ErrorCode.INVALID_REQUEST),
        (QueryChanges(92, 1, ORIGIN_CHUNKS, 1), ErrorCode.INVALID_REQUEST),
    ]
    for message, code in refusals:
        reply = ask(dispatcher, writer, message)
        assert isinstance(reply, Error) and reply.code == code, reply
    stranger = Peer(9, Role.CLIENT, "not identified")
    dispatcher.apply([Connected(stranger)])
    reply = ask(dispatcher, stranger, QueryChanges(93, 1, 0, 10))
    assert isinstance(reply, Error) and reply.code == ErrorCode.NOT_IDENTIFIED
    # A view never differs from itself.
    reply = ask(dispatcher, writer, QueryChanges(94, None, 0, ORIGIN_CHUNKS))
    assert isinstance(reply, ChangesReply) and reply.ranges == () and reply.next is None
    engine.close()
