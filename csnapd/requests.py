"""The requests csnapd answers, one handler each, typed by message.

Owns no state of its own: each handler checks its request (refusing it
before it does anything: docs/protocol.md, "What csnapd checks", the rule
rule: refuse before effect), then acts on the engine, the write gate or the
create barrier and says what to answer. Replies leave only after the batch's
commit (rule: durable acknowledgement, kept by csnapd.dispatch).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Set
from typing import TypeGuard, assert_never, get_args

from csnap_format.runs import append_run
from csnap_protocol import (
    MAX_RANGES,
    BarrierDone,
    ChangesReply,
    ChangeUseCount,
    CreateSnapshot,
    DeleteSnapshot,
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
    OwnedReply,
    QueryChanges,
    QueryMap,
    QueryOwned,
    QuerySnapshotRead,
    QueryWrite,
    Resize,
    Resized,
    RevertSnapshot,
    ServerInfoReply,
    ServerRecord,
    SetPriority,
    Shutdown,
    SnapshotDataWritten,
    SnapshotDeleted,
    SnapshotList,
    SnapshotReadOk,
    SnapshotReply,
    SnapshotWriteOk,
    UploadLock,
    WriteSnapshotData,
    largest_payload,
    touched_chunks,
)
from csnap_protocol.bounds import RANGE_BYTES
from csnapd.batch import Batch, ParkedWrite, Peer, Ranges
from csnapd.checks import RequestRefused, check_ranges
from csnapd.create_barrier import CreateBarrier
from csnapd.engine import Engine
from csnapd.reporting import snapshot_record, status_reply
from csnapd.space_watch import SpaceWatch
from csnapd.write_gate import WriteGate

__all__ = ["Answered", "Inbound", "LOOKUPS", "is_inbound", "RequestHandlers"]

log = logging.getLogger("csnapd")

#: Requests answered by one reply that depends only on the request.
Answered = (
    Identify
    | QuerySnapshotRead
    | QueryMap
    | QueryChanges
    | QueryOwned
    | UploadLock
    | ListSnapshots
    | GetStatus
    | SetPriority
    | ChangeUseCount
    | GetServerInfo
)
#: Every message the dispatcher handles (keepalive and hello stay in the transport).
Inbound = (
    Answered
    | QueryWrite
    | WriteSnapshotData
    | FinishSnapshotRead
    | FinishUploadLock
    | DeleteSnapshot
    | CreateSnapshot
    | RevertSnapshot
    | BarrierDone
    | Shutdown
    | Resize
)
_INBOUND: tuple[type[Message], ...] = get_args(Inbound)
#: Requests that change nothing in the store (a snapshot read's read locks
#: live in memory only): they may be answered while a commit is written
#: (csnapd.dispatch, Dispatcher.answer_lookup). Not `query_owned`: it hands
#: out chunks a client may write into, which may need a seal of their own
#: after the commit being written (docs/rules.md, "data before pointers").
LOOKUPS: tuple[type[Message], ...] = (QuerySnapshotRead, QueryMap, QueryChanges)


def is_inbound(message: Message) -> TypeGuard[Inbound]:
    """Whether the dispatcher handles `message`."""
    return isinstance(message, _INBOUND)


def _merged(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Ascending ranges with touching neighbours joined."""
    out: list[tuple[int, int]] = []
    for start, count in sorted(ranges):
        append_run(out, start, count)
    return out


