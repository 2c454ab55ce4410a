"""What the csnapd transport counts as it works, for its metrics.

Requests by type, error replies by request type and code, each request's
latency from arrival to reply (waiting for a barrier, the grace or a commit
included), items per batch and the time of each commit. Plain counters and
csnap_common.latency histograms, touched only by the event loop's thread;
csnapd.metrics reads them when scraped. The engine's own counters
(EngineStats, the journal's and cache's) are read there directly.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from csnap_common.latency import SIZE_BOUNDS, Histogram
from csnap_protocol import Error, Message, Request
from csnapd.batch import Peer

__all__ = ["ServerStats", "UNPAIRED"]

#: Request type of an error reply that answers no request csnapd took (a
#: duplicate id, a refused hello, a request over the in-flight limit).
UNPAIRED = "none"


class ServerStats:
    """Counters and histograms of one server; see the module docstring."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self._clock = clock
        #: Requests taken, by type.
        self.requests: dict[str, int] = {}
        #: Error replies, by (request type, error code symbol).
        self.errors: dict[tuple[str, str], int] = {}
        #: Seconds from arrival to reply, by request type.
        self.latency: dict[str, Histogram] = {}
        #: Items (messages, timers) handled per batch.
        self.batch_items = Histogram(SIZE_BOUNDS)
        #: Seconds each commit (its writes and fsyncs) took.
        self.commit_seconds = Histogram()
        #: Lookups answered while a commit was being written.
        self.lookups_during_commit = 0
        #: Requests not yet answered, per peer: id -> (type, arrival).
        self._open: dict[Peer, dict[int, tuple[str, float]]] = {}

    def arrived(self, peer: Peer, message: Request) -> None:
        """A request came in (before any check)."""
        kind = message.TYPE
        self.requests[kind] = self.requests.get(kind, 0) + 1
        waiting = self._open.get(peer)
        if waiting is None:
            waiting = self._open[peer] = {}
        # A duplicate id keeps the first one's arrival: that is what its reply answers.
        waiting.setdefault(message.id, (kind, self._clock()))

    def replied(self, peer: Peer, message: Message, request: int | None, finished: bool) -> None:
        """`message` was queued for `peer`; `finished`: it answers request `request`."""
        taken = None
        if finished and request is not None:
            waiting = self._open.get(peer)
            if waiting is not None:
                taken = waiting.pop(request, None)
        if taken is not None:
            kind, arrival = taken
            latency = self.latency.get(kind)
            if latency is None:
                latency = self.latency[kind] = Histogram()
            latency.observe(self._clock() - arrival)
        if isinstance(message, Error):
            key = (UNPAIRED if taken is None else taken[0], message.name)
            self.errors[key] = self.errors.get(key, 0) + 1

    def gone(self, peer: Peer) -> None:
        """`peer`'s connection closed: its unanswered requests will never be."""
        self._open.pop(peer, None)
