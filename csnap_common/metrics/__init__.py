"""Prometheus metrics for every csnap service: families built at scrape time
and the small HTTP endpoint that serves them.

Each service keeps its own CollectorRegistry holding one collector that
reads the service's counters when scraped (csnapd.metrics,
csnap_agent.metrics, csnap_nbd.metrics); serve_metrics answers GET /metrics
from the service's own trio loop with prometheus_client's exposition.
"""

from __future__ import annotations

from csnap_common.metrics.endpoint import MetricsListenError, serve_metrics
from csnap_common.metrics.families import (
    ScrapeCollector,
    counter,
    gauge,
    histogram,
    labelled_counter,
    labelled_gauge,
    labelled_histogram,
    service_registry,
)

__all__ = [
    "ScrapeCollector",
    "service_registry",
    "counter",
    "gauge",
    "histogram",
    "labelled_counter",
    "labelled_gauge",
    "labelled_histogram",
    "serve_metrics",
    "MetricsListenError",
]
