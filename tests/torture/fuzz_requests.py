"""What the protocol fuzzer asks csnapd: hypothesis strategies for chunk
ranges and requests that are well-typed (they pass csnap_protocol's codec)
but adversarial, and the rules that say, from the model alone, whether a
request must fail, must succeed, or may do either.

Ranges are drawn near the places where csnapd must be careful: overlapping
and repeated ranges, the origin's last chunk, chunk numbers near 2^64, no
range at all, exactly max_chunks and one more, MAX_RANGES ranges, and
thousands of one-chunk ranges whose reply does not fit a small frame limit.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Iterable

from hypothesis import strategies as st

from csnap_protocol.messages import MAX_RANGES

__all__ = [
    "Ranges",
    "Drawn",
    "Must",
    "ranges_strategy",
    "chunks_of",
    "overlapping",
    "outside",
    "total",
    "U64_MAX",
]

Ranges = tuple[tuple[int, int], ...]
U64_MAX = (1 << 64) - 1
U32_MAX = (1 << 32) - 1


class Drawn(tuple[tuple[int, int], ...]):
    """Drawn ranges, shown short in hypothesis' report (some are thousands long)."""

    def __repr__(self) -> str:
        if len(self) <= 6:
            return repr(tuple(self))
        return f"({', '.join(map(repr, self[:4]))}, ... {len(self)} ranges)"


class Must(enum.Enum):
    """What the model requires of a request's reply."""

    SUCCEED = "succeed"
    FAIL = "fail"
    EITHER = "either"


def ranges_strategy(origin_chunks: int, max_chunks: int) -> st.SearchStrategy[Ranges]:
    """Ranges for a data-path request on an origin of `origin_chunks` chunks."""
    n = origin_chunks
    near = st.tuples(st.integers(0, 40), st.integers(1, 8))
    few = st.lists(near, min_size=1, max_size=4).map(tuple)
    repeated = st.tuples(near, st.integers(2, 3)).map(lambda r: (r[0],) * r[1])
    overlaps = st.tuples(st.integers(0, 40), st.integers(2, 8), st.integers(1, 7)).map(
        lambda a: ((a[0], a[1]), (a[0] + min(a[2], a[1] - 1), a[1]))
    )
    edge = st.tuples(st.integers(n - 8, n - 1), st.integers(1, 12)).map(lambda r: (r,))
    beyond = st.tuples(
        st.sampled_from([n, n + 1, 1 << 32, U64_MAX - 7, U64_MAX]),
        st.sampled_from([1, 8, U32_MAX]),
    ).map(lambda r: (r,))
    # One-chunk ranges with gaps: thousands of separate ranges in the reply.
    spread = st.tuples(st.integers(0, 1), st.sampled_from([700, 1100, min(2047, n // 2 - 1)])).map(
        lambda s: tuple((s[0] + 2 * i, 1) for i in range(s[1]))
    )

    def at_limit(kind: str) -> Ranges:
        if kind == "max_chunks":
            return ((0, max_chunks),)
        if kind == "max_chunks + 1":
            return ((0, max_chunks + 1),)
        if kind == "max_chunks ranges":
            return tuple((i, 1) for i in range(min(max_chunks, n)))
        return tuple((i % n, 1) for i in range(MAX_RANGES))

    limits = st.sampled_from(
        ["max_chunks", "max_chunks + 1", "max_chunks ranges", "MAX_RANGES ranges"]
    ).map(at_limit)
    return st.one_of(
        few, few, few, repeated, overlaps, overlaps, edge, beyond, st.just(()), spread, limits
    ).map(Drawn)


def total(ranges: Iterable[tuple[int, int]]) -> int:
    return sum(count for _, count in ranges)


def outside(ranges: Iterable[tuple[int, int]], origin_chunks: int) -> bool:
    """Some chunk lies outside the origin."""
    return any(start + count > origin_chunks for start, count in ranges)


def overlapping(ranges: Iterable[tuple[int, int]]) -> bool:
    """Some chunk is named twice."""
    ordered = sorted(ranges)
    return any(a + n > b for (a, n), (b, _) in itertools.pairwise(ordered))


def chunks_of(ranges: Iterable[tuple[int, int]], limit: int) -> set[int]:
    """The chunks named, below `limit` (the origin's size)."""
    out: set[int] = set()
    for start, count in ranges:
        out.update(range(start, min(start + count, limit)))
    return out
