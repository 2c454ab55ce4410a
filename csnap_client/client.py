"""The data-path client: what an NBD gateway or a test uses to ask csnapd
about chunks before touching them.

Usage, for an origin client:

    async with open_client(tcp_connector(host, port)) as client:
        async with client.origin_write([(chunk, count)]):
            ... write those origin chunks ...

and for a snapshot client:

    async with open_client(connect, snapshot=7) as client:
        async with client.snapshot_read([(chunk, count)]) as plan:
            ... read plan.store from the store, plan.origin from the origin ...
            if not client.read_trusted(plan): ... read again: ask anew ...
        async with client.snapshot_write([(chunk, count)]) as segments:
            ... write into the store at the segments ...

or, the fastest way to read (what the NBD gateway does):

        async with client.read_plan(chunk, count) as plan:
            ... read plan.store and plan.origin as above ...
            if not await client.confirm_read(plan): ... read again ...

Rules:
  * A grant (an origin write the server allowed, or the store chunks a
    snapshot write goes to) stays open until its `async with` ends; the
    create barrier and snapshot deletion wait for open grants.
  * A snapshot read holds read locks on its origin ranges until its
    `async with` ends, which tells the server it is done.
  * When the connection breaks, the client reconnects, identifies again,
    re-declares the read locks it holds, and sends again every request
    that had no answer. Callers only see the delay.
  * Liveness (docs/protocol.md, "Liveness"): the server drops a client it
    has not heard from for its lease, and its read locks and barrier duty
    with it. The client sends a keepalive every third of the lease, and
    trusts a read lock or a write grant only until its lease deadline: the
    send time of the newest request the server answered on the session
    that holds it, plus TRUST_FRACTION of the lease. A snapshot read whose
    origin data arrived after that (read_trusted() false) must be asked
    again; a grant past it is given back and asked again before any write.
    A lock re-declared after a reconnect keeps the server from writing
    under a reader, but a read it covered is asked again all the same.
  * An origin client remembers the chunks the server let it write: each
    was then copied out for every live snapshot, so writing it again needs
    no question until a new snapshot exists. The server's create barrier
    (and any reconnect) forgets them all, before any later write is
    granted from memory; writes granted from memory are open grants like
    any other, so the barrier waits for them.
  * A snapshot client keeps the store addresses its snapshot owns alone
    (query_owned) and uses them without asking again (docs/rules.md,
    "stable owned addresses"): forgotten at every new session and when the
    snapshot is gone, trusted only within the lease deadline, and each
    read from them an open grant. Chunks last seen shared with the origin
    are read without locks and count only once a query_map asked after
    the read says they still are ("verified origin reads").
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import math
import random
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from types import TracebackType

import trio
import trio.lowlevel

from csnap_client.owned import WINDOW_CHUNKS, OwnedMap
from csnap_client.session import (
    ConnectionLostError,
    Connector,
    ServerError,
    Session,
    open_session,
)
from csnap_common import single_errors
from csnap_protocol import (
    MAX_RANGES,
    Barrier,
    BarrierDone,
    ChangesReply,
    ErrorCode,
    FinishSnapshotRead,
    FinishUploadLock,
    Identified,
    Identify,
    Keepalive,
    MapReply,
    Message,
    OwnedReply,
    QueryChanges,
    QueryMap,
    QueryOwned,
    QuerySnapshotRead,
    QueryWrite,
    Request,
    Role,
    SnapshotDeleted,
    SnapshotReadOk,
    SnapshotWriteOk,
    UploadLock,
    WriteOk,
    message_id,
)

__all__ = [
    "DataClient",
    "ReadPlan",
    "SnapshotDeletedError",
    "ClientClosedError",
    "LeaseExpiredError",
    "TRUST_FRACTION",
    "open_client",
]

log = logging.getLogger("csnap.client")

Ranges = Sequence[tuple[int, int]]

#: Share of the server's lease a lock or grant is trusted for, counted from
#: the send time of the newest answered request. The rest is the margin for
#: the two clocks' rates: it covers a relative rate error up to 5%, where
#: (1 - 0.05) / (1 + 0.05) > 0.9 (docs/protocol.md, "Liveness").
TRUST_FRACTION = 0.9
#: Keepalives per lease.
KEEPALIVES_PER_LEASE = 3
#: Grants asked for in a row that arrive past the lease deadline before the
#: write fails (each is a fresh round trip; one is almost always enough).
GRANT_ATTEMPTS = 4


class SnapshotDeletedError(Exception):
    """The snapshot this client serves was deleted (or no longer exists)."""


class ClientClosedError(Exception):
    """The client was closed."""


class LeaseExpiredError(Exception):
    """Every grant the server gave arrived past this client's lease deadline."""


