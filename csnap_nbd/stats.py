"""What the NBD gateway counts as it serves, for its metrics.

Per export (by export name): requests by command, error replies by errno,
bytes read and written, connections open, and the latency of requests that
wait on csnapd or the disk. Plain counters and csnap_common.latency
histograms, touched only by the gateway's event loop; csnap_nbd.metrics
reads them when scraped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from csnap_common.latency import Histogram
from csnap_nbd.wire.constants import Command

__all__ = ["ExportStats", "GatewayStats"]

_READ = int(Command.READ)


@dataclass(eq=False, slots=True)
class ExportStats:
    """The counters of one export, over every connection to it."""

    #: Requests read, by command number (unknown commands too).
    requests: dict[int, int] = field(default_factory=dict)
    #: Error replies, by errno name (EIO, EINVAL...).
    errors: dict[str, int] = field(default_factory=dict)
    #: Bytes of READ data sent.
    read_bytes: int = 0
    #: Bytes of WRITE data written.
    written_bytes: int = 0
    #: WRITEs answered in a run straight from the receive buffer
    #: (csnap_nbd.runs), among those counted in `requests`.
    run_writes: int = 0
    #: READs answered in a run (csnap_nbd.runs), among those in `requests`.
    run_reads: int = 0
    #: Connections in transmission on this export now.
    connections: int = 0
    #: Seconds from reading a request to queueing its reply, by command
    #: number, for requests run in their own task (origin reads answered
    #: at once by the reader are not timed).
    latency: dict[int, Histogram] = field(default_factory=dict)

    def request(self, command: int) -> None:
        self.requests[command] = self.requests.get(command, 0) + 1

    def ran(self, command: int, answered: int, size: int) -> None:
        """A run answered `answered` READs or WRITEs of `size` bytes in all."""
        self.requests[command] = self.requests.get(command, 0) + answered
        if command == _READ:
            self.read_bytes += size
            self.run_reads += answered
        else:
            self.written_bytes += size
            self.run_writes += answered

    def error(self, errno: str) -> None:
        self.errors[errno] = self.errors.get(errno, 0) + 1

    def timed(self, command: int, seconds: float) -> None:
        latency = self.latency.get(command)
        if latency is None:
            latency = self.latency[command] = Histogram()
        latency.observe(seconds)


@dataclass(eq=False, slots=True)
class GatewayStats:
    """The gateway's counters: connections, and each export's."""

    #: Connections accepted since the start.
    accepted: int = 0
    #: Connections open now, negotiating or in transmission.
    open: int = 0
    exports: dict[str, ExportStats] = field(default_factory=dict)

    def export(self, name: str) -> ExportStats:
        """The counters of export `name` (made on first use)."""
        stats = self.exports.get(name)
        if stats is None:
            stats = self.exports[name] = ExportStats()
        return stats
