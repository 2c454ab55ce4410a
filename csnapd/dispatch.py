# The server's logic, without any I/O: apply a batch of requests to the
# engine and the lock table, commit once, and decide every reply.
#
# The trio layer (csnapd.server) owns sockets and timers and calls
# Dispatcher.apply() with everything that arrived since the last batch, in a
# worker thread; nothing else touches the engine or the lock table, so they
# need no locks. Rules:
#
#   1. No reply leaves before the commit that carries its request is durable
#      (all of a batch's replies are sent after its commit).
#   2. An origin write is granted only when none of its chunks is read-locked,
#      no create barrier is running, and the post-restart grace is over.
#      Until then it is parked; whenever a reason clears it is applied again
#      (copying for any snapshot created meanwhile) and checked again.
#   3. A create is a point in time: origin clients first finish the writes
#      they were granted (barrier); only then is the snapshot committed.
#   4. After a crash, the snapshot clients named by the store's registry
#      re-declare their read locks before any origin write is granted, or the
#      grace period ends.
#   5. A deleted snapshot's clients are told to finish and go; its space is
#      swept only once they have.
#   6. A request is refused before it does anything: its ranges (csnapd.checks),
#      the size of its reply against the peer's frame limit and the read-lock
#      limits are checked first, in the order docs/protocol.md gives.
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, assert_never

from csnap_protocol import (
    DEFAULT_MAX_FRAME,
    MAX_RANGES,
    Barrier,
    BarrierDone,
    ChangeUseCount,
    CreateSnapshot,
    DeleteSnapshot,
    Error,
    ErrorCode,
    FinishSnapshotRead,
    FinishUploadLock,
    GetServerInfo,
    GetStatus,
    Identified,
    Identify,
    ListSnapshots,
    MapReply,
    Message,
    Ok,
    QueryMap,
    QuerySnapshotRead,
    QueryWrite,
    Role,
    ServerInfoReply,
    SetPriority,
    Shutdown,
    SnapshotDeleted,
    SnapshotList,
    SnapshotReadOk,
    SnapshotReply,
    SnapshotWriteOk,
    StatusReply,
    UploadLock,
    WriteOk,
    largest_payload,
)
from csnapd.checks import RequestRefused, check_ranges
from csnapd.engine import Engine, EngineError, EngineFailedError, SnapshotInfo
from csnapd.engine.locks import LockTable

__all__ = [
    "Peer",
    "Received",
    "Connected",
    "Disconnected",
    "BarrierExpired",
    "GraceExpired",
    "SweepTick",
    "Item",
    "Outcome",
    "Batch",
    "Dispatcher",
    "error_code",
]

log = logging.getLogger("csnapd")

Ranges = tuple[tuple[int, int], ...]

#: Under load, one sweep step at least every this many batches.
SWEEP_EVERY = 8
#: Seconds before a sweep step that failed (an I/O error) is tried again.
SWEEP_RETRY = 1.0
#: Default bound on the read locks one connection holds (docs/protocol.md, "Limits").
DEFAULT_MAX_READ_LOCKS = 1 << 18
#: Default bound on the read locks all connections hold together.
DEFAULT_MAX_SERVER_READ_LOCKS = 1 << 20


@dataclass(eq=False)
class Peer:
    """One connection, as the dispatcher sees it."""

    number: int
    role: Role
    label: str
    client_id: int | None = None
    #: The tag it identified to; None for the origin (once identified).
    snapshot: int | None = None
    identified: bool = False
    #: Its snapshot was deleted: it was told to finish and go.
    detaching: bool = False
    #: The largest frame it accepts: no reply may be larger. The transport
    #: sets it from the peer's hello.
    max_frame: int = DEFAULT_MAX_FRAME
    #: It sent finish_upload_lock: it uploads no more locks.
    uploaded: bool = False

    def __str__(self) -> str:
        return f"peer {self.number} ({self.label})"


@dataclass(frozen=True)
class Received:
    """A message from a peer."""

    peer: Peer
    message: Message


@dataclass(frozen=True)
class Connected:
    """A peer connected (and said hello)."""

    peer: Peer


@dataclass(frozen=True)
class Disconnected:
    """A peer's connection closed."""

    peer: Peer


