"""Building Prometheus metric families from a service's plain counters.

A service's collector subclasses ScrapeCollector and yields families made
with these helpers from whatever it counts (dicts of counts,
csnap_common.latency histograms, its engine's statistics) when scraped.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Iterable, Iterator, Sequence

from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector, CollectorRegistry

from csnap_common.latency import Histogram

__all__ = [
    "ScrapeCollector",
    "service_registry",
    "counter",
    "gauge",
    "histogram",
    "labelled_counter",
    "labelled_gauge",
    "labelled_histogram",
]


class ScrapeCollector(Collector, abc.ABC):
    """A collector that reads its service's state only when scraped."""

    @abc.abstractmethod
    def families(self) -> Iterator[Metric]:
        """Every family, read now."""

    def collect(self) -> Iterable[Metric]:
        return list(self.families())

    def describe(self) -> Iterable[Metric]:
        # Registering must not read the service's state (it may not run yet).
        return []


def service_registry(collector: Collector) -> CollectorRegistry:
    """A service's own registry: its collector, and the process's (memory,
    CPU, open files: prometheus_client's process_* families, read from /proc)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    ProcessCollector(registry=registry)
    return registry


def counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    """A counter without labels (`name` without its _total)."""
    return CounterMetricFamily(name, documentation, value=value)


def gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    """A gauge without labels."""
    return GaugeMetricFamily(name, documentation, value=value)


def labelled_counter(
    name: str,
    documentation: str,
    labels: Sequence[str],
    samples: Iterable[tuple[Sequence[str], float]],
) -> CounterMetricFamily:
    """A counter with one sample per (label values, value) of `samples`."""
    family = CounterMetricFamily(name, documentation, labels=labels)
    for key, value in sorted(samples, key=lambda item: tuple(item[0])):
        family.add_metric(list(key), value)
    return family


def labelled_gauge(
    name: str,
    documentation: str,
    labels: Sequence[str],
    samples: Iterable[tuple[Sequence[str], float]],
) -> GaugeMetricFamily:
    """A gauge with one sample per (label values, value) of `samples`."""
    family = GaugeMetricFamily(name, documentation, labels=labels)
    for key, value in sorted(samples, key=lambda item: tuple(item[0])):
        family.add_metric(list(key), value)
    return family


def _buckets(observed: Histogram) -> list[tuple[str, float]]:
    return [
        ("+Inf" if bound == math.inf else repr(bound), float(count))
        for bound, count in observed.cumulative()
    ]


def histogram(name: str, documentation: str, observed: Histogram) -> HistogramMetricFamily:
    """A histogram without labels."""
    return HistogramMetricFamily(
        name, documentation, buckets=_buckets(observed), sum_value=observed.total
    )


def labelled_histogram(
    name: str,
    documentation: str,
    labels: Sequence[str],
    observed: Iterable[tuple[Sequence[str], Histogram]],
) -> HistogramMetricFamily:
    """A histogram with one set of buckets per (label values, histogram) of `observed`."""
    family = HistogramMetricFamily(name, documentation, labels=labels)
    for key, value in sorted(observed, key=lambda item: tuple(item[0])):
        family.add_metric(list(key), _buckets(value), value.total)
    return family