@dataclass(frozen=True)
class ReadPlan:
    """Where to read: `store` as (chunk, count, store chunk), `origin` as (chunk, count).

    `request`: the snapshot read's id, by which read_trusted() finds its locks.
    """

    store: tuple[tuple[int, int, int], ...]
    origin: tuple[tuple[int, int], ...]
    request: int = 0


class DataClient:
    """A data-path connection to csnapd that survives server restarts."""

    def __init__(
        self,
        connect: Connector,
        *,
        snapshot: int | None = None,
        client_id: int | None = None,
        reconnect: bool = True,
        retry_interval: float = 0.05,
        max_retry_interval: float = 1.0,
        owned_map: bool = True,
    ):
        self._connect = connect
        #: Whether a snapshot client keeps an owned map (read_plan then
        #: always asks csnapd, with read locks, when it is off).
        self._keep_owned = owned_map
        self.snapshot = snapshot
        self.client_id = client_id if client_id is not None else random.getrandbits(63)
        self._reconnect = reconnect
        self._retry = (retry_interval, max_retry_interval)
        self._ids = itertools.count(1)
        self._session: Session | None = None
        #: The session opened last: the one notices come from, even before
        #: its identify is answered and it becomes `_session`.
        self._latest: Session | None = None
        # Set and replaced at every change of session, closing or deletion;
        # waiters re-check the state (see _wait_ready).
        self._changed = trio.Event()
        self._closing = False
        self._deleted = False
        #: The connection broke and `reconnect` is off: no session will come.
        self._lost = False
        self.info: Identified | None = None
        #: The largest fencing token a server identified with; a server with
        #: a smaller one is refused (docs/protocol.md, "Fencing").
        self.token = 0
        #: Request ids of grants not yet closed by their holder.
        self._grants: set[int] = set()
        self._grants_changed = trio.Event()
        #: Origin ranges this client holds read locks on, by request id.
        self._held: dict[int, tuple[tuple[int, int], ...]] = {}
        #: The session whose lease covers a read's locks or a grant, by
        #: request id: the one that answered it.
        self._answered_on: dict[int, Session] = {}
        #: Origin clients: a bit per origin chunk known unique for every live
        #: snapshot (None until identified), and the ranges of origin writes
        #: asked and not yet answered, by request id.
        self._unique: bytearray | None = None
        self._asking: dict[int, tuple[tuple[int, int], ...]] = {}
        self._local_grants = itertools.count(1)
        #: Origin writes granted from memory, without a server round trip.
        self.remembered_grants = 0
        #: Snapshot clients: the store chunks the snapshot owns alone, for
        #: this session (None before identify, between sessions, once the
        #: snapshot is gone, or if the server cannot answer query_owned),
        #: and the windows being asked about.
        self._owned: OwnedMap | None = None
        self._owned_asking: dict[int, trio.Event] = {}
        #: Snapshot reads placed from the owned map, without a server round trip.
        self.owned_reads = 0
        #: Origin reads waiting for csnapd to confirm their chunks still
        #: shared (rule: verified origin reads), and whether a query_map
        #: for them is out: one at a time, for everything waiting.
        self._checks: list[_OriginCheck] = []
        self._checking = False
        self._checked = trio.Event()
        self.reconnects = 0

    # -- geometry -------------------------------------------------------------

    @property
    def chunk_size(self) -> int:
        assert self.info is not None
        return self.info.chunk_size

    @property
    def origin_chunks(self) -> int:
        assert self.info is not None
        return self.info.origin_chunks

    @property
    def max_chunks(self) -> int:
        assert self.info is not None
        return self.info.max_chunks

    # -- running ---------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep a session up until closed; report started once first identified."""
        delay = self._retry[0]
        started = False
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            while not self._closing and not self._deleted:
                try:
                    session = await self._establish(nursery)
                except (OSError, ConnectionLostError, ServerError) as exc:
                    if isinstance(exc, ServerError) and not _retryable(exc):
                        raise
                    if not self._reconnect and not started:
                        raise
                    log.info("cannot reach csnapd (%s); retrying in %.2fs", exc, delay)
                    await trio.sleep(delay)
                    delay = min(delay * 2, self._retry[1])
                    continue
                delay = self._retry[0]
                if not started:
                    started = True
                    task_status.started()
                await session.closed.wait()
                self._session = None
                self._forget_unique()
                # rule: stable owned addresses: a new session asks again.
                self._owned = None
                if not self._reconnect:
                    self._lost = True
                    self._notify()
                    break
                self._notify()
                if not self._closing and not self._deleted:
                    self.reconnects += 1
                    log.warning("lost the connection to csnapd; reconnecting")
            nursery.cancel_scope.cancel()

    async def _establish(self, nursery: trio.Nursery) -> Session:
        session = await open_session(nursery, self._connect, Role.CLIENT, self._notice, self._reply)
        self._latest = session
        try:
            identified = await session.request(
                Identify(next(self._ids), self.client_id, self.snapshot)
            )
        except ServerError as exc:
            if exc.error in (ErrorCode.NO_SUCH_SNAPSHOT, ErrorCode.SNAPSHOT_UNAVAILABLE):
                self._gone()
            raise
        assert isinstance(identified, Identified)
        if identified.token < self.token:
            # A server elected before the one this client last used: it was
            # fenced (or is about to fence itself); its answers are stale.
            await trio.aclose_forcefully(session.stream)
            code = ErrorCode.FENCED
            raise ServerError(
                int(code),
                code.symbol,
                f"the server's fencing token {identified.token} is older than {self.token}",
            )
        self.token = identified.token
        if self.info is not None and (
            identified.chunk_size != self.info.chunk_size
            or identified.origin_chunks != self.info.origin_chunks
        ):
            raise ServerError(
                int(ErrorCode.INVALID_REQUEST), "invalid_request", "the server's geometry changed"
            )
        self.info = identified
        if self.snapshot is None:
            # A new session: snapshots may have been created meanwhile.
            self._unique = bytearray((identified.origin_chunks + 7) // 8)
        elif self._keep_owned:
            window = min(WINDOW_CHUNKS, max(1, identified.max_chunks))
            self._owned = OwnedMap(identified.origin_chunks, window)
        if self.snapshot is not None:
            held = [r for ranges in self._held.values() for r in ranges]
            for first in range(0, len(held), MAX_RANGES):
                batch = tuple(held[first : first + MAX_RANGES])
                await session.request(UploadLock(next(self._ids), batch))
            await session.request(FinishUploadLock(next(self._ids)))
        session.lease = identified.lease_ms / 1000
        self._session = session
        self._notify()
        if session.lease:
            nursery.start_soon(self._keep_alive, session)
        return session

    async def _keep_alive(self, session: Session) -> None:
        """Keep `session` heard from, and its lease deadline moving, until it ends."""
        interval = session.lease / KEEPALIVES_PER_LEASE
        while session.usable:
            await trio.sleep(interval)
            try:
                await session.request(Keepalive(next(self._ids)))
            except (ConnectionLostError, ServerError):
                return

    def lease_deadline(self, session: Session | None) -> float:
        """trio.current_time() until which what `session` answered is trusted."""
        if session is None or not session.usable or self._closing or self._deleted:
            return -math.inf
        if not session.lease:
            return math.inf  # this server drops no silent client
        return session.confirmed + session.lease * TRUST_FRACTION

    def read_trusted(self, plan: ReadPlan) -> bool:
        """Whether origin data read under `plan`'s locks, just now, is the snapshot's.

        Call it after the origin read completed. False when the lease
        deadline of the session holding the locks has passed (the server
        may have dropped them, and an origin write overwritten the chunks)
        or that session ended: read again through a new snapshot_read.
        """
        if not plan.origin and plan.request >= 0:
            return True
        # Origin data under read locks, or store chunks placed from the
        # owned map (a negative, local id): both hold only within the lease.
        session = self._answered_on.get(plan.request)
        return trio.current_time() < self.lease_deadline(session)

    def _reply(self, message: Message) -> None:
        # Runs in the session reader, before any later message is read: a
        # barrier after this reply forgets what this reply teaches.
        request = message_id(message)
        if request is None:
            return  # only replies reach here: they carry the id they answer
        if isinstance(message, WriteOk | SnapshotWriteOk | SnapshotReadOk) and (
            self._latest is not None
        ):
            # The reader of the newest session is the only one still reading.
            self._answered_on[request] = self._latest
        asked = self._asking.pop(request, None)
        if isinstance(message, WriteOk) and asked is not None and self._unique is not None:
            bits = self._unique
            for start, count in asked:
                for chunk in range(start, start + count):
                    bits[chunk >> 3] |= 1 << (chunk & 7)
        if isinstance(message, SnapshotWriteOk) and self._owned is not None:
            # Every chunk a snapshot write is given is the snapshot's alone.
            self._owned.note(message.segments)
        if isinstance(message, WriteOk | SnapshotWriteOk):
            self._grants.add(message.id)
        elif isinstance(message, SnapshotReadOk) and message.origin:
            self._held[message.id] = message.origin

    def _notice(self, message: Message) -> None:
        if isinstance(message, Barrier):
            self._forget_unique()
            self._nursery.start_soon(
                self._answer_barrier, message.barrier, frozenset(self._grants), self._latest
            )
        elif isinstance(message, SnapshotDeleted):
            self._gone()
            self._nursery.start_soon(self._leave)

    async def _answer_barrier(
        self, barrier: int, grants: frozenset[int], session: Session | None
    ) -> None:
        # Answer on the session the barrier came from: it may come right
        # behind identify's reply, before that session is `_session`.
        await self._wait_grants(grants)
        if session is not None and not session.closed.is_set():
            # If the connection broke, the new server has no barrier waiting.
            with contextlib.suppress(ConnectionLostError):
                await session.send(BarrierDone(barrier))

    async def _wait_grants(self, grants: frozenset[int]) -> None:
        while grants & self._grants:
            self._grants_changed = trio.Event()
            await self._grants_changed.wait()

    def _forget_unique(self) -> None:
        if self._unique is not None:
            self._unique = bytearray(len(self._unique))

    def _known_unique(self, ranges: Ranges) -> bool:
        """Whether every chunk of `ranges` is known unique (a write may go ahead)."""
        bits = self._unique
        session = self._session
        if bits is None or session is None or session.closed.is_set():
            return False
        for start, count in ranges:
            if start < 0 or count < 1 or start + count > len(bits) * 8:
                return False
            for chunk in range(start, start + count):
                if not bits[chunk >> 3] & (1 << (chunk & 7)):
                    return False
        return True

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _gone(self) -> None:
        self._deleted = True
        self._owned = None
        self._notify()

    async def _leave(self) -> None:
        """The snapshot was deleted: finish open grants, then close."""
        await self._wait_grants(frozenset(self._grants))
        session = self._session
        if session is not None:
            await session.abandon()

    async def aclose(self) -> None:
        """Stop: close the connection and do not reconnect."""
        self._closing = True
        self._notify()
        session = self._session
        if session is not None:
            await session.abandon()

    # -- requests --------------------------------------------------------------

    async def _call(self, make: Callable[[int], Request]) -> Message:
        """Send a request, again after every reconnect, until it is answered."""
        message = make(next(self._ids))
        while True:
            session = await self._wait_ready()
            try:
                return await session.request(message)
            except ConnectionLostError:
                if not self._reconnect:
                    raise
                await session.closed.wait()  # then wait for the next session
            except ServerError as exc:
                if exc.error is ErrorCode.SNAPSHOT_DELETED:
                    self._gone()
                    raise SnapshotDeletedError(exc.message) from exc
                if exc.error is ErrorCode.SNAPSHOT_UNAVAILABLE:
                    self._owned = None
                raise

    async def _wait_ready(self) -> Session:
        """The current session, once there is a live one.

        Raises:
            SnapshotDeletedError, ClientClosedError, ConnectionLostError:
                there will be none.
        """
        while True:
            if self._deleted:
                raise SnapshotDeletedError(f"snapshot {self.snapshot} was deleted")
            if self._closing:
                raise ClientClosedError("the client is closed")
            if self._lost:
                raise ConnectionLostError("the connection to csnapd was lost")
            session = self._session
            if session is not None and not session.closed.is_set():
                return session
            await self._changed.wait()

    def _close_grant(self, request: int) -> None:
        self._grants.discard(request)
        self._answered_on.pop(request, None)
        self._grants_changed.set()

    def _grant_in_lease(self, request: int) -> bool:
        """Whether a write under grant `request` may start now."""
        session = self._answered_on.get(request)
        return trio.current_time() < self.lease_deadline(session)

    @asynccontextmanager
    async def origin_write(self, ranges: Ranges) -> AsyncIterator[WriteOk]:
        """Ask to write origin chunks; the grant is open inside the block.

        Chunks this client was already allowed to write since the last
        snapshot was created need no question: the grant is local (negative
        id, nothing copied).
        """
        # A checkpoint whatever happens next: callers may loop on this.
        await trio.lowlevel.checkpoint()
        for _ in range(GRANT_ATTEMPTS):
            reply = await self._origin_grant(ranges)
            if self._grant_in_lease(reply.id):
                break
            # Past the lease deadline: the server may have dropped this
            # session and run a barrier without us. Give it back, ask again.
            self._close_grant(reply.id)
            self._forget_unique()
        else:
            raise LeaseExpiredError(
                f"{GRANT_ATTEMPTS} origin write grants in a row came past the lease deadline"
            )
        try:
            yield reply
        finally:
            self._close_grant(reply.id)

    def origin_write_now(self, ranges: Ranges) -> _OriginWriteNow:
        """A grant from memory, if every chunk is known unique: True inside the block.

        For callers that write without awaiting inside the block: no barrier
        can come between the check and the write. False (nothing granted)
        when a chunk is not known unique or the lease deadline has passed:
        use origin_write. (A class, not a generator: inline rewrites enter
        one per request.)
        """
        return _OriginWriteNow(self, ranges)

    async def _origin_grant(self, ranges: Ranges) -> WriteOk:
        if self._known_unique(ranges):
            # No await between the check and the grant: a barrier cannot
            # slip in between.
            reply = WriteOk(-next(self._local_grants), 0)
            self._grants.add(reply.id)
            if self._session is not None:
                self._answered_on[reply.id] = self._session
            self.remembered_grants += 1
            return reply
        asked = tuple(ranges)
        asked_as: list[int] = []

        def query(rid: int) -> QueryWrite:
            self._asking[rid] = asked
            asked_as.append(rid)
            return QueryWrite(rid, asked)

        try:
            reply_message = await self._call(query)
        finally:
            for rid in asked_as:
                self._asking.pop(rid, None)
        assert isinstance(reply_message, WriteOk)
        return reply_message

    @asynccontextmanager
    async def snapshot_write(
        self, ranges: Ranges
    ) -> AsyncIterator[tuple[tuple[int, int, int], ...]]:
        """Where to write snapshot chunks: (chunk, count, store chunk) segments."""
        for _ in range(GRANT_ATTEMPTS):
            reply = await self._call(lambda rid: QueryWrite(rid, tuple(ranges)))
            assert isinstance(reply, SnapshotWriteOk)
            if self._grant_in_lease(reply.id):
                break
            # Past the lease deadline: the snapshot may have been deleted
            # and its store chunks reused meanwhile. Ask again.
            self._close_grant(reply.id)
        else:
            raise LeaseExpiredError(
                f"{GRANT_ATTEMPTS} snapshot write grants in a row came past the lease deadline"
            )
        try:
            yield reply.segments
        finally:
            self._close_grant(reply.id)

    @asynccontextmanager
    async def read_plan(self, first: int, count: int) -> AsyncIterator[ReadPlan]:
        """Where to read chunks first..first+count-1 of the snapshot, the fastest way.

        From the owned map when it places every chunk (asking query_owned
        for their windows first if needed): store chunks the snapshot owns
        alone, and chunks last seen shared with the origin, unlocked. Else
        as snapshot_read(). Either way, call confirm_read(plan) after reading
        and read again under a new plan if it says no.
        """
        if self._owned is not None:
            await self._learn_owned(first, count)
            with self.owned_read(first, count, origin=True) as plan:
                if plan is not None:
                    yield plan
                    return
        async with self.snapshot_read([(first, count)]) as plan:
            yield plan

    @asynccontextmanager
    async def snapshot_read(self, ranges: Ranges) -> AsyncIterator[ReadPlan]:
        """Where to read snapshot chunks; origin ranges stay locked inside the block."""
        reply = await self._call(lambda rid: QuerySnapshotRead(rid, tuple(ranges)))
        assert isinstance(reply, SnapshotReadOk)
        try:
            yield ReadPlan(reply.store, reply.origin, reply.id)
        finally:
            self._answered_on.pop(reply.id, None)
            if reply.origin:
                with trio.CancelScope(shield=True):
                    await self._finish_read(reply.id, reply.origin)

    def owned_read(self, first: int, count: int, *, origin: bool = False) -> _OwnedRead:
        """A local plan for chunks first..first+count-1 if the owned map places them all.

        With `origin`, chunks the map last saw shared with the origin are
        placed there, unlocked: such a read counts only once confirm_read()
        says so. None when the map does not place every chunk (or the lease
        deadline has passed). The plan is an open grant until the block
        ends, so a deleted snapshot's client leaves only after the read;
        read_trusted(plan) says whether store data read under it came
        within the lease. (A class, not a generator: inline snapshot reads
        enter one per request.)
        """
        return _OwnedRead(self, first, count, origin)

    def _open_owned_read(self, first: int, count: int, origin: bool) -> ReadPlan | None:
        owned, session = self._owned, self._session
        if owned is None or session is None or self._deleted or self._closing:
            return None
        if not trio.current_time() < self.lease_deadline(session):
            return None
        found = owned.lookup(first, count, origin=origin)
        if found is None:
            return None
        request = -next(self._local_grants)
        self._grants.add(request)
        self._answered_on[request] = session
        self.owned_reads += 1
        return ReadPlan(*found, request)

    def _open_origin_write_now(self, ranges: Ranges) -> int | None:
        if not self._known_unique(ranges) or not (
            trio.current_time() < self.lease_deadline(self._session)
        ):
            return None
        request = -next(self._local_grants)
        self._grants.add(request)
        self.remembered_grants += 1
        return request

    async def confirm_read(self, plan: ReadPlan) -> bool:
        """Whether what was just read under `plan` is the snapshot's; if not, read again.

        read_trusted(), and for a local plan's origin ranges (read without
        read locks) csnapd's word, asked after the read, that the snapshot
        still shares every one of those chunks with the origin: no origin
        write to them can have been granted before (rule: verified origin
        reads). Concurrent confirmations share one query_map.
        """
        if not self.read_trusted(plan):
            return False
        if plan.request >= 0 or not plan.origin:
            return True
        copied = await self._copied_now(plan.origin)
        if copied and self._owned is not None:
            self._owned.unshared(copied)
        return not copied

    async def _copied_now(self, ranges: tuple[tuple[int, int], ...]) -> set[int]:
        """The chunks of `ranges` the snapshot has a store copy of, asked now.

        Waits while another query_map of these is out, then asks for every
        check waiting at once. If asking fails, every chunk counts as copied
        (the caller reads through csnapd instead) and the asker sees the error.
        """
        check = _OriginCheck(ranges)
        self._checks.append(check)
        while check.copied is None:
            if self._checking:
                await self._checked.wait()
                continue
            self._checking = True
            batch = self._take_checks()
            try:
                asked = _union(r for c in batch for r in c.ranges)
                reply = await self._call(functools.partial(QueryMap, ranges=asked))
                assert isinstance(reply, MapReply)
                copied = _chunks(reply.ranges)
                for c in batch:
                    c.copied = _chunks(c.ranges) & copied
            finally:
                for c in batch:
                    if c.copied is None:
                        c.copied = _chunks(c.ranges)
                self._checking = False
                self._checked.set()
                self._checked = trio.Event()
        return check.copied

    def _take_checks(self) -> list[_OriginCheck]:
        """The waiting checks that fit one query_map (at least one)."""
        limit = min(self.max_chunks, MAX_RANGES)
        total = 0
        taken = 0
        for check in self._checks:
            size = sum(count for _, count in check.ranges)
            if taken and total + size > limit:
                break
            total += size
            taken += 1
        batch, self._checks = self._checks[:taken], self._checks[taken:]
        return batch

    async def _learn_owned(self, first: int, count: int) -> None:
        """Ask query_owned about the windows of these chunks the owned map lacks."""
        owned = self._owned
        if owned is None:
            return
        for index in owned.missing(first, count):
            asking = self._owned_asking.get(index)
            if asking is not None:
                await asking.wait()
                continue
            done = trio.Event()
            self._owned_asking[index] = done
            span = owned.span(index)
            try:
                reply = await self._call(functools.partial(QueryOwned, ranges=(span,)))
            except ServerError as exc:
                # Reads still work, through query_snapshot_read.
                log.info("query_owned refused (%s): reading without the owned map", exc)
                if self._owned is owned:
                    self._owned = None
                return
            finally:
                done.set()
                if self._owned_asking.get(index) is done:
                    del self._owned_asking[index]
            assert isinstance(reply, OwnedReply)
            if self._owned is owned:
                owned.learn(index, reply.segments, reply.origin)

    async def copied_ranges(self, ranges: Ranges) -> tuple[tuple[int, int], ...]:
        """Which of these chunks have store copies (query_map); takes no locks.

        A snapshot client learns the chunks its snapshot owns in the store;
        an origin client the chunks some live snapshot holds a copy of.
        """
        reply = await self._call(lambda rid: QueryMap(rid, tuple(ranges)))
        assert isinstance(reply, MapReply)
        return reply.ranges

    async def changes(
        self, base: int | None, start: int, count: int
    ) -> tuple[tuple[tuple[int, int], ...], int | None]:
        """Chunks from `start` that may differ between this view and `base` (query_changes).

        `base` is a snapshot's tag or None for the origin. Returns ascending
        (chunk, count) ranges and where to ask next (None: all of
        start..start+count-1 is answered). Takes no locks.
        """
        reply = await self._call(lambda rid: QueryChanges(rid, base, start, count))
        assert isinstance(reply, ChangesReply)
        return reply.ranges, reply.next

    async def _finish_read(self, request: int, origin: tuple[tuple[int, int], ...]) -> None:
        try:
            await self._call(lambda rid: FinishSnapshotRead(rid, origin))
        except (SnapshotDeletedError, ClientClosedError, ConnectionLostError):
            pass  # the server dropped our locks with the connection
        except ServerError as exc:
            log.warning("releasing read locks: %s", exc)
        finally:
            self._held.pop(request, None)


class _OwnedRead:
    """DataClient.owned_read's block: the plan, an open grant until the block ends."""

    __slots__ = ("_client", "_count", "_first", "_origin", "_plan")

    def __init__(self, client: DataClient, first: int, count: int, origin: bool):
        self._client = client
        self._first = first
        self._count = count
        self._origin = origin
        self._plan: ReadPlan | None = None

    def __enter__(self) -> ReadPlan | None:
        self._plan = self._client._open_owned_read(self._first, self._count, self._origin)
        return self._plan

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._plan is not None:
            self._client._close_grant(self._plan.request)


class _OriginWriteNow:
    """DataClient.origin_write_now's block: whether the grant is open, until it ends."""

    __slots__ = ("_client", "_ranges", "_request")

    def __init__(self, client: DataClient, ranges: Ranges):
        self._client = client
        self._ranges = ranges
        self._request: int | None = None

    def __enter__(self) -> bool:
        self._request = self._client._open_origin_write_now(self._ranges)
        return self._request is not None

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._request is not None:
            self._client._close_grant(self._request)


@dataclass
class _OriginCheck:
    """Origin ranges read without locks, and which of them csnapd says were copied."""

    ranges: tuple[tuple[int, int], ...]
    copied: set[int] | None = None


def _chunks(ranges: Sequence[tuple[int, int]]) -> set[int]:
    return {chunk for start, count in ranges for chunk in range(start, start + count)}


def _union(ranges: Iterable[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """Ascending ranges covering every chunk of `ranges` once (query_map refuses repeats)."""
    out: list[tuple[int, int]] = []
    for start, count in sorted(ranges):
        if out and start <= out[-1][0] + out[-1][1]:
            end = max(out[-1][0] + out[-1][1], start + count)
            out[-1] = (out[-1][0], end - out[-1][0])
        else:
            out.append((start, count))
    return tuple(out)


def _retryable(exc: ServerError) -> bool:
    return exc.error in (
        ErrorCode.TOO_MANY_CONNECTIONS,
        ErrorCode.SHUTTING_DOWN,
        ErrorCode.NOT_ACTIVE,
        ErrorCode.SERVER_FAILED,
        ErrorCode.FENCED,
    )


@asynccontextmanager
async def open_client(
    connect: Connector,
    *,
    snapshot: int | None = None,
    client_id: int | None = None,
    reconnect: bool = True,
    owned_map: bool = True,
) -> AsyncIterator[DataClient]:
    """A connected, identified client; closed when the block ends.

    Raises:
        ServerError: the server refused (an unknown snapshot, ...).
        OSError, ConnectionLostError: unreachable and `reconnect` is off.
    """
    client = DataClient(
        connect, snapshot=snapshot, client_id=client_id, reconnect=reconnect, owned_map=owned_map
    )
    with single_errors():
        async with trio.open_nursery() as nursery:
            await nursery.start(client.run)
            try:
                yield client
            finally:
                await client.aclose()
