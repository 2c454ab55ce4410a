"""Hunts, without a transport, for a data-path request that is answered with
an error yet changed something, for a reply larger than its peer accepts,
and for read locks past their limits or left behind by peers that left.
Peers send well-typed but hostile requests: repeated, overlapping and
out-of-origin ranges, releases of locks never taken, uploads at odd times.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import msgpack
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from csnap_protocol import (
    MIN_MAX_FRAME,
    Error,
    FinishSnapshotRead,
    FinishUploadLock,
    Identify,
    Message,
    QueryMap,
    QueryOwned,
    QuerySnapshotRead,
    QueryWrite,
    Role,
    SnapshotReadOk,
    UploadLock,
)
from csnapd.dispatch import Connected, Disconnected, Dispatcher, Peer, Received
from csnapd.engine import Engine
from tests.engine.helpers import assert_clean, new_store

ORIGIN_CHUNKS = 128
MAX_CHUNKS = 64
MAX_READ_LOCKS = 48
MAX_SERVER_READ_LOCKS = 80

#: Peers: (name, snapshot tag or None for the origin, frame limit or None for the default).
PEERS = [
    ("writer", None, None),
    ("reader", 1, None),
    ("other", 2, None),
    ("small", 1, MIN_MAX_FRAME),
]
Ranges = tuple[tuple[int, int], ...]
#: Requests carrying ranges, by wire name.
KINDS: dict[str, Callable[[int, Ranges], Message]] = {
    "query_write": QueryWrite,
    "query_snapshot_read": QuerySnapshotRead,
    "query_map": QueryMap,
    "query_owned": QueryOwned,
    "finish_snapshot_read": FinishSnapshotRead,
    "upload_lock": UploadLock,
}

#: Well-formed ranges over a few chunks, so reads, finishes and writes meet:
#: one range, or two that do not overlap (they may touch).
_fair = st.one_of(
    st.tuples(st.integers(0, 15), st.integers(1, 4)).map(lambda r: [r]),
    st.tuples(st.integers(0, 15), st.integers(1, 4), st.integers(0, 3), st.integers(1, 4)).map(
        lambda t: [(t[0], t[1]), (t[0] + t[1] + t[2], t[3])]
    ),
)
#: Hostile ranges: empty, overlapping, past the origin's end, near 2^64.
_hostile = st.lists(
    st.tuples(
        st.one_of(
            st.integers(0, ORIGIN_CHUNKS - 1),
            st.integers(ORIGIN_CHUNKS - 8, ORIGIN_CHUNKS + 4),
            st.just((1 << 64) - 1),
        ),
        st.one_of(st.integers(1, 8), st.integers(1, 70)),
    ),
    min_size=0,
    max_size=4,
)
_ranges = st.one_of(_fair, _hostile)
#: (peer index, request kind, ranges); finish_upload_lock ignores its ranges,
#: finish_last_read releases the origin ranges of the peer's last read.
_step = st.tuples(
    st.integers(0, len(PEERS) - 1),
    st.sampled_from([*sorted(KINDS), "finish_upload_lock", "finish_last_read"]),
    _ranges,
)


@dataclass(frozen=True)
class _Seen:
    """What a request may change, as seen before and after it."""

    status: object
    locks: tuple[int, ...]
    parked: int


def _seen(dispatcher: Dispatcher, engine: Engine, peers: list[Peer]) -> _Seen:
    locks = dispatcher.locks
    held = (*(locks.locks_of(p) for p in peers), locks.total, locks.locked_chunks)
    return _Seen(engine.status(), held, len(dispatcher.parked))


@given(steps=st.lists(_step, min_size=1, max_size=25))
@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_an_error_reply_means_the_request_did_nothing(
    steps: list[tuple[int, str, list[tuple[int, int]]]],
) -> None:
    store, origin, _ = new_store(store_bytes=16 << 20, origin_bytes=ORIGIN_CHUNKS * 4096)
    engine = Engine.open(store, origin)
    engine.create_snapshot(1)
    engine.create_snapshot(2)
    engine.commit()
    dispatcher = Dispatcher(
        engine,
        address="test",
        store="test",
        max_chunks=MAX_CHUNKS,
        max_read_locks=MAX_READ_LOCKS,
        max_server_read_locks=MAX_SERVER_READ_LOCKS,
    )
    peers = []
    for number, (name, tag, frame) in enumerate(PEERS, start=1):
        peer = Peer(number, Role.CLIENT, name)
        if frame is not None:
            peer.max_frame = frame
        peers.append(peer)
        dispatcher.apply([Connected(peer), Received(peer, Identify(1, number, tag))])
    #: The origin ranges of each peer's last snapshot read that locked some.
    last_read: dict[int, Ranges] = {}
    for request, (who, kind, ranges) in enumerate(steps, start=10):
        peer = peers[who]
        if kind == "finish_upload_lock":
            message: Message = FinishUploadLock(request)
        elif kind == "finish_last_read":
            message = FinishSnapshotRead(request, last_read.get(who, ()))
        else:
            message = KINDS[kind](request, tuple(ranges))
        before = _seen(dispatcher, engine, peers)
        out = dispatcher.apply([Received(peer, message)])
        for to, reply in out.sends:
            size = len(msgpack.packb(reply.to_wire(), use_bin_type=True))
            assert size <= to.max_frame, (reply.TYPE, size, to.max_frame)
        answers = [r for to, r in out.sends if to is peer and getattr(r, "id", None) == request]
        if not answers:
            assert request in {w.request for w in dispatcher.parked}  # an origin write waits
            event(f"{kind}: parked")
            continue
        (answer,) = answers
        if isinstance(answer, SnapshotReadOk) and answer.origin:
            last_read[who] = answer.origin
        event(f"{kind}: {answer.name if isinstance(answer, Error) else answer.TYPE}")
        if isinstance(answer, Error):
            assert _seen(dispatcher, engine, peers) == before, answer.message
        locks = dispatcher.locks
        assert all(locks.locks_of(p) <= MAX_READ_LOCKS for p in peers)
        assert locks.total <= MAX_SERVER_READ_LOCKS
    dispatcher.apply([Disconnected(p) for p in peers])
    assert (dispatcher.locks.total, dispatcher.locks.holders, dispatcher.locks.locked_chunks) == (
        0,
        0,
        0,
    )
    assert not dispatcher.parked
    engine.close()
    assert_clean(store)
