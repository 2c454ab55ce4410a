"""Lookups (snapshot reads, the origin's shared and copied chunks, and the
first look of every origin write) run as requests that only read: no copy of
the state is taken for them, so one that changed a page would have nothing to
put the state back from; it is rolled back and refused instead.
"""

from __future__ import annotations

import pytest

from csnapd.engine import Engine
from tests.engine.helpers import new_store


def test_a_lookup_that_changes_a_page_is_rolled_back_and_refused() -> None:
    store, origin, _ = new_store()
    engine = Engine.open(store, origin)
    engine.create_snapshot(1)
    engine.commit()
    leaf = engine._tree.descend(0)[0]

    def changes_a_page() -> None:
        engine._pager.modify(leaf)

    with pytest.raises(RuntimeError, match="a lookup changed the store"):
        engine._txn.lookup(changes_a_page)
    assert not engine.pending  # the page is not left dirty
    assert engine.origin_write([(0, 1)]).copied == 1
    engine.commit()
    engine.close()


def test_an_origin_write_of_unique_chunks_leaves_nothing_to_commit() -> None:
    store, origin, _ = new_store()
    engine = Engine.open(store, origin)
    engine.create_snapshot(1)
    assert engine.origin_write([(0, 8)]).copied == 8
    engine.commit()
    assert engine.origin_write([(0, 8)]).copied == 0
    assert engine.snapshot_read(1, [(0, 8)])[0].store_chunk is not None
    assert engine.origin_shared([(0, 16)]) == [(8, 8)]
    assert not engine.pending
    # Part unique, part not: the chunks still shared are copied, as one request.
    assert engine.origin_write([(4, 8)]).copied == 4
    assert engine.pending
    assert engine.origin_copied([(0, 16)]) == [(0, 12)]
    engine.commit()
    engine.close()


def test_owned_chunks_and_origin_ranges_come_ascending_whatever_order_they_were_asked_in() -> None:
    store, origin, _ = new_store()
    engine = Engine.open(store, origin)
    engine.create_snapshot(1)
    engine.commit()
    for chunk in (29, 1, 3):
        assert engine.origin_write([(chunk, 1)]).copied == 1
        engine.commit()
    owned, shared = engine.snapshot_owned(1, [(28, 2), (0, 5)])
    assert [(chunk, count) for chunk, count, _ in owned] == [(1, 1), (3, 1), (29, 1)]
    assert shared == [(0, 1), (2, 1), (4, 1), (28, 1)]
    # The same answer as when asked in order.
    assert engine.snapshot_owned(1, [(0, 5), (28, 2)]) == (owned, shared)
    engine.commit()
    engine.close()