@dataclass(frozen=True)
class BarrierExpired:
    """The create barrier `barrier` ran out of time."""

    barrier: int


@dataclass(frozen=True)
class GraceExpired:
    """The post-restart grace period for lock uploads ended."""


@dataclass(frozen=True)
class SweepTick:
    """Nothing else to do: reclaim some deleted snapshot space."""


Item = Received | Connected | Disconnected | BarrierExpired | GraceExpired | SweepTick


@dataclass
class Outcome:
    """What the transport must do after a batch."""

    #: Messages to send, in order.
    sends: list[tuple[Peer, Message]] = field(default_factory=list)
    #: A barrier started: schedule BarrierExpired for it.
    barrier_started: int | None = None
    #: Peers told their snapshot is gone: close them if they linger.
    detached: list[Peer] = field(default_factory=list)
    #: An administrator asked for shutdown: (peer, request id).
    shutdown: tuple[Peer, int] | None = None
    #: A commit failed: the server must stop.
    failed: bool = False
    #: More deleted-snapshot space remains to sweep.
    sweep_pending: bool = False


@dataclass(eq=False)
class Batch:
    """A batch between Dispatcher.prepare() and Dispatcher.finish()."""

    out: Outcome = field(default_factory=Outcome)
    replies: list[tuple[Peer, Message]] = field(default_factory=list)
    notices: list[tuple[Peer, Message]] = field(default_factory=list)
    writes: list[_Write] = field(default_factory=list)
    #: The engine has changes only a commit makes durable.
    needs_commit: bool = False
    failure: EngineFailedError | None = None


_ENGINE_CODES = {
    "engine_failed": ErrorCode.SERVER_FAILED,
    "cannot_open": ErrorCode.IO_ERROR,
    "store_locked": ErrorCode.IO_ERROR,
}


def error_code(exc: EngineError) -> ErrorCode:
    """The wire code of an engine error."""
    if exc.code in _ENGINE_CODES:
        return _ENGINE_CODES[exc.code]
    return ErrorCode[exc.code.upper()]


@dataclass(eq=False)
class _Write:
    """An origin write waiting to be granted."""

    peer: Peer
    request: int
    ranges: Ranges
    copied: int


#: A handled request: its reply (None: answered later) and whether it released locks.
_Handled = tuple[Message | None, bool]
_Handler = Callable[["Peer", Any, list[_Write]], _Handled]


