"""csnapd's Prometheus metrics, read from the server when scraped.

The collector reads what csnapd counts anyway: the transport's ServerStats
(requests, errors, latencies, batches, commit times), the engine's counters
(commits, copy-outs, the journal's fsyncs and the cache's), the dispatcher's
peers, read locks and parked writes, and the store's status (space,
snapshots by state, the sweep). It reads them in the event loop with the
server's engine lock held, so never while a commit runs in its worker
thread. docs/operations.md ("Monitoring") lists every family.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator

from prometheus_client.metrics_core import Metric

from csnap_common.metrics import (
    ScrapeCollector,
    counter,
    gauge,
    histogram,
    labelled_counter,
    labelled_gauge,
    labelled_histogram,
    service_registry,
)
from csnap_protocol import Role
from csnapd.engine import EngineError
from csnapd.server import Server

__all__ = ["CsnapdMetrics", "SERVER_STATES", "SNAPSHOT_STATES"]

#: Every value of csnapd_server_state's `state` label.
SERVER_STATES = ("opening", "standby", "active", "uploading", "failed", "stopping")
#: Every value of csnapd_snapshots' `state` label.
SNAPSHOT_STATES = ("live", "squashed", "deleting")


class CsnapdMetrics(ScrapeCollector):
    """csnapd's collector and registry; attach() the Server once it serves."""

    def __init__(self, *, standby: bool):
        #: Before a server runs: on standby for an agent, or opening the store.
        self._waiting = "standby" if standby else "opening"
        self.server: Server | None = None
        self.registry = service_registry(self)

    def attach(self, server: Server) -> None:
        """The server now serves: report it."""
        self.server = server

    @contextlib.asynccontextmanager
    async def guard(self) -> AsyncIterator[None]:
        """Held while collecting: no commit runs in a worker thread meanwhile."""
        server = self.server
        if server is None:
            yield
            return
        async with server.engine_lock:
            yield

    def families(self) -> Iterator[Metric]:
        server = self.server
        current = self._state()
        yield labelled_gauge(
            "csnapd_server_state",
            "1 for the state csnapd is in, 0 for the others",
            ["state"],
            [((state,), float(state == current)) for state in SERVER_STATES],
        )
        if server is None:
            return
        yield gauge(
            "csnapd_server_epoch_seconds",
            "The epoch clients see, when this server started (seconds since 1970):"
            " it changes at every start",
            server.dispatcher.identity.epoch / 1e9,
        )
        yield from _transport(server)
        yield from _dispatcher(server)
        yield from _engine(server)
        yield from _store(server)

    def _state(self) -> str:
        server = self.server
        if server is None:
            return self._waiting
        if server.failed or server.dispatcher.failed:
            return "failed"
        if server.stopping:
            return "stopping"
        return "uploading" if server.dispatcher.grace else "active"


def _transport(server: Server) -> Iterator[Metric]:
    stats = server.stats
    yield labelled_counter(
        "csnapd_requests",
        "Requests received, by type",
        ["type"],
        [((kind,), count) for kind, count in stats.requests.items()],
    )
    yield labelled_counter(
        "csnapd_errors",
        "Error replies sent, by request type and error code",
        ["type", "code"],
        stats.errors.items(),
    )
    yield labelled_histogram(
        "csnapd_request_duration_seconds",
        "Seconds from a request's arrival to its reply, by type",
        ["type"],
        [((kind,), observed) for kind, observed in stats.latency.items()],
    )
    yield histogram(
        "csnapd_batch_items",
        "Items (requests, notices, timers) handled per batch: one batch, at most one commit",
        stats.batch_items,
    )
    yield histogram(
        "csnapd_commit_duration_seconds",
        "Seconds each commit took (journal writes and fsyncs)",
        stats.commit_seconds,
    )
    yield counter(
        "csnapd_lookups_during_commit",
        "Lookups answered while a commit was being written",
        stats.lookups_during_commit,
    )


def _dispatcher(server: Server) -> Iterator[Metric]:
    dispatcher = server.dispatcher
    yield gauge(
        "csnapd_connections",
        "Connections open, counted from accept (hello said or not)",
        server.open_connections,
    )
    yield gauge(
        "csnapd_queued_data_bytes",
        "Bytes of snapshot data writes received and not yet taken by the engine",
        server.connections.queued_data,
    )
    clients = dict.fromkeys(("origin", "snapshot", "admin", "unidentified"), 0)
    for peer in dispatcher.peers:
        if peer.role is Role.ADMIN:
            kind = "admin"
        elif not peer.identified:
            kind = "unidentified"
        else:
            kind = "origin" if peer.snapshot is None else "snapshot"
        clients[kind] += 1
    yield labelled_gauge(
        "csnapd_clients",
        "Connections that said hello, by kind",
        ["kind"],
        [((kind,), count) for kind, count in clients.items()],
    )
    locks = dispatcher.locks
    yield gauge(
        "csnapd_read_locks", "Read locks held on origin chunks (twice counts twice)", locks.total
    )
    yield gauge("csnapd_read_locked_chunks", "Origin chunks under a read lock", locks.locked_chunks)
    yield gauge(
        "csnapd_parked_writes",
        "Origin writes waiting (for read locks, a snapshot create or the grace)",
        len(dispatcher.parked),
    )


