"""A running csnapd: its lifecycle and the engine task.

Owns the Server's tasks besides the connections (csnapd.connections):
  * one engine task: takes everything queued, hands the batch to the
    Dispatcher (the commit's syncs in a worker thread, off the event
    loop), then delivers the replies: group commit; between batches, a
    background step (sweep, reserve squash, revert) in a batch of its own
    when csnapd.sweep_schedule says one is due;
  * timers for barriers, detaching clients and the post-restart grace;
  * the fence watch, and shutdown: finish in-flight work, flush every
    connection's replies, close the store cleanly.
"""

from __future__ import annotations

import logging
import math
import ssl
import time
from functools import partial

import trio
import trio.lowlevel

from csnap_common.systemd import notify_status, notify_stopping
from csnap_protocol import Ok
from csnapd.connections import Connections
from csnapd.dispatch import (
    BarrierExpired,
    Batch,
    Dispatcher,
    GraceExpired,
    Item,
    Outcome,
    Peer,
    SweepTick,
    Wake,
)
from csnapd.engine import Engine
from csnapd.fencing import Fence
from csnapd.group_commit import Gathering
from csnapd.server_config import ServerConfig
from csnapd.server_stats import ServerStats
from csnapd.sweep_schedule import SweepSchedule

log = logging.getLogger("csnapd")


