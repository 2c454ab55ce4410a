"""The engine refuses ranges that name a chunk twice or reach outside the
origin, whoever calls it, and a refused request leaves the store as it was.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from csnapd.engine import Engine, InvalidRequestError, OverlappingRangesError
from tests.engine.helpers import assert_clean, new_store

BAD_RANGES = [
    pytest.param([(200, 1), (200, 1)], OverlappingRangesError, id="repeated"),
    pytest.param([(100, 10), (105, 10)], OverlappingRangesError, id="overlapping"),
    pytest.param([(300, 5), (0, 1), (302, 1)], OverlappingRangesError, id="unordered-overlap"),
    pytest.param([(2047, 2)], InvalidRequestError, id="past-the-end"),
    pytest.param([((1 << 64) - 1, 2)], InvalidRequestError, id="wrapping"),
    pytest.param([(0, 0)], InvalidRequestError, id="zero-count"),
    pytest.param([], InvalidRequestError, id="no-chunk"),
]

Call = Callable[[Engine, list[tuple[int, int]]], object]
CALLS: dict[str, Call] = {
    "origin_write": lambda e, r: e.origin_write(r),
    "snapshot_write": lambda e, r: e.snapshot_write(1, r),
    "snapshot_read": lambda e, r: e.snapshot_read(1, r),
    "origin_copied": lambda e, r: e.origin_copied(r),
    "origin_shared": lambda e, r: e.origin_shared(r),
}


@pytest.mark.parametrize("call", sorted(CALLS))
@pytest.mark.parametrize(("ranges", "error"), BAD_RANGES)
def test_bad_ranges_are_refused_and_change_nothing(
    call: str, ranges: list[tuple[int, int]], error: type[Exception]
) -> None:
    store, origin, _ = new_store(origin_bytes=2048 * 4096)
    engine = Engine.open(store, origin)
    engine.create_snapshot(1)
    engine.create_snapshot(2)
    engine.origin_write([(100, 4)])
    engine.commit()
    before = engine.status()
    with pytest.raises(error):
        CALLS[call](engine, ranges)
    assert not engine.pending
    assert engine.status() == before
    engine.close()
    assert_clean(store)


def test_touching_and_unordered_ranges_are_accepted() -> None:
    store, origin, _ = new_store(origin_bytes=2048 * 4096)
    engine = Engine.open(store, origin)
    engine.create_snapshot(1)
    assert engine.origin_write([(105, 5), (100, 5), (0, 1)]).copied == 11
    segments = engine.snapshot_write(1, [(300, 2), (200, 1), (302, 1)])
    chunks = [s.chunk + k for s in segments for k in range(s.count)]
    assert chunks == [200, 300, 301, 302]
    engine.close()
    assert_clean(store)


#: Origin chunks of the store the hunt runs on.
HUNT_CHUNKS = 256

_range = st.tuples(st.integers(0, HUNT_CHUNKS + 8), st.integers(0, 24))
_request = st.tuples(
    st.sampled_from(sorted(CALLS)),
    st.lists(_range, max_size=6),
)


def _acceptable(ranges: list[tuple[int, int]]) -> bool:
    """Whether the engine must accept these ranges: chunks inside the origin, each once."""
    chunks = [c for start, count in ranges for c in range(start, start + count)]
    return (
        bool(chunks)
        and all(count >= 1 and start + count <= HUNT_CHUNKS for start, count in ranges)
        and len(chunks) == len(set(chunks))
    )


@given(requests=st.lists(_request, min_size=1, max_size=12))
@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_no_ranges_damage_the_store(requests: list[tuple[str, list[tuple[int, int]]]]) -> None:
    # Whatever ranges a caller passes, the engine either does the request or
    # refuses it having changed nothing; the store stays consistent.
    store, origin, _ = new_store(store_bytes=16 << 20, origin_bytes=HUNT_CHUNKS * 4096)
    engine = Engine.open(store, origin)
    engine.create_snapshot(1)
    engine.create_snapshot(2)
    engine.commit()
    for call, ranges in requests:
        before = engine.status()
        if _acceptable(ranges):
            CALLS[call](engine, ranges)
        else:
            with pytest.raises(InvalidRequestError):
                CALLS[call](engine, ranges)
            assert engine.status() == before
        engine.commit()
    engine.close()
    assert_clean(store)
