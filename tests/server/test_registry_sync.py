"""The dispatcher keeps the store's client registry equal to the connected
snapshot clients: a batch that may change them (a connection, an identify, a
disconnection, an upload) is followed by a sync; a batch of lookups and origin
writes alone leaves the registry as it is, and is never where a change goes
missing.
"""

from __future__ import annotations

from csnap_protocol import (
    FinishUploadLock,
    Identify,
    QueryMap,
    QuerySnapshotRead,
    QueryWrite,
    Role,
)
from csnapd.dispatch import Connected, Disconnected, Dispatcher, Item, Peer, Received
from csnapd.engine import Engine
from tests.engine.helpers import new_store


def test_the_registry_follows_the_snapshot_clients_whatever_shares_their_batch() -> None:
    store, origin, _ = new_store()
    engine = Engine.open(store, origin)
    engine.create_snapshot(5)
    engine.commit()
    dispatcher = Dispatcher(engine, address="test", store="test", max_chunks=64)
    writer, first, second = (Peer(n, Role.CLIENT, str(n)) for n in (1, 2, 3))

    def apply(*items: Item) -> None:
        out = dispatcher.apply(items)
        assert not out.failed

    def registered() -> frozenset[int]:
        return engine.registered_clients()[0]

    apply(Connected(writer), Connected(first), Received(writer, Identify(1, 40, None)))
    assert registered() == frozenset()
    # An identify behind lookups and writes in one batch.
    apply(
        Received(writer, QueryWrite(2, ((0, 1),))),
        Received(first, Identify(1, 41, 5)),
        Received(writer, QueryMap(3, ((0, 4),))),
    )
    assert registered() == {41}
    # Lookups alone change nothing; the registry stays.
    apply(
        Received(first, QuerySnapshotRead(2, ((1, 1),))), Received(writer, QueryWrite(4, ((0, 1),)))
    )
    assert registered() == {41}
    # A connection and an identify after lookups of another client.
    apply(
        Received(first, QueryMap(3, ((0, 2),))),
        Connected(second),
        Received(second, Identify(1, 42, 5)),
    )
    assert registered() == {41, 42}
    apply(Received(second, FinishUploadLock(2)), Received(first, QueryMap(4, ((0, 2),))))
    assert registered() == {41, 42}
    # A disconnection between two lookups.
    apply(
        Received(second, QueryMap(3, ((0, 2),))),
        Disconnected(first),
        Received(writer, QueryWrite(5, ((2, 1),))),
    )
    assert registered() == {42}
    apply(Disconnected(second))
    assert registered() == frozenset()
    engine.close()
