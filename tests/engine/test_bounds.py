"""Every engine entry point that takes chunk ranges refuses, with its own
message, each range that reaches past the origin by as little as one chunk,
and takes every range that ends exactly at the origin's last chunk. The
btree walk itself refuses to run past the origin, so a lapse in a caller's
check is an error at once, never a walk that does not end.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from csnapd.engine import Engine, InvalidRequestError
from tests.engine.helpers import new_store

Ranges = list[tuple[int, int]]


def _engine_with_many_leaves() -> tuple[Engine, int]:
    """An engine whose btree has several leaves, the last one ending the origin."""
    store, origin, g = new_store(origin_bytes=1 << 20)
    engine = Engine.open(store, origin)
    end = g.origin_chunks
    engine.create_snapshot(1)
    engine.commit()
    engine.origin_write([(0, end)])
    engine.commit()
    engine.create_snapshot(2)
    engine.commit()
    return engine, end


def _entry_points(engine: Engine) -> dict[str, Callable[[Ranges], object]]:
    return {
        "origin_write": engine.origin_write,
        "snapshot_write": lambda r: engine.snapshot_write(1, r),
        "snapshot_read": lambda r: engine.snapshot_read(2, r),
        "origin_shared": engine.origin_shared,
        "origin_copied": engine.origin_copied,
        "exceptions": lambda r: engine.exceptions(*r[0]),
    }


def _outside(end: int) -> list[tuple[int, int]]:
    return [(end - 1, 2), (end, 1), (0, end + 1), (end - 5, 6), (end + 7, 1), (-1, 1), (-1, 2)]


@pytest.mark.parametrize(
    "name",
    ["origin_write", "snapshot_write", "snapshot_read", "origin_shared", "origin_copied"],
)
def test_a_range_past_the_origin_is_refused_by_the_request_check(name: str) -> None:
    engine, end = _engine_with_many_leaves()
    call = _entry_points(engine)[name]
    for start, count in _outside(end):
        with pytest.raises(InvalidRequestError) as info:
            call([(start, count)])
        # The request check's own words, not the btree's last-ditch refusal.
        assert str(info.value) == (
            f"chunks {start}..{start + count - 1} are not inside the origin (chunks 0..{end - 1})"
        ), (start, count)
        assert not engine.pending


def test_exceptions_past_the_origin_are_refused_by_the_request_check() -> None:
    engine, end = _engine_with_many_leaves()
    for start, count in _outside(end):
        with pytest.raises(InvalidRequestError) as info:
            engine.exceptions(start, count)
        assert str(info.value) == (
            f"chunks {start}..{start + count - 1} are not inside the origin"
        ), (start, count)


@pytest.mark.parametrize(
    "name",
    [
        "origin_write",
        "snapshot_write",
        "snapshot_read",
        "origin_shared",
        "origin_copied",
        "exceptions",
    ],
)
def test_ranges_ending_at_the_last_chunk_are_served(name: str) -> None:
    engine, end = _engine_with_many_leaves()
    call = _entry_points(engine)[name]
    for r in [(end - 1, 1), (end - 7, 7), (0, end)]:
        call([r])
        engine.commit()


def test_the_btree_walk_refuses_to_run_past_the_origin() -> None:
    engine, end = _engine_with_many_leaves()
    tree = engine._tree
    assert len(list(tree.leaves())) > 2
    assert [c for c, *_ in tree.entries_of([(end - 3, 3)])] == [end - 3, end - 2, end - 1]
    for start, count in [(end - 1, 2), (end, 1), (0, end + 1), (-1, 1), (0, 0)]:
        with pytest.raises(InvalidRequestError, match="goes beyond the origin"):
            list(tree.entries_of([(start, count)]))
    for chunk in (end, end + 1, -1):
        with pytest.raises(InvalidRequestError, match="not in the btree's range"):
            tree.descend(chunk)
