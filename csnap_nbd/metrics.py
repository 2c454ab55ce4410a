"""csnap-nbd's Prometheus metrics, read from the gateway's counters when scraped.

Per export: requests by command, error replies by errno, bytes read and
written, connections, and request latency (csnap_nbd.stats); for the
gateway: connections open and accepted. docs/operations.md ("Monitoring")
lists every family.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.metrics_core import Metric

from csnap_common.metrics import (
    ScrapeCollector,
    counter,
    gauge,
    labelled_counter,
    labelled_gauge,
    labelled_histogram,
    service_registry,
)
from csnap_nbd.stats import ExportStats, GatewayStats
from csnap_nbd.wire.constants import Command

__all__ = ["GatewayMetrics", "command_name"]


def command_name(command: int) -> str:
    """The `command` label of a command number: read, write, ..., or unknown."""
    try:
        return Command(command).name.lower()
    except ValueError:
        return "unknown"


class GatewayMetrics(ScrapeCollector):
    """The gateway's collector and registry, over its GatewayStats."""

    def __init__(self, stats: GatewayStats):
        self.stats = stats
        self.registry = service_registry(self)

    def families(self) -> Iterator[Metric]:
        stats = self.stats
        yield gauge("csnap_nbd_connections", "NBD connections open now", stats.open)
        yield counter(
            "csnap_nbd_connections_accepted",
            "NBD connections accepted since the start",
            stats.accepted,
        )
        exports = sorted(stats.exports.items())
        yield labelled_gauge(
            "csnap_nbd_export_connections",
            "NBD connections in transmission, by export",
            ["export"],
            [((name,), export.connections) for name, export in exports],
        )
        yield from _requests(exports)
        yield labelled_counter(
            "csnap_nbd_read_bytes",
            "Bytes of READ data sent, by export",
            ["export"],
            [((name,), export.read_bytes) for name, export in exports],
        )
        yield labelled_counter(
            "csnap_nbd_written_bytes",
            "Bytes of WRITE data written, by export",
            ["export"],
            [((name,), export.written_bytes) for name, export in exports],
        )
        yield from _runs(exports)
        yield labelled_histogram(
            "csnap_nbd_request_duration_seconds",
            "Seconds from reading a request to queueing its reply, by export and command"
            " (origin reads the reader answers at once are not timed)",
            ["export", "command"],
            [
                ((name, command_name(command)), observed)
                for name, export in exports
                for command, observed in export.latency.items()
            ],
        )


def _runs(exports: list[tuple[str, ExportStats]]) -> Iterator[Metric]:
    """Requests answered in runs (csnap_nbd.runs), by export."""
    yield labelled_counter(
        "csnap_nbd_run_writes",
        "WRITEs of chunks known unique answered in a run straight from the"
        " receive buffer, by export (counted in csnap_nbd_requests_total too)",
        ["export"],
        [((name,), export.run_writes) for name, export in exports],
    )
    yield labelled_counter(
        "csnap_nbd_run_reads",
        "READs answered in a run straight from the receive buffer, by export"
        " (counted in csnap_nbd_requests_total too)",
        ["export"],
        [((name,), export.run_reads) for name, export in exports],
    )


def _requests(exports: list[tuple[str, ExportStats]]) -> Iterator[Metric]:
    """Requests by export and command, and error replies by export and errno."""
    requests: dict[tuple[str, str], int] = {}
    errors: dict[tuple[str, str], int] = {}
    for name, export in exports:
        for command, count in export.requests.items():
            key = (name, command_name(command))
            requests[key] = requests.get(key, 0) + count
        for errno, count in export.errors.items():
            errors[(name, errno.lower())] = count
    yield labelled_counter(
        "csnap_nbd_requests",
        "NBD requests read, by export and command",
        ["export", "command"],
        requests.items(),
    )
    yield labelled_counter(
        "csnap_nbd_errors",
        "NBD error replies, by export and errno",
        ["export", "errno"],
        errors.items(),
    )