def _merged(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Ascending ranges with touching neighbours joined."""
    out: list[tuple[int, int]] = []
    for start, count in sorted(ranges):
        if out and out[-1][0] + out[-1][1] == start:
            out[-1] = (out[-1][0], out[-1][1] + count)
        else:
            out.append((start, count))
    return out


def _info(info: SnapshotInfo) -> dict[str, Any]:
    return asdict(info)


class Dispatcher:
    """Applies batches of requests; see the module comment for the rules."""

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
    ):
        self.engine = engine
        self.address = address
        self.store = store
        self.origin = origin
        self.max_chunks = max_chunks
        #: Told to clients in identified: how long the transport lets them be silent.
        self.lease_ms = lease_ms
        self.max_read_locks = max_read_locks
        self.max_server_read_locks = max_server_read_locks
        self.started_ns = clock()
        #: Changes every time a server starts: clients see a restart.
        self.epoch = self.started_ns
        self.locks: LockTable[Peer] = LockTable()
        self.peers: set[Peer] = set()
        self.parked: list[_Write] = []
        self.barrier = 0
        self._barriers = 0
        self._barrier_waiting: set[Peer] = set()
        self._pending_creates: list[tuple[Peer, CreateSnapshot]] = []
        self._monotonic = monotonic
        #: After a sweep step failed (an I/O error), no sweep before this
        #: time (of `monotonic`).
        self._sweep_after = 0.0
        #: Batches prepared since the last sweep step (see SWEEP_EVERY).
        self._unswept_batches = 0
        registered, overflow = engine.registered_clients()
        #: Snapshot clients the registry named at start, not yet uploaded.
        self.awaiting: set[int] = set(registered)
        #: Origin writes wait for uploads (or the grace period) after a crash.
        self.grace = bool(registered) or overflow
        self._registered = frozenset(registered)
        self.requests = 0
        self.failed = False
        self._handlers: dict[type[Message], _Handler] = {
            Identify: self._identify,
            ListSnapshots: self._list,
            GetStatus: self._get_status,
            SetPriority: self._set_priority,
            ChangeUseCount: self._use_count,
            GetServerInfo: self._get_server_info,
            QueryWrite: self._query_write,
            QuerySnapshotRead: self._query_read,
            QueryMap: self._query_map,
            FinishSnapshotRead: self._finish_read,
            UploadLock: self._upload,
            FinishUploadLock: self._finish_upload,
        }
        if self.grace:
            log.info(
                "waiting for %d snapshot clients to re-declare their read locks%s",
                len(self.awaiting),
                " (registry overflowed: the whole grace period)" if overflow else "",
            )

    # -- the batch -----------------------------------------------------------

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
        self._unswept_batches += 1
        done = 0
        try:
            for item in items:
                recheck |= self._item(item, batch)
                done += 1
            self._sync_registry()
            if recheck:
                # The writes applied earlier in this batch may predate a
                # snapshot created later in it (the last barrier_done came
                # after them): they are applied again too, which copies out
                # for it.
                self.parked.extend(batch.writes)
                batch.writes = self._reapply(batch.replies)
        except EngineError as exc:
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
            for item in items[done:]:
                if isinstance(item, Received):
                    request = getattr(item.message, "id", None)
                    if request is not None:
                        failed = _error(request, ErrorCode.SERVER_FAILED, "")
                        batch.replies.append((item.peer, failed))
            return batch
        batch.needs_commit = self.engine.pending
        return batch

    def commit(self, batch: Batch) -> None:
        """Make the batch durable (blocking: fsyncs)."""
        try:
            self.engine.commit()
        except EngineFailedError as exc:
            batch.failure = exc

    def finish(self, batch: Batch) -> Outcome:
        """After the commit: grant what may be granted, and say what to send."""
        out, replies = batch.out, batch.replies
        if batch.failure is not None:
            return self._fail(batch.failure, replies, batch.writes, out)
        for write in batch.writes:
            if self.barrier or self.grace or self.locks.locked(write.ranges):
                self.parked.append(write)
            else:
                replies.append((write.peer, WriteOk(write.request, write.copied)))
        out.sends = replies + batch.notices
        out.sweep_pending = self.engine.sweep_pending
        return out

    def _item(self, item: Item, batch: Batch) -> bool:
        """Handle one item; returns whether parked writes may now be grantable."""
        replies = batch.replies
        if isinstance(item, Received):
            self.requests += 1
            return self._received(item.peer, item.message, batch)
        if isinstance(item, Connected):
            self.peers.add(item.peer)
            return False
        if isinstance(item, Disconnected):
            return self._disconnected(item.peer, replies)
        if isinstance(item, BarrierExpired):
            if item.barrier == self.barrier and self._barrier_waiting:
                names = ", ".join(sorted(str(p) for p in self._barrier_waiting))
                log.warning(
                    "barrier %d expired waiting for %s",
                    item.barrier,
                    names,
                    extra={"event": "barrier.expired", "barrier": item.barrier},
                )
                for peer, request in self._pending_creates:
                    replies.append(
                        (
                            peer,
                            _error(
                                request.id,
                                ErrorCode.BARRIER_TIMEOUT,
                                f"origin clients did not finish their granted writes in time:"
                                f" {names}; snapshot {request.tag} was not created",
                            ),
                        )
                    )
                self._end_barrier()
                return True
            return False
        if isinstance(item, GraceExpired):
            if self.grace:
                log.warning(
                    "grace period over; still missing lock uploads from %d clients",
                    len(self.awaiting),
                )
                self.grace = False
                return True
            return False
        if isinstance(item, SweepTick):
            self._sweep()
            return False
        assert_never(item)

    def sweep_due(self, *, idle: bool) -> bool:
        """Whether the transport should hand over a SweepTick now.

        Idle, whenever there is space to reclaim; busy, once every
        SWEEP_EVERY batches, so that a steady load does not keep deleted
        snapshots' slots taken forever.
        """
        return self._may_sweep() and (idle or self._unswept_batches >= SWEEP_EVERY)

    def _may_sweep(self) -> bool:
        """Deleted snapshots' space awaits reclaiming and none of their clients remain."""
        return (
            self.engine.sweep_pending
            and not any(p.detaching for p in self.peers)
            and self._monotonic() >= self._sweep_after
        )

    def _sweep(self) -> None:
        """One sweep step, if one is due."""
        self._unswept_batches = 0
        if not self._may_sweep():
            return
        try:
            self.engine.sweep()
        except EngineFailedError:
            raise
        except EngineError as exc:
            # No caller to tell: the step was rolled back; try again later.
            log.error("sweep step failed, retrying in %gs: %s", SWEEP_RETRY, exc)
            self._sweep_after = self._monotonic() + SWEEP_RETRY

    def _received(self, peer: Peer, message: Message, batch: Batch) -> bool:
        out, replies, notices, writes = batch.out, batch.replies, batch.notices, batch.writes
        request = getattr(message, "id", None)
        try:
            if isinstance(message, BarrierDone):
                return self._barrier_done(peer, message.barrier, replies)
            if isinstance(message, CreateSnapshot):
                return self._create(peer, message, out, replies, notices)
            if isinstance(message, DeleteSnapshot):
                self._delete(peer, message, out, replies, notices)
                return False
            if isinstance(message, Shutdown):
                out.shutdown = (peer, message.id)
                return False
            reply, released = self._request(peer, message, writes)
            if reply is not None:
                replies.append((peer, reply))
            return released
        except RequestRefused as exc:
            replies.append((peer, _error(request, exc.code, str(exc))))
        except EngineFailedError:
            raise
        except EngineError as exc:
            replies.append((peer, _error(request, error_code(exc), str(exc))))
        return False

    def _fail(
        self,
        exc: EngineFailedError,
        replies: list[tuple[Peer, Message]],
        writes: list[_Write],
        out: Outcome,
    ) -> Outcome:
        """A commit failed: nothing of this batch is acknowledged."""
        self.failed = True
        out.failed = True
        answered = [(peer, getattr(reply, "id", None)) for peer, reply in replies]
        answered += [(write.peer, write.request) for write in writes]
        told: set[tuple[int, int]] = set()
        for peer, request in answered:
            if request is not None and (peer.number, request) not in told:
                told.add((peer.number, request))
                out.sends.append((peer, _error(request, ErrorCode.SERVER_FAILED, str(exc))))
        return out

    # -- data-path and simple admin requests --------------------------------

    def _request(
        self, peer: Peer, message: Message, writes: list[_Write]
    ) -> tuple[Message | None, bool]:
        """Handle a request answered by one reply (or, for origin writes, later).

        Returns the reply and whether read locks were released.
        """
        handler = self._handlers.get(type(message))
        if handler is None:
            raise RequestRefused(ErrorCode.PROTOCOL_ERROR, f"{message.TYPE} is not a request")
        return handler(peer, message, writes)

    def _list(self, peer: Peer, message: Any, writes: list[_Write]) -> _Handled:
        return SnapshotList(message.id, tuple(_info(i) for i in self.engine.snapshots())), False

    def _get_status(self, peer: Peer, message: Any, writes: list[_Write]) -> _Handled:
        return self._status(message.id), False

    def _set_priority(self, peer: Peer, message: Any, writes: list[_Write]) -> _Handled:
        info = self.engine.set_priority(message.tag, message.priority)
        return SnapshotReply(message.id, _info(info)), False

    def _use_count(self, peer: Peer, message: Any, writes: list[_Write]) -> _Handled:
        info = self.engine.change_use_count(message.tag, message.delta)
        return SnapshotReply(message.id, _info(info)), False

    def _get_server_info(self, peer: Peer, message: Any, writes: list[_Write]) -> _Handled:
        return ServerInfoReply(message.id, self.server_info()), False

    def _query_write(self, peer: Peer, message: Any, writes: list[_Write]) -> _Handled:
        self._need_identified(peer)
        chunks = self._check_ranges(message.ranges)
        if peer.snapshot is not None:
            self._check_reply_fits(peer, SnapshotWriteOk, chunks)
        if peer.snapshot is None:
            result = self.engine.origin_write(message.ranges)
            writes.append(_Write(peer, message.id, message.ranges, result.copied))
            return None, False  # granted after the commit, if nothing holds it
        segments = self.engine.snapshot_write(peer.snapshot, message.ranges)
        triples = tuple((s.chunk, s.count, s.store_chunk) for s in segments)
        return SnapshotWriteOk(message.id, triples), False

    def _query_read(self, peer: Peer, message: Any, writes: list[_Write]) -> _Handled:
        self._need_identified(peer)
        self._need_snapshot(peer)
        chunks = self._check_ranges(message.ranges)
        self._check_reply_fits(peer, SnapshotReadOk, chunks)
        return self._snapshot_read(peer, message), False

    def _query_map(self, peer: Peer, message: Any, writes: list[_Write]) -> _Handled:
        self._need_identified(peer)
        chunks = self._check_ranges(message.ranges)
        self._check_reply_fits(peer, MapReply, chunks)
        if peer.snapshot is None:
            copied = self.engine.origin_copied(message.ranges)
        else:
            segments = self.engine.snapshot_read(peer.snapshot, message.ranges)
            copied = [(s.chunk, s.count) for s in segments if s.store_chunk is not None]
        return MapReply(message.id, tuple(_merged(copied))), False

    def _finish_read(self, peer: Peer, message: Any, writes: list[_Write]) -> _Handled:
        self._need_identified(peer)
        self._check_ranges(message.ranges, repeats=True)
        # All or nothing: an error reply means no lock was released.
        missing = self.locks.missing(peer, message.ranges)
        if missing:
            raise RequestRefused(
                ErrorCode.INVALID_REQUEST,
                f"{len(missing)} chunks are not read-locked by this connection as many times"
                f" as named (first {missing[0]}); no lock was released",
            )
        self.locks.release(peer, message.ranges)
        return Ok(message.id), True

    def _upload(self, peer: Peer, message: Any, writes: list[_Write]) -> _Handled:
        self._need_identified(peer)
        self._need_snapshot(peer)
        if peer.uploaded:
            raise RequestRefused(
                ErrorCode.INVALID_REQUEST,
                "upload_lock after finish_upload_lock: a connection uploads its locks"
                " right after identify, once",
            )
        chunks = self._check_ranges(message.ranges, repeats=True)
        self._check_lock_limits(peer, chunks)
        self.locks.hold(peer, message.ranges)
        return Ok(message.id), False

    def _finish_upload(self, peer: Peer, message: Any, writes: list[_Write]) -> _Handled:
        self._need_identified(peer)
        peer.uploaded = True
        if peer.client_id in self.awaiting:
            self.awaiting.discard(peer.client_id)
            if not self.awaiting and self.grace:
                log.info("every snapshot client re-declared its read locks")
                self.grace = False
                return Ok(message.id), True
        return Ok(message.id), False

    def _need_identified(self, peer: Peer) -> None:
        if not peer.identified:
            raise RequestRefused(ErrorCode.NOT_IDENTIFIED, "identify before querying chunks")
        if peer.detaching:
            raise RequestRefused(
                ErrorCode.SNAPSHOT_DELETED, f"snapshot {peer.snapshot} was deleted"
            )

    def _need_snapshot(self, peer: Peer) -> None:
        if peer.snapshot is None:
            raise RequestRefused(
                ErrorCode.INVALID_REQUEST,
                "origin connections read the origin directly and hold no read locks",
            )

    def _check_ranges(self, ranges: Ranges, *, repeats: bool = False) -> int:
        """Refuse bad ranges (csnapd.checks); returns how many chunks they name."""
        return check_ranges(
            ranges,
            origin_chunks=self.engine.geometry.origin_chunks,
            max_chunks=self.max_chunks,
            repeats=repeats,
        )

    def _check_reply_fits(self, peer: Peer, reply: type[Message], chunks: int) -> None:
        """Refuse a request whose reply could exceed the peer's frame limit.

        A reply lists at most one entry per chunk asked about, so its largest
        size is known from the request, before anything is done.
        """
        if chunks > MAX_RANGES:
            # One entry per chunk may be more than a list carries.
            raise RequestRefused(
                ErrorCode.REQUEST_TOO_LARGE,
                f"the {reply.TYPE} reply for {chunks} chunks may list more than"
                f" {MAX_RANGES} ranges; ask about fewer chunks at once",
            )
        largest = largest_payload(reply, chunks)
        if largest > peer.max_frame:
            raise RequestRefused(
                ErrorCode.REQUEST_TOO_LARGE,
                f"the {reply.TYPE} reply for {chunks} chunks may take {largest} bytes, more"
                f" than your frame limit of {peer.max_frame}; ask about fewer chunks at once",
            )

    def _check_lock_limits(self, peer: Peer, locks: int) -> None:
        """Refuse read locks past the per-connection or the server's limit."""
        held = self.locks.locks_of(peer)
        if held + locks > self.max_read_locks:
            raise RequestRefused(
                ErrorCode.TOO_MANY_REQUESTS,
                f"this connection holds {held} read locks and asks for {locks} more;"
                f" at most {self.max_read_locks}: finish snapshot reads first",
            )
        total = self.locks.total
        if total + locks > self.max_server_read_locks:
            raise RequestRefused(
                ErrorCode.TOO_MANY_REQUESTS,
                f"connections hold {total} read locks and this one asks for {locks} more;"
                f" the server holds at most {self.max_server_read_locks}: try again later",
            )

    def _identify(self, peer: Peer, message: Any, writes: list[_Write]) -> _Handled:
        if peer.identified:
            raise RequestRefused(ErrorCode.ALREADY_IDENTIFIED, "this connection is identified")
        if message.snapshot is not None:
            info = self.engine.snapshot(message.snapshot)
            if info.state != "live":
                raise RequestRefused(
                    ErrorCode.SNAPSHOT_UNAVAILABLE, f"snapshot {message.snapshot} is {info.state}"
                )
        peer.client_id = message.client
        peer.snapshot = message.snapshot
        peer.identified = True
        log.info(
            "%s identified: client %#x, %s",
            peer,
            message.client,
            "origin" if message.snapshot is None else f"snapshot {message.snapshot}",
            extra={
                "event": "client.identified",
                "connection": peer.number,
                "client": f"{message.client:#x}",
                "snapshot": message.snapshot,
            },
        )
        g = self.engine.geometry
        identified = Identified(
            message.id,
            message.snapshot,
            g.chunk_size,
            g.origin_chunks,
            self.epoch,
            self.max_chunks,
            self.lease_ms,
        )
        return identified, False

    def _snapshot_read(self, peer: Peer, message: QuerySnapshotRead) -> Message:
        assert peer.snapshot is not None
        segments = self.engine.snapshot_read(peer.snapshot, message.ranges)
        store = tuple(
            (s.chunk, s.count, s.store_chunk) for s in segments if s.store_chunk is not None
        )
        origin = tuple((s.chunk, s.count) for s in segments if s.store_chunk is None)
        if origin:
            # The lookup changed nothing: refusing here still does nothing.
            self._check_lock_limits(peer, sum(count for _, count in origin))
            self.locks.hold(peer, origin)
        return SnapshotReadOk(message.id, store, origin)

    def _status(self, request: int) -> Message:
        status = self.engine.status()
        store = {
            name: getattr(status, name)
            for name in (
                "uuid",
                "created_ns",
                "chunk_size",
                "block_size",
                "store_chunks",
                "origin_chunks",
                "data_chunks",
                "data_free",
                "meta_blocks",
                "meta_free",
                "exceptions",
                "sequence",
                "sweep_cursor",
            )
        }
        return StatusReply(
            request,
            store,
            tuple(_info(i) for i in status.snapshots),
            tuple(_info(i) for i in status.deleting),
        )

    def server_info(self) -> dict[str, Any]:
        """What get_server_info reports."""
        identified = [p for p in self.peers if p.identified]
        if self.failed:
            state = "failed"
        elif self.grace:
            state = "uploading"
        else:
            state = "active"
        return {
            "address": self.address,
            "store": self.store,
            "origin": self.origin,
            "started_ns": self.started_ns,
            "epoch": self.epoch,
            "state": state,
            "clients": len(self.peers),
            "origin_clients": sum(1 for p in identified if p.snapshot is None),
            "snapshot_clients": sum(1 for p in identified if p.snapshot is not None),
            "commits": self.engine.stats.commits,
            "requests": self.requests,
        }

    # -- snapshots: create barrier and delete -------------------------------------

    def _create(
        self,
        peer: Peer,
        message: CreateSnapshot,
        out: Outcome,
        replies: list[tuple[Peer, Message]],
        notices: list[tuple[Peer, Message]],
    ) -> bool:
        self._pending_creates.append((peer, message))
        if self.barrier:
            return False  # joins the barrier already running
        origin_peers = {p for p in self.peers if p.identified and p.snapshot is None}
        if not origin_peers:
            self._run_creates(replies)
            return False
        self._barriers += 1
        self.barrier = self._barriers
        self._barrier_waiting = origin_peers
        out.barrier_started = self.barrier
        log.info("barrier %d: waiting for %d origin clients", self.barrier, len(origin_peers))
        notices.extend((p, Barrier(self.barrier)) for p in origin_peers)
        return False

    def _barrier_done(self, peer: Peer, barrier: int, replies: list[tuple[Peer, Message]]) -> bool:
        if barrier != self.barrier:
            return False  # a late answer to a barrier that expired
        self._barrier_waiting.discard(peer)
        if self._barrier_waiting:
            return False
        self._run_creates(replies)
        self._end_barrier()
        return True

    def _run_creates(self, replies: list[tuple[Peer, Message]]) -> None:
        for peer, message in self._pending_creates:
            try:
                info = self.engine.create_snapshot(message.tag, message.priority)
            except EngineFailedError:
                raise
            except EngineError as exc:
                replies.append((peer, _error(message.id, error_code(exc), str(exc))))
                continue
            log.info(
                "snapshot %d created (share bit %d)",
                info.tag,
                info.bit,
                extra={
                    "event": "snapshot.created",
                    "snapshot": info.tag,
                    "connection": peer.number,
                    "request": message.id,
                },
            )
            replies.append((peer, SnapshotReply(message.id, _info(info))))
        self._pending_creates = []

    def _end_barrier(self) -> None:
        self.barrier = 0
        self._barrier_waiting = set()
        self._pending_creates = []

    def _delete(
        self,
        peer: Peer,
        message: DeleteSnapshot,
        out: Outcome,
        replies: list[tuple[Peer, Message]],
        notices: list[tuple[Peer, Message]],
    ) -> None:
        info = self.engine.delete_snapshot(message.tag)
        log.info(
            "snapshot %d deleted",
            message.tag,
            extra={
                "event": "snapshot.deleted",
                "snapshot": message.tag,
                "connection": peer.number,
                "request": message.id,
            },
        )
        replies.append((peer, SnapshotReply(message.id, _info(info))))
        for other in self.peers:
            if other.identified and other.snapshot == message.tag and not other.detaching:
                other.detaching = True
                self.locks.release_all(other)
                notices.append((other, SnapshotDeleted(message.tag)))
                out.detached.append(other)

    # -- peers going away, parked writes ---------------------------------------

    def _disconnected(self, peer: Peer, replies: list[tuple[Peer, Message]]) -> bool:
        self.peers.discard(peer)
        released = self.locks.release_all(peer)
        self.parked = [w for w in self.parked if w.peer is not peer]
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
        if peer in self._barrier_waiting:
            return self._barrier_done(peer, self.barrier, replies) or bool(released)
        return bool(released)

    def _reapply(self, replies: list[tuple[Peer, Message]]) -> list[_Write]:
        """Parked writes whose reasons may have cleared: apply them again."""
        if self.barrier or self.grace:
            return []
        ready, self.parked = self.parked, []
        out = []
        for write in ready:
            try:
                result = self.engine.origin_write(write.ranges)
            except EngineFailedError:
                raise
            except EngineError as exc:
                replies.append((write.peer, _error(write.request, error_code(exc), str(exc))))
                continue
            out.append(
                _Write(write.peer, write.request, write.ranges, write.copied + result.copied)
            )
        return out

    def _sync_registry(self) -> None:
        """Keep the store's registry equal to the snapshot clients connected."""
        clients = frozenset(
            p.client_id
            for p in self.peers
            if p.identified and p.snapshot is not None and p.client_id is not None
        )
        # Clients the last server knew, still expected back, stay registered.
        clients |= self.awaiting
        if clients != self._registered:
            self.engine.set_registered_clients(clients)
            self._registered = clients


def _error(request: int | None, code: ErrorCode, message: str) -> Error:
    return Error(request, int(code), code.symbol, message[:1024])
