"""Cheap histograms for hot paths: counts per bucket, read at scrape time.

A service counts into these where it works (one bisect and two additions per
observation, no lock: each is touched by one thread only) and its metrics
collector turns them into Prometheus histograms when scraped
(csnap_common.metrics), so nothing on the data path depends on how metrics
are served, or whether they are.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence

__all__ = ["Histogram", "LATENCY_BOUNDS", "SIZE_BOUNDS"]

#: Upper bounds, in seconds, of latency buckets: 50 µs to 10 s.
LATENCY_BOUNDS: tuple[float, ...] = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    10.0,
)
#: Upper bounds of size buckets (items per batch, say): powers of two to 1024.
SIZE_BOUNDS: tuple[float, ...] = tuple(float(1 << n) for n in range(11))


class Histogram:
    """Observations counted into buckets with fixed upper bounds (plus +Inf)."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float] = LATENCY_BOUNDS):
        self.bounds = tuple(bounds)
        #: Observations per bucket, not cumulative; the last is above every bound.
        self.counts = [0] * (len(self.bounds) + 1)
        #: Sum of every observation.
        self.total = 0.0

    def observe(self, value: float) -> None:
        """Count one observation."""
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    @property
    def count(self) -> int:
        """Observations so far."""
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations at or below it) for each bucket, inf last."""
        out = []
        running = 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            out.append((bound, running))
        return out
