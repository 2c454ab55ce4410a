"""The server's logic, without any I/O: a batch of items in, what to send out.

The trio layer (csnapd.server) owns sockets and timers and hands the
Dispatcher everything that arrived since the last batch; nothing else touches
the engine or the lock table, so they need no locks. The Dispatcher owns the
batch (apply: prepare, commit, finish), the peers, whether a background step
is due and the translation of engine errors into wire codes; its parts own
the rest:

- csnapd.requests answers each request (rule: refuse before effect);
- csnapd.write_gate decides when an origin write is granted (rules: write
  gate, locks survive a restart);
- csnapd.create_barrier makes a create a point in time (rule: point-in-time
  create);
- csnapd.reporting says what the server reports about itself.

Rules kept here, by their names in docs/rules.md:

- durable acknowledgement: no reply leaves before the commit that carries
  its request is durable; all of a batch's replies are sent after its commit,
  and a failed commit answers every request of the batch server_failed
  (docs/protocol.md, "Requests, replies and notices");
- detach before sweep: a deleted snapshot's space is swept only once its
  clients have gone (docs/protocol.md, "Snapshot delete with detaching
  clients"); when, between client batches, is csnapd.sweep_schedule's;
- full store squashes first: a copy-out refused for want of space squashes
  expendable snapshots, sparing those a client is connected to, and neither
  sweeps nor squashes while clients of a deleted snapshot are detaching or
  the post-restart grace runs (docs/protocol.md, "When the store is full");
- revert in journaled steps: a revert starts behind the create barrier,
  holds origin writes while it runs, and takes one step per SweepTick
  (before the sweep), run with the batch's commit so that its copies, origin
  writes and syncs stay off the event loop; never while the post-restart
  grace runs nor over an origin chunk a snapshot reader holds
  (docs/protocol.md, "Reverting the origin");
- the store warns before it is full, and the reserve squashes in the
  background: the space watch (csnapd.space_watch) sees every item's effect
  on the data area; a reserve squash takes the place of a sweep step, on
  the sweep's schedule, one per batch at most and only once the sweep has
  reclaimed what the squash before freed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import assert_never

from csnap_protocol import (
    Error,
    ErrorCode,
    FinishSnapshotRead,
    Message,
    QueryWrite,
    Request,
    ServerRecord,
    WriteSnapshotData,
    message_id,
)
from csnapd.batch import (
    BarrierExpired,
    Batch,
    Connected,
    Disconnected,
    GraceExpired,
    Item,
    Outcome,
    ParkedWrite,
    Peer,
    Received,
    Sends,
    SweepTick,
    Wake,
    error_reply,
)
from csnapd.checks import RequestRefused
from csnapd.create_barrier import CreateBarrier
from csnapd.engine import CommitWrite, Engine, EngineError, EngineFailedError
from csnapd.engine.locks import LockTable
from csnapd.reporting import ServerIdentity, server_record
from csnapd.requests import LOOKUPS, RequestHandlers, is_inbound
from csnapd.space_watch import SpacePolicy, SpaceWatch
from csnapd.wire_errors import error_code
from csnapd.write_gate import WriteGate

__all__ = [
    "Peer",
    "Received",
    "Connected",
    "Disconnected",
    "BarrierExpired",
    "GraceExpired",
    "SweepTick",
    "Wake",
    "Item",
    "Outcome",
    "Batch",
    "Dispatcher",
    "error_code",
]

log = logging.getLogger("csnapd")

#: Seconds before a sweep step that failed (an I/O error) is tried again.
SWEEP_RETRY = 1.0
#: Default bound on the read locks one connection holds (docs/protocol.md, "Limits").
DEFAULT_MAX_READ_LOCKS = 1 << 18
#: Default bound on the read locks all connections hold together.
DEFAULT_MAX_SERVER_READ_LOCKS = 1 << 20


#: Requests that change neither which snapshot clients are connected nor
#: which clients the registry still awaits: after a batch of only these the
#: registry is what the last batch left (WriteGate.sync_registry).
_REGISTRY_KEPT: tuple[type[Message], ...] = (
    *LOOKUPS,
    QueryWrite,
    WriteSnapshotData,
    FinishSnapshotRead,
)


def _engine_refusal(request: int | None, exc: EngineError) -> Error:
    """The error reply to a request the engine refused."""
    return error_reply(request, error_code(exc), str(exc))


class Dispatcher:
    """Applies batches of items; see the module docstring for the rules."""

    def __init__(
        self,
        engine: Engine,
        *,
        address: str,
        store: str,
        max_chunks: int,
        origin: str = "",
        lease_ms: int = 0,
        max_read_locks: int = DEFAULT_MAX_READ_LOCKS,
        max_server_read_locks: int = DEFAULT_MAX_SERVER_READ_LOCKS,
        clock: Callable[[], int] = time.time_ns,
        monotonic: Callable[[], float] = time.monotonic,
        space: SpacePolicy | None = None,
    ):
        self.engine = engine
        #: The data area's warning and reserve (docs/rules.md).
        self.space = SpaceWatch(space if space is not None else SpacePolicy(), store)
        started_ns = clock()
        self.identity = ServerIdentity(address, store, origin, started_ns, epoch=started_ns)
        self.peers: set[Peer] = set()
        self.create_barrier = CreateBarrier(engine, _engine_refusal)
        self.gate = WriteGate(
            engine,
            self.create_barrier,
            _engine_refusal,
            lease_ms=lease_ms,
            max_read_locks=max_read_locks,
            max_server_read_locks=max_server_read_locks,
            room=self.room,
        )
        self._requests = RequestHandlers(
            engine,
            self.gate,
            self.create_barrier,
            self.peers,
            self.server_info,
            room=self.room,
            space=self.space,
            epoch=self.identity.epoch,
            max_chunks=max_chunks,
        )
        #: Requests received since the start.
        self.requests = 0
        self.failed = False
        self._monotonic = monotonic
        #: After a sweep step failed (an I/O error), no sweep before this
        #: time (of `monotonic`).
        self._sweep_after = 0.0
        #: Whether an item since the registry's last sync may have changed
        #: what it must hold (see _REGISTRY_KEPT).
        self._registry_stale = True
        self.space.observe(*engine.data_use)

    @property
    def locks(self) -> LockTable[Peer]:
        """Who holds read locks on which origin chunks."""
        return self.gate.locks

    @property
    def parked(self) -> list[ParkedWrite]:
        """Origin writes waiting to be granted."""
        return self.gate.parked

    @property
    def grace(self) -> bool:
        """Origin writes wait for lock uploads after a restart."""
        return self.gate.grace

    def room(self) -> tuple[frozenset[int], bool]:
        """The store-full policy's terms now: tags to spare, and whether to reclaim.

        A snapshot some client is connected to is spared: its reads may be
        under way at store chunks a squash would free. Nothing is reclaimed
        while a deleted snapshot's clients detach (rule: detach before sweep)
        or while clients from before a restart may still read.
        """
        spare = frozenset(p.snapshot for p in self.peers if p.identified and p.snapshot is not None)
        reclaim = not self.gate.grace and not any(p.detaching for p in self.peers)
        return spare, reclaim

    # -- the batch ---------------------------------------------------------------

    def apply(self, items: Iterable[Item]) -> Outcome:
        """Handle `items` in order, commit once, and say what to send."""
        batch = self.prepare(items)
        if batch.needs_commit:
            self.commit(batch)
        return self.finish(batch)

    # The three steps of apply(), for a transport that runs only the commit
    # (the fsyncs) in a worker thread: lookups and reads then never pay for
    # a thread hop. Nothing else may touch the engine between them.

    def prepare(self, items: Iterable[Item]) -> Batch:
        """Handle `items` in order, up to the commit."""
        batch = Batch()
        recheck = False
        items = list(items)
        done = 0
        try:
            for item in items:
                recheck |= self._item(item, batch)
                done += 1
            if self._registry_stale:
                self.gate.sync_registry(self.peers)
                self._registry_stale = False
            if recheck:
                # The writes applied earlier in this batch may predate a
                # snapshot created later in it (the last barrier_done came
                # after them): they are applied again too, which copies out
                # for it.
                self.gate.parked.extend(batch.writes)
                batch.writes = self.gate.reapply(batch.replies)
        except EngineError as exc:
            self._abandon(batch, exc, items[done:])
            return batch
        batch.needs_commit = self.engine.pending or batch.revert_step
        return batch

    def _abandon(self, batch: Batch, exc: EngineError, unhandled: Sequence[Item]) -> None:
        """The batch ends at an engine failure: finish() answers all of it server_failed."""
        if not isinstance(exc, EngineFailedError):
            # Only the client registry's update gets here (requests catch
            # their own errors). Snapshot clients it does not record would
            # lose their read locks' protection in a restart: stop, as for
            # a failed commit.
            exc = EngineFailedError(f"recording the connected snapshot clients: {exc}")
        # A commit inside the batch failed (one that made room for a big
        # request), say: the batch ends here, and finish() answers every
        # request of it, handled or not, server_failed.
        batch.failure = exc
        for item in unhandled:
            if isinstance(item, Received) and isinstance(item.message, Request):
                failed = error_reply(item.message.id, ErrorCode.SERVER_FAILED, "")
                batch.replies.append((item.peer, failed))

    def commit(self, batch: Batch) -> None:
        """Make the batch durable (blocking: fsyncs); and take its revert step."""
        try:
            if batch.revert_step:
                self._revert_step(batch)
            self.engine.commit()
        except EngineFailedError as exc:
            batch.failure = exc

    # A transport that lets requests that change nothing be answered while
    # a commit is written splits commit() further (csnapd.serving, Server._commit_answering):
    # begin_commit here, CommitWrite.write() in a worker thread meanwhile,
    # answer_lookup here for each lookup that arrives, settle_commit here.
    # A batch with a revert step commits whole: the step changes the store.

    def begin_commit(self, batch: Batch) -> CommitWrite | None:
        """The batch's commit, to be written; None if it cannot be (the
        engine failed: finish() answers the batch server_failed)."""
        try:
            return self.engine.prepare_commit()
        except EngineFailedError as exc:
            batch.failure = exc
            return None

    def settle_commit(self, batch: Batch, commit: CommitWrite) -> None:
        """The batch's commit was written (see begin_commit)."""
        try:
            self.engine.settle_commit(commit)
        except EngineFailedError as exc:
            batch.failure = exc

    def answer_lookup(self, item: Item) -> Sends | None:
        """The replies to `item` if it is a lookup, a request that changes
        nothing (LOOKUPS), answered at once; None for anything else, which
        waits for the next batch. Between begin_commit and settle_commit the
        replies say what the store will be once that commit is durable."""
        if not isinstance(item, Received) or not isinstance(item.message, LOOKUPS):
            return None
        batch = Batch()
        self._item(item, batch)
        return batch.replies

    def finish(self, batch: Batch) -> Outcome:
        """After the commit: grant what may be granted, and say what to send."""
        out, replies = batch.out, batch.replies
        if batch.failure is not None:
            return self._fail(batch.failure, batch)
        self.gate.settle(batch.writes, replies)
        out.sends = replies + batch.notices
        out.sweep_pending = self.engine.sweep_pending
        return out

    def _item(self, item: Item, batch: Batch) -> bool:
        """Handle one item; returns whether parked writes may now be grantable."""
        if not (isinstance(item, Received) and isinstance(item.message, _REGISTRY_KEPT)):
            self._registry_stale = True
        match item:
            case Received(peer=peer, message=message):
                self.requests += 1
                try:
                    return self._received(peer, message, batch)
                finally:
                    self._report_squashed()
                    self.space.observe(*self.engine.data_use)
            case Connected(peer=peer):
                self.peers.add(peer)
                return False
            case Disconnected(peer=peer):
                return self._disconnected(peer, batch.replies)
            case BarrierExpired(barrier=barrier):
                return self.create_barrier.expired(barrier, batch.replies)
            case GraceExpired():
                return self.gate.grace_expired()
            case Wake():
                return False
            case SweepTick():
                if self._revert_due():
                    # Its copies and origin writes are done with the commit,
                    # off the event loop (see commit()).
                    batch.revert_step = True
                    return False
                try:
                    batch.sweep_step = self._sweep()
                finally:
                    self._report_squashed()
                    self.space.observe(*self.engine.data_use)
                return False
            case _:
                assert_never(item)

    def _report_squashed(self) -> None:
        """Log each snapshot the store-full policy or the reserve squashed."""
        for squashed in self.engine.take_squashed():
            log.warning(
                "snapshot %d squashed %s (priority %d; %d unique and %d shared"
                " chunks reclaimed): its data is gone, its tag stays",
                squashed.tag,
                "to keep the free-space reserve" if squashed.reserve else "to make room",
                squashed.priority,
                squashed.unique_chunks,
                squashed.shared_chunks,
                extra={"event": "snapshot.squashed", "snapshot": squashed.tag},
            )

    def _received(self, peer: Peer, message: Message, batch: Batch) -> bool:
        request = message.id if isinstance(message, Request) else None
        try:
            if not is_inbound(message):
                raise RequestRefused(ErrorCode.PROTOCOL_ERROR, f"{message.TYPE} is not a request")
            return self._requests.handle(peer, message, batch)
        except RequestRefused as exc:
            batch.replies.append((peer, error_reply(request, exc.code, str(exc))))
        except EngineFailedError:
            raise
        except EngineError as exc:
            batch.replies.append((peer, _engine_refusal(request, exc)))
        return False

    def _fail(self, exc: EngineFailedError, batch: Batch) -> Outcome:
        """A commit failed: nothing of this batch is acknowledged."""
        out = batch.out
        self.failed = True
        out.failed = True
        answered = [(peer, message_id(reply)) for peer, reply in batch.replies]
        answered += [(write.peer, write.request) for write in batch.writes]
        told: set[tuple[int, int]] = set()
        for peer, request in answered:
            if request is not None and (peer.number, request) not in told:
                told.add((peer.number, request))
                out.sends.append((peer, error_reply(request, ErrorCode.SERVER_FAILED, str(exc))))
        return out

    def _disconnected(self, peer: Peer, replies: Sends) -> bool:
        self.peers.discard(peer)
        released = self.gate.peer_gone(peer)
        log.info(
            "%s gone: released read locks on %d chunks",
            peer,
            released,
            extra={
                "event": "client.gone",
                "connection": peer.number,
                "peer": peer.label,
                "client": None if peer.client_id is None else f"{peer.client_id:#x}",
                "locks": released,
            },
        )
        ended = self.create_barrier.peer_gone(peer, replies)
        return ended or bool(released)

    # -- the sweep ---------------------------------------------------------------

    def sweep_due(self) -> bool:
        """Whether a SweepTick would do something now (a revert step, a sweep
        step or a reserve squash); when to hand one over is the transport's
        schedule (csnapd.sweep_schedule)."""
        return self._revert_due() or self._may_sweep() or self._reserve_due()

    def backoff_left(self) -> float | None:
        """Seconds until the back-off after a failed background step ends,
        when one is running: sweep_due() may turn true then with no item
        arriving."""
        left = self._sweep_after - self._monotonic()
        return left if left > 0 else None

    def _revert_due(self) -> bool:
        """A revert is in progress and may take a step."""
        return (
            self.engine.revert_progress is not None
            and not self.engine.failed
            and not self.gate.grace
            and self._monotonic() >= self._sweep_after
        )

    def _revert_step(self, batch: Batch) -> None:
        """One step of the revert in progress; once it ends, parked writes are
        applied again, to be granted by finish() after the commit."""
        try:
            ended = self._revert_advance()
        finally:
            self._report_squashed()
            self.space.observe(*self.engine.data_use)
        if ended:
            self.gate.parked.extend(batch.writes)
            batch.writes = self.gate.reapply(batch.replies)

    def _revert_advance(self) -> bool:
        """Advance the revert in progress; whether it ended."""
        spare, reclaim = self.room()
        before = self.engine.revert_progress
        try:
            more = self.engine.revert_step(
                locked=self.gate.locks.locked, spare=spare, reclaim=reclaim
            )
        except EngineFailedError:
            raise
        except EngineError as exc:
            log.error("revert step failed, retrying in %gs: %s", SWEEP_RETRY, exc)
            self._sweep_after = self._monotonic() + SWEEP_RETRY
            return False
        if not more and before is not None:
            log.info(
                "origin reverted to snapshot %d (%d chunks restored); origin writes resume",
                before.tag,
                before.total,
                extra={"event": "revert.finished", "snapshot": before.tag, "chunks": before.total},
            )
        return not more

    def _may_sweep(self) -> bool:
        """Deleted snapshots' space awaits reclaiming and none of their clients remain."""
        return (
            self.engine.sweep_pending
            and not any(p.detaching for p in self.peers)
            and self._monotonic() >= self._sweep_after
        )

    def _reserve_due(self) -> bool:
        """The reserve is short, the sweep has nothing left, and a snapshot is expendable."""
        if self.engine.failed or self.engine.sweep_pending:
            return False
        if not self.space.reserve_short(*self.engine.data_use):
            return False
        spare, reclaim = self.room()
        return (
            reclaim
            and self._monotonic() >= self._sweep_after
            and bool(self.engine.squash_order(spare))
        )

    def _sweep(self) -> bool:
        """One sweep step or one reserve squash, if one is due; returns
        whether it was a sweep step."""
        try:
            if self._may_sweep():
                self.engine.sweep()
                return True
            if self._reserve_due():
                self.engine.squash_for_reserve(self.room()[0])
        except EngineFailedError:
            raise
        except EngineError as exc:
            # No caller to tell: the step was rolled back; try again later.
            log.error("sweep step or squash failed, retrying in %gs: %s", SWEEP_RETRY, exc)
            self._sweep_after = self._monotonic() + SWEEP_RETRY
        return False

    # -- reporting ---------------------------------------------------------------

    def server_info(self) -> ServerRecord:
        """What get_server_info reports."""
        if self.failed:
            state = "failed"
        elif self.gate.grace:
            state = "uploading"
        else:
            state = "active"
        return server_record(
            self.identity,
            self.peers,
            state=state,
            commits=self.engine.stats.commits,
            requests=self.requests,
        )