def _engine(server: Server) -> Iterator[Metric]:
    engine = server.engine
    stats = engine.stats
    journal = engine.journal_stats
    cache = engine.cache_stats
    recovery = engine.recovery
    yield counter("csnapd_commits", "Transactions committed", stats.commits)
    yield counter(
        "csnapd_fsyncs", "fsyncs of the store (journal commits, copy-out data)", journal.syncs
    )
    yield counter("csnapd_journal_blocks", "Metadata blocks written to the journal", journal.blocks)
    yield counter(
        "csnapd_journal_checkpoints",
        "Journal checkpoints (the journal was full)",
        journal.checkpoints,
    )
    yield gauge(
        "csnapd_journal_replayed_transactions",
        "Transactions replayed from the journal when the store was opened",
        recovery.replayed,
    )
    yield gauge(
        "csnapd_store_opened_clean",
        "1 if the store was marked clean when opened (its last server stopped cleanly),"
        " 0 if opening it recovered from a crash",
        engine.opened_clean,
    )
    yield counter(
        "csnapd_copyout_chunks", "Origin chunks copied out to the store", stats.copied_chunks
    )
    yield counter("csnapd_copyout_reads", "Reads of origin data for copy-outs", stats.copy_reads)
    yield counter(
        "csnapd_copyout_writes", "Writes of copied-out data to the store", stats.copy_writes
    )
    yield counter(
        "csnapd_engine_failed_requests",
        "Engine requests refused or rolled back",
        stats.failed_requests,
    )
    yield counter(
        "csnapd_split_requests",
        "Requests too big for one transaction, carried by several",
        stats.split_requests,
    )
    yield counter("csnapd_cache_hits", "Metadata cache hits", cache.hits)
    yield counter("csnapd_cache_misses", "Metadata cache misses (blocks read)", cache.misses)
    yield gauge("csnapd_cache_pages", "Metadata blocks cached", engine.cached_pages)


def _space_policy(server: Server) -> Iterator[Metric]:
    """The data area's warning threshold and reserve, and whether it is past the threshold."""
    policy = server.dispatcher.space.policy
    yield labelled_gauge(
        "csnapd_store_data_threshold_ratio",
        "The data area's warning threshold (share used) and free-space reserve (share free);"
        " 0 when off",
        ["threshold"],
        [
            (("warn_at",), (policy.warn_at or 0) / 100),
            (("keep_free",), (policy.keep_free or 0) / 100),
        ],
    )
    yield gauge(
        "csnapd_store_space_warning",
        "1 while the data area's use is past its warning threshold, else 0",
        int(server.dispatcher.space.warning),
    )


def _store(server: Server) -> Iterator[Metric]:
    """The store's space, snapshots, sweep and revert, from its status."""
    try:
        status = server.engine.status()
    except EngineError:
        return  # the engine failed: csnapd_server_state says so
    chunk, block = status.chunk_size, status.block_size
    data_used = status.data_chunks - status.data_free
    meta_used = status.meta_blocks - status.meta_free
    yield labelled_gauge(
        "csnapd_store_data_bytes",
        "The store's data area (copied-out chunks), used and free",
        ["use"],
        [(("used",), data_used * chunk), (("free",), status.data_free * chunk)],
    )
    yield labelled_gauge(
        "csnapd_store_metadata_bytes",
        "The store's metadata area (btree, journal aside), used and free",
        ["use"],
        [(("used",), meta_used * block), (("free",), status.meta_free * block)],
    )
    yield from _space_policy(server)
    yield gauge(
        "csnapd_store_exceptions", "Exceptions in the btree (chunks copied out)", status.exceptions
    )
    states = dict.fromkeys(SNAPSHOT_STATES, 0)
    for info in (*status.snapshots, *status.deleting):
        states[info.state] = states.get(info.state, 0) + 1
    yield labelled_gauge(
        "csnapd_snapshots", "Snapshots, by state", ["state"], [((s,), n) for s, n in states.items()]
    )
    sweeping = bool(status.deleting)
    yield gauge(
        "csnapd_sweep_progress_ratio",
        "How far the sweep of deleted snapshots' space has come (0 to 1; 1 when none waits)",
        status.sweep_cursor / status.origin_chunks if sweeping and status.origin_chunks else 1.0,
    )
    yield gauge(
        "csnapd_sweep_cursor_chunks",
        "Next logical chunk the sweep visits (0 when none waits)",
        status.sweep_cursor if sweeping else 0,
    )
    revert = server.engine.revert_progress
    yield gauge(
        "csnapd_revert_progress_ratio",
        "How far the revert of the origin to a snapshot has come (0 to 1; 1 when none runs)",
        revert.restored / revert.total if revert is not None and revert.total else 1.0,
    )
