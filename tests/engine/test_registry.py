"""The client registry survives restarts and crashes, is journaled like any
block, and the check accounts for its block.
"""

from __future__ import annotations

from csnapd.engine import Engine
from tests.engine.helpers import assert_clean, new_store


def test_registry_starts_empty_and_round_trips() -> None:
    store, origin, _ = new_store()
    engine = Engine.open(store, origin)
    assert engine.registered_clients() == (frozenset(), False)
    engine.set_registered_clients(frozenset({7, 3, 1 << 63}))
    engine.commit()
    assert engine.registered_clients() == (frozenset({3, 7, 1 << 63}), False)
    crashed = store.durable_copy()
    assert Engine.open(crashed, origin).registered_clients()[0] == {3, 7, 1 << 63}
    assert_clean(crashed)
    engine.set_registered_clients(frozenset())
    engine.close()
    assert Engine.open(store, origin).registered_clients() == (frozenset(), False)
    assert_clean(store)


def test_an_unchanged_registry_writes_nothing() -> None:
    store, origin, _ = new_store()
    engine = Engine.open(store, origin)
    engine.set_registered_clients(frozenset({1}))
    engine.commit()
    engine.set_registered_clients(frozenset({1}))
    assert not engine.pending


def test_too_many_clients_overflow() -> None:
    store, origin, _ = new_store()
    engine = Engine.open(store, origin)
    engine.set_registered_clients(frozenset(range(600)))
    engine.commit()
    clients, overflow = engine.registered_clients()
    assert overflow and len(clients) == 506
    assert_clean(store)