class RequestHandlers:
    """Answers each inbound message; see handle()."""

    def __init__(
        self,
        engine: Engine,
        gate: WriteGate,
        barrier: CreateBarrier,
        peers: Set[Peer],
        server_info: Callable[[], ServerRecord],
        *,
        room: Callable[[], tuple[frozenset[int], bool]],
        space: SpaceWatch,
        epoch: int,
        max_chunks: int,
    ):
        self._engine = engine
        self._space = space
        self._gate = gate
        self._barrier = barrier
        self._peers = peers
        self._server_info = server_info
        self._room = room
        self._epoch = epoch
        self._max_chunks = max_chunks

    def handle(self, peer: Peer, message: Inbound, batch: Batch) -> bool:
        """Handle `message`; whether parked writes may now be grantable.

        Raises:
            RequestRefused, EngineError: the request did nothing.
        """
        # The cases are disjoint classes; the most frequent come first.
        match message:
            case QueryWrite():
                reply = self._query_write(peer, message, batch.writes)
                if reply is not None:
                    batch.replies.append((peer, reply))
                return False
            case WriteSnapshotData():
                batch.replies.append((peer, self._write_data(peer, message)))
                return False
            case BarrierDone():
                return self._barrier.done(peer, message.barrier, batch.replies)
            case CreateSnapshot() | RevertSnapshot():
                return self._barrier.create(peer, message, self._peers, batch)
            case Shutdown():
                batch.out.shutdown = (peer, message.id)
                return False
            case FinishSnapshotRead():
                batch.replies.append((peer, self._finish_read(peer, message)))
                return True
            case FinishUploadLock():
                self._need_identified(peer)
                peer.uploaded = True
                batch.replies.append((peer, Ok(message.id)))
                return self._gate.uploaded(peer.client_id)
            case DeleteSnapshot():
                batch.replies.append((peer, self._delete(peer, message, batch)))
                return False
            case Resize():
                batch.replies.append((peer, self._resize(message)))
                return False
            case _:
                batch.replies.append((peer, self._answer(peer, message)))
                return False

    def _answer(self, peer: Peer, message: Answered) -> Message:
        """The reply to a request answered at once."""
        match message:
            case QuerySnapshotRead():
                return self._query_read(peer, message)
            case QueryMap():
                return self._query_map(peer, message)
            case Identify():
                return self._identify(peer, message)
            case QueryChanges():
                return self._query_changes(peer, message)
            case QueryOwned():
                return self._query_owned(peer, message)
            case UploadLock():
                return self._upload(peer, message)
            case ListSnapshots():
                records = tuple(snapshot_record(i) for i in self._engine.snapshots())
                return SnapshotList(message.id, records)
            case GetStatus():
                return status_reply(self._engine, self._space, message.id)
            case SetPriority():
                info = self._engine.set_priority(message.tag, message.priority)
                return SnapshotReply(message.id, snapshot_record(info))
            case ChangeUseCount():
                info = self._engine.change_use_count(message.tag, message.delta)
                return SnapshotReply(message.id, snapshot_record(info))
            case GetServerInfo():
                return ServerInfoReply(message.id, self._server_info())
            case _:
                assert_never(message)

    def _resize(self, message: Resize) -> Resized:
        """Grow (or safely shrink) the origin and the store (csnapd.engine.resize)."""
        result = self._engine.resize(
            origin_bytes=message.origin_bytes,
            store_bytes=message.store_bytes,
            grow_files=message.grow_files,
        )
        chunk = self._engine.chunk_size
        grown = f"; grew the {' and '.join(result.grown_files)} file" if result.grown_files else ""
        log.info(
            "resized: origin %d -> %d bytes, store %d -> %d bytes%s",
            result.origin_chunks_before * chunk,
            result.origin_chunks * chunk,
            result.store_chunks_before * chunk,
            result.store_chunks * chunk,
            grown,
            extra={"event": "store.resized"},
        )
        return Resized(
            message.id,
            chunk,
            result.origin_chunks_before,
            result.origin_chunks,
            result.store_chunks_before,
            result.store_chunks,
            result.capacity_chunks,
            result.data_chunks,
            result.data_free,
            result.grown_files,
        )

    # -- the data path -----------------------------------------------------------

    def _identify(self, peer: Peer, message: Identify) -> Identified:
        if peer.identified:
            raise RequestRefused(ErrorCode.ALREADY_IDENTIFIED, "this connection is identified")
        if message.snapshot is not None:
            info = self._engine.snapshot(message.snapshot)
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
        g = self._engine.geometry
        return Identified(
            message.id,
            message.snapshot,
            g.chunk_size,
            self._engine.snapshot_chunks(message.snapshot),
            self._epoch,
            self._max_chunks,
            self._gate.lease_ms,
            self._engine.fence_token,
        )

    def _query_write(
        self, peer: Peer, message: QueryWrite, writes: list[ParkedWrite]
    ) -> SnapshotWriteOk | None:
        self._need_identified(peer)
        chunks = self._check_ranges(message.ranges)
        if peer.snapshot is None:
            if self._engine.revert_progress is not None:
                # Held until the revert ends, and applied only then: copying
                # out now would give the snapshot being reverted exceptions
                # the revert did not count (docs/rules.md, "revert in
                # journaled steps").
                writes.append(ParkedWrite(peer, message.id, message.ranges, 0))
                return None
            result = self._engine.origin_write(message.ranges, room=self._room)
            writes.append(ParkedWrite(peer, message.id, message.ranges, result.copied))
            return None  # granted after the commit, if the write gate lets it through
        self._check_reply_fits(peer, SnapshotWriteOk, chunks)
        segments = self._engine.snapshot_write(peer.snapshot, message.ranges, room=self._room)
        triples = tuple((s.chunk, s.count, s.store_chunk) for s in segments)
        return SnapshotWriteOk(message.id, triples)

    def _write_data(
        self, peer: Peer, message: WriteSnapshotData
    ) -> SnapshotDataWritten | SnapshotWriteOk:
        """A small snapshot write with its bytes: written into the copies by
        the engine when each chunk needs one, else handed out as query_write's."""
        self._need_identified(peer)
        snapshot = peer.snapshot
        if snapshot is None:
            raise RequestRefused(
                ErrorCode.INVALID_REQUEST,
                "write_snapshot_data is for snapshot connections; an origin client writes"
                " the origin itself once query_write grants it",
            )
        touched = touched_chunks(message.offset, len(message.data), self._engine.chunk_size)
        chunks = self._check_ranges((touched,))
        # Either reply lists at most one segment per chunk.
        self._check_reply_fits(peer, SnapshotWriteOk, chunks)
        segments, written = self._engine.snapshot_write_data(
            snapshot, message.offset, message.data, room=self._room
        )
        triples = tuple((s.chunk, s.count, s.store_chunk) for s in segments)
        if written:
            return SnapshotDataWritten(message.id, triples)
        return SnapshotWriteOk(message.id, triples)

    def _query_read(self, peer: Peer, message: QuerySnapshotRead) -> SnapshotReadOk:
        self._need_identified(peer)
        snapshot = self._need_snapshot(peer)
        chunks = self._check_ranges(message.ranges)
        self._check_reply_fits(peer, SnapshotReadOk, chunks)
        segments = self._engine.snapshot_read(snapshot, message.ranges)
        store = tuple(
            (s.chunk, s.count, s.store_chunk) for s in segments if s.store_chunk is not None
        )
        origin = tuple((s.chunk, s.count) for s in segments if s.store_chunk is None)
        if origin:
            # The lookup changed nothing: refusing here still does nothing.
            self._gate.check_lock_limits(peer, sum(count for _, count in origin))
            self._gate.locks.hold(peer, origin)
        return SnapshotReadOk(message.id, store, origin)

    def _query_map(self, peer: Peer, message: QueryMap) -> MapReply:
        self._need_identified(peer)
        chunks = self._check_ranges(message.ranges)
        self._check_reply_fits(peer, MapReply, chunks)
        if peer.snapshot is None:
            copied = self._engine.origin_copied(message.ranges)
        else:
            segments = self._engine.snapshot_read(peer.snapshot, message.ranges)
            copied = [(s.chunk, s.count) for s in segments if s.store_chunk is not None]
        return MapReply(message.id, tuple(_merged(copied)))

    def _query_changes(self, peer: Peer, message: QueryChanges) -> ChangesReply:
        """The changelist between the connection's view and `base`, one bounded step."""
        self._need_identified(peer)
        origin_chunks = self._engine.geometry.origin_chunks
        if message.count < 1 or message.start >= origin_chunks:
            raise RequestRefused(
                ErrorCode.INVALID_REQUEST,
                f"query_changes from chunk {message.start} for {message.count} chunks names no"
                f" chunk of the origin's {origin_chunks}",
            )
        # As many ranges as the peer's frame takes, however long the range:
        # the reply stops early and says where to go on.
        room = (peer.max_frame - largest_payload(ChangesReply, 0)) // RANGE_BYTES
        max_runs = min(MAX_RANGES, room)
        if max_runs < 1:
            raise RequestRefused(
                ErrorCode.REQUEST_TOO_LARGE,
                f"a changes reply with one range does not fit your frame limit of {peer.max_frame}",
            )
        count = min(message.count, origin_chunks - message.start)
        answer = self._engine.changes(
            message.base, peer.snapshot, message.start, count, max_runs=max_runs
        )
        return ChangesReply(message.id, answer.runs, answer.next)

    def _query_owned(self, peer: Peer, message: QueryOwned) -> OwnedReply:
        self._need_identified(peer)
        snapshot = self._need_snapshot(peer)
        chunks = self._check_ranges(message.ranges)
        self._check_reply_fits(peer, OwnedReply, chunks)
        owned, origin = self._engine.snapshot_owned(snapshot, message.ranges)
        return OwnedReply(message.id, tuple(owned), tuple(origin))

    def _finish_read(self, peer: Peer, message: FinishSnapshotRead) -> Ok:
        self._need_identified(peer)
        self._check_ranges(message.ranges, repeats=True)
        locks = self._gate.locks
        # All or nothing: an error reply means no lock was released.
        missing = locks.missing(peer, message.ranges)
        if missing:
            raise RequestRefused(
                ErrorCode.INVALID_REQUEST,
                f"{len(missing)} chunks are not read-locked by this connection as many times"
                f" as named (first {missing[0]}); no lock was released",
            )
        locks.release(peer, message.ranges)
        return Ok(message.id)

    def _upload(self, peer: Peer, message: UploadLock) -> Ok:
        self._need_identified(peer)
        self._need_snapshot(peer)
        if peer.uploaded:
            raise RequestRefused(
                ErrorCode.INVALID_REQUEST,
                "upload_lock after finish_upload_lock: a connection uploads its locks"
                " right after identify, once",
            )
        chunks = self._check_ranges(message.ranges, repeats=True)
        self._gate.check_lock_limits(peer, chunks)
        self._gate.locks.hold(peer, message.ranges)
        return Ok(message.id)

    # -- administration ------------------------------------------------------------

    def _delete(self, peer: Peer, message: DeleteSnapshot, batch: Batch) -> SnapshotReply:
        """Delete a snapshot and tell its clients to finish and go.

        Its space is swept only once they have (docs/protocol.md, "Snapshot
        delete with detaching clients"; rule: detach before sweep).
        """
        info = self._engine.delete_snapshot(message.tag)
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
        for other in self._peers:
            if other.identified and other.snapshot == message.tag and not other.detaching:
                other.detaching = True
                self._gate.locks.release_all(other)
                batch.notices.append((other, SnapshotDeleted(message.tag)))
                batch.out.detached.append(other)
        return SnapshotReply(message.id, snapshot_record(info))

    # -- checks --------------------------------------------------------------------

    def _need_identified(self, peer: Peer) -> None:
        if not peer.identified:
            raise RequestRefused(ErrorCode.NOT_IDENTIFIED, "identify before querying chunks")
        if peer.detaching:
            raise RequestRefused(
                ErrorCode.SNAPSHOT_DELETED, f"snapshot {peer.snapshot} was deleted"
            )

    def _need_snapshot(self, peer: Peer) -> int:
        """The snapshot `peer` identified to; refuses an origin connection."""
        if peer.snapshot is None:
            raise RequestRefused(
                ErrorCode.INVALID_REQUEST,
                "origin connections read the origin directly and hold no read locks",
            )
        return peer.snapshot

    def _check_ranges(self, ranges: Ranges, *, repeats: bool = False) -> int:
        """Refuse bad ranges (csnapd.checks); returns how many chunks they name."""
        return check_ranges(
            ranges,
            origin_chunks=self._engine.geometry.origin_chunks,
            max_chunks=self._max_chunks,
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
