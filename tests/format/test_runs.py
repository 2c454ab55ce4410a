"""Joining adjacent runs: the same chunks (and targets) come out, in the fewest runs."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from csnap_format.runs import append_mapped_run, append_run

#: Ascending, non-overlapping runs with gaps of zero or more chunks between them.
_gaps_and_counts = st.lists(st.tuples(st.integers(0, 3), st.integers(1, 4)), max_size=30)
_targets = st.lists(st.one_of(st.none(), st.integers(0, 3)), min_size=30, max_size=30)


def _runs(gaps_and_counts: list[tuple[int, int]]) -> list[tuple[int, int]]:
    runs, chunk = [], 0
    for gap, count in gaps_and_counts:
        chunk += gap
        runs.append((chunk, count))
        chunk += count
    return runs


@given(_gaps_and_counts)
def test_append_run_keeps_the_chunks_and_joins_every_neighbour(
    gaps_and_counts: list[tuple[int, int]],
) -> None:
    runs = _runs(gaps_and_counts)
    joined: list[tuple[int, int]] = []
    for first, count in runs:
        append_run(joined, first, count)
    chunks = [c for first, count in runs for c in range(first, first + count)]
    assert [c for first, count in joined for c in range(first, first + count)] == chunks
    assert all(a + n < b for (a, n), (b, _) in itertools.pairwise(joined))


@given(_gaps_and_counts, _targets)
def test_append_mapped_run_joins_only_where_chunks_and_targets_continue(
    gaps_and_counts: list[tuple[int, int]], target_steps: list[int | None]
) -> None:
    mapped: list[tuple[int, int, int | None]] = []
    target = 0
    for (first, count), step in zip(_runs(gaps_and_counts), target_steps, strict=False):
        if step is None:
            mapped.append((first, count, None))
        else:
            target += step
            mapped.append((first, count, target))
            target += count
    joined: list[tuple[int, int, int | None]] = []
    for first, count, where in mapped:
        append_mapped_run(joined, first, count, where)

    def pairs(runs: list[tuple[int, int, int | None]]) -> list[tuple[int, int | None]]:
        return [
            (first + k, None if where is None else where + k)
            for first, count, where in runs
            for k in range(count)
        ]

    assert pairs(joined) == pairs(mapped)
    for (a, n, x), (b, _, y) in itertools.pairwise(joined):
        continues = a + n == b and (x is None if y is None else x is not None and x + n == y)
        assert not continues


def test_a_mapped_run_with_a_target_never_joins_one_without() -> None:
    joined: list[tuple[int, int, int | None]] = []
    append_mapped_run(joined, 0, 2, None)
    append_mapped_run(joined, 2, 1, 7)
    append_mapped_run(joined, 3, 1, 8)
    append_mapped_run(joined, 4, 1, None)
    append_mapped_run(joined, 5, 2, None)
    assert joined == [(0, 2, None), (2, 2, 7), (4, 3, None)]