class Server:
    """A running csnapd; see serve()."""

    def __init__(
        self,
        config: ServerConfig,
        engine: Engine,
        address: str,
        tls: ssl.SSLContext | None,
        fence: Fence | None = None,
    ):
        self.config = config
        #: None only to measure what TLS costs (serve(authenticate=False)).
        self.tls = tls
        #: The lease and token it serves under, when elected through a cluster.
        self.fence = fence
        self.fenced = False
        self.engine = engine
        self.address = address
        self.dispatcher = Dispatcher(
            engine,
            address=address,
            store=config.store,
            origin=config.origin,
            max_chunks=config.max_chunks,
            lease_ms=math.ceil(config.lease * 1000),
            max_read_locks=config.max_read_locks,
            max_server_read_locks=config.max_server_read_locks,
            space=config.space,
        )
        self._send, self._receive = trio.open_memory_channel[Item](math.inf)
        #: A request that arrived while a commit was written and was not a
        #: lookup: the next batch starts with it.
        self._carried: Item | None = None
        self._gathering = Gathering()
        self._schedule = SweepSchedule()
        self._stopping = trio.Event()
        self._stopped = trio.Event()
        self._shutdown_reply: tuple[Peer, int] | None = None
        self.failed = False
        #: Requests, errors, latencies, batches and commits, for the metrics.
        self.stats = ServerStats()
        #: Held while the engine works in a worker thread (a commit, the
        #: close): whoever else reads the engine from the event loop, the
        #: metrics, takes it first.
        self.engine_lock = trio.Lock()
        self.connections = Connections(config, tls, self.stats, self._send, self._stopping)

    @property
    def stopping(self) -> bool:
        """Shutdown has begun."""
        return self._stopping.is_set()

    @property
    def open_connections(self) -> int:
        """Connections accepted and not yet closed, hello said or not."""
        return self.connections.open_connections

    # -- lifecycle -------------------------------------------------------------

    def request_shutdown(self) -> None:
        """Stop: finish in-flight work, close the store cleanly (idempotent)."""
        self._stopping.set()

    async def run(
        self,
        listeners: list[trio.SocketListener],
        *,
        stop: trio.Event | None = None,
        task_status: trio.TaskStatus[None],
    ) -> None:
        """Serve until `stop` is set or an administrator asks for shutdown."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if stop is not None:
                nursery.start_soon(_stop_on, stop, self)
            accepting = trio.CancelScope()
            nursery.start_soon(self.connections.accept, listeners, accepting, nursery)
            nursery.start_soon(self._engine_loop)
            if self.fence is not None:
                nursery.start_soon(self._fence_watch, self.fence)
            nursery.start_soon(self.connections.release_memory)
            if self.dispatcher.grace:
                nursery.start_soon(self._after, self.config.grace, GraceExpired())
            task_status.started()
            await self._stopping.wait()
            # An engine task waiting for work waits without a deadline.
            self._send.send_nowait(Wake())
            log.info("shutting down", extra={"event": "server.stopping", "address": self.address})
            notify_stopping()
            accepting.cancel()  # closes the listeners
            await self._stopped.wait()
            await self.connections.flush()
            nursery.cancel_scope.cancel()
        await self._close_engine()

    async def _fence_watch(self, fence: Fence) -> None:
        await fence.watch(partial(trio.to_thread.run_sync, self.engine.fence_token_on_disk))
        self._fenced()

    def _fenced(self) -> None:
        self.fenced = True
        notify_status("fenced: another server may own the store")
        self._stopping.set()

    async def _close_engine(self) -> None:
        if self.failed:
            return
        if self.fenced:
            # Not even "clean": the store belongs to the server elected since.
            await trio.to_thread.run_sync(self.engine.abandon)
            return
        async with self.engine_lock:
            await trio.to_thread.run_sync(self.engine.close)
        log.info(
            "store closed cleanly", extra={"event": "store.closed", "store": self.config.store}
        )

    async def _after(self, seconds: float, item: Item) -> None:
        await trio.sleep(seconds)
        self._send.send_nowait(item)

    # -- the engine ------------------------------------------------------------

    async def _engine_loop(self) -> None:
        config = self.config
        try:
            while True:
                item = await self._next_item()
                if item is None:
                    break
                batch = [item]
                # A background step runs alone: no client request waits for
                # its commit, and its length is the schedule's measure.
                stepping = isinstance(item, SweepTick)
                while not stepping and len(batch) < config.max_batch:
                    try:
                        batch.append(self._take_nowait())
                    except trio.WouldBlock:
                        break
                if not stepping:
                    await self._gathering.more(batch, self._receive, config.max_batch)
                self.connections.took(batch)
                if self.fence is not None and not self.fence.may_write():
                    self._fenced()  # the batch dies unanswered with its connections
                    break
                self.stats.batch_items.observe(len(batch))
                started = time.perf_counter()
                outcome = await self._apply(batch)
                if stepping:
                    # Its whole commit, lookups answered meanwhile or not:
                    # every other request waited for all of it.
                    self._schedule.stepped(time.perf_counter() - started)
                self._deliver_outcome(outcome)
                if not stepping:
                    # After the replies: a batch slower than the quiet time
                    # must not make its own clients look gone.
                    self._schedule.requests_answered()
                # Let readers and writers run between batches, whatever they did.
                await trio.lowlevel.checkpoint()
                if outcome.failed:
                    self.failed = True
                    log.critical(
                        "the engine failed: refusing all further work",
                        extra={"event": "server.failed", "store": self.config.store},
                    )
                    notify_status("failed: the store needs a restart (journal replay)")
                    self._stopping.set()
                    break
        finally:
            self._stopped.set()

    async def _apply(self, items: list[Item]) -> Outcome:
        """One batch: requests applied here, the commit's fsyncs in a worker thread.

        Applying in the event loop is safe because only this task touches the
        engine; it saves a thread hop for every batch that commits nothing
        (lookups, reads, lock releases), the most common kind.
        """
        dispatcher = self.dispatcher
        batch = dispatcher.prepare(items)
        if batch.needs_commit:
            started = time.perf_counter()
            async with self.engine_lock:
                if batch.revert_step:
                    # The step itself changes the store: nothing overlaps it.
                    await trio.to_thread.run_sync(dispatcher.commit, batch)
                else:
                    await self._commit_answering(batch)
            self.stats.commit_seconds.observe(time.perf_counter() - started)
            self._gathering.committed(items, time.perf_counter() - started)
        else:
            self._gathering.nothing_committed()
        return dispatcher.finish(batch)

    async def _commit_answering(self, batch: Batch) -> None:
        """The batch's commit, written in a worker thread while lookups that
        arrive meanwhile are answered (docs/rules.md, "lookups during a
        commit"): at once after a sweep step, whose commit changes nothing a
        lookup sees; otherwise with the batch's own replies, once the commit
        is durable. The first request that is not a lookup ends the
        answering; it starts the next batch. A fenced server answers none:
        it may no longer reply at all."""
        dispatcher = self.dispatcher
        commit = dispatcher.begin_commit(batch)
        if commit is None:
            return
        answering = trio.CancelScope()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._answer_lookups, batch, answering)
            await trio.to_thread.run_sync(commit.write)
            answering.cancel()
        dispatcher.settle_commit(batch, commit)

    async def _answer_lookups(self, batch: Batch, scope: trio.CancelScope) -> None:
        with scope:
            while self._carried is None:
                # Cancelled only while waiting: an item received is handled.
                item = await self._receive.receive()
                fenced = self.fence is not None and not self.fence.may_write()
                replies = None if fenced else self.dispatcher.answer_lookup(item)
                if replies is None:
                    self._carried = item
                    return
                self.connections.took([item])
                self.stats.lookups_during_commit += 1
                if batch.sweep_step:
                    for peer, reply in replies:
                        self.connections.deliver_to(peer, reply)
                    self._schedule.requests_answered()
                else:
                    batch.replies.extend(replies)

    def _take_nowait(self) -> Item:
        """The item carried over from the last commit, or the next queued.

        Raises:
            trio.WouldBlock: nothing is waiting.
        """
        item, self._carried = self._carried, None
        if item is not None:
            return item
        return self._receive.receive_nowait()

    async def _next_item(self) -> Item | None:
        """The next thing to do; a SweepTick when the schedule says a
        background step is due (csnapd.sweep_schedule)."""
        schedule = self._schedule
        while True:
            if self._stopping.is_set():
                try:
                    return self._take_nowait()
                except trio.WouldBlock:
                    return None
            background = self.dispatcher.sweep_due()
            schedule.owed = schedule.owed and background
            if background and schedule.owed:
                return SweepTick()
            try:
                item = self._take_nowait()
            except trio.WouldBlock:
                pass
            else:
                if background:
                    schedule.due(queued=True)  # owes a step after this batch
                return item
            if background and schedule.due(queued=False):
                # Still a checkpoint: applying a batch may not yield at all.
                await trio.lowlevel.checkpoint()
                return SweepTick()
            wait = schedule.wait() if background else self.dispatcher.backoff_left()
            if wait is None:
                # The common idle wait, without a cancel scope: nothing but an
                # item can make work due (a stop sends Wake).
                return await self._receive.receive()
            with trio.move_on_after(wait):
                return await self._receive.receive()

    def _deliver_outcome(self, outcome: Outcome) -> None:
        for peer, message in outcome.sends:
            self.connections.deliver_to(peer, message)
        if outcome.barrier_started is not None:
            self._nursery.start_soon(
                self._after, self.config.barrier_timeout, BarrierExpired(outcome.barrier_started)
            )
        for peer in outcome.detached:
            self._nursery.start_soon(self._detach_timer, peer)
        if outcome.shutdown is not None:
            self._shutdown_reply = outcome.shutdown
            peer, request = outcome.shutdown
            self.connections.deliver_to(peer, Ok(request))
            self._stopping.set()

    async def _detach_timer(self, peer: Peer) -> None:
        await trio.sleep(self.config.detach_timeout)
        await self.connections.close_peer(peer, "did not close after its snapshot was deleted")


async def _stop_on(event: trio.Event, server: Server) -> None:
    await event.wait()
    server.request_shutdown()
