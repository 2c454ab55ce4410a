"""The data-path client's connection to csnapd, kept across server restarts.

ReconnectingClient owns the session and what outlives it: reconnecting and
identifying again (re-declaring the read locks it holds), refusing a server
with an older fencing token, keepalives and the lease deadline until which
what a session answered is trusted, the barrier answer once the grants it
names are closed, the grants and read locks the client holds, and sending a
request again after every reconnect until it is answered (_call). DataClient
(csnap_client.client) builds the data-path requests on it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import trio

from csnap_client.owned import WINDOW_CHUNKS, OwnedMap
from csnap_client.session import (
    ConnectionLostError,
    Connector,
    ServerError,
    Session,
    open_session,
)
from csnap_protocol import (
    MAX_RANGES,
    Barrier,
    BarrierDone,
    ErrorCode,
    FinishUploadLock,
    Identified,
    Identify,
    Keepalive,
    Message,
    Request,
    Role,
    SnapshotDataWritten,
    SnapshotDeleted,
    SnapshotReadOk,
    SnapshotWriteOk,
    UploadLock,
    WriteOk,
    message_id,
)

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


class LeaseExpiredError(Exception):
    """Every grant the server gave arrived past this client's lease deadline."""


class SnapshotDeletedError(Exception):
    """The snapshot this client serves was deleted (or no longer exists)."""


class ClientClosedError(Exception):
    """The client was closed."""


@dataclass(frozen=True)
class ReadPlan:
    """Where to read: `store` as (chunk, count, store chunk), `origin` as (chunk, count).

    `request`: the snapshot read's id, by which read_trusted() finds its locks.
    """

    store: tuple[tuple[int, int, int], ...]
    origin: tuple[tuple[int, int], ...]
    request: int = 0


class ReconnectingClient:
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
        self._checks: list[OriginCheck] = []
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
                if self._closing:
                    # Closed while this session was being set up: aclose()
                    # found no session to end, so end this one here.
                    await session.abandon()
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
            # The origin may have grown meanwhile (csnap resize); a snapshot keeps its size.
            or identified.origin_chunks < self.info.origin_chunks
            or (self.snapshot is not None and identified.origin_chunks != self.info.origin_chunks)
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

    def rewrite_window(self) -> tuple[bytearray, float] | None:
        """may_write_now for a run of writes made without an await: the
        bitmap of origin chunks known unique (bit `c % 8` of byte `c // 8`),
        and the lease deadline as a `time.perf_counter()` value, which the
        caller compares with the clock before each write. None: nothing
        may be written from memory now. Both hold only until the caller's
        next await (a barrier or a new session changes them); the caller
        counts what it wrote with wrote_now.
        """
        bits = self._unique_now()
        if bits is None:
            return None
        deadline = self.lease_window()
        if not time.perf_counter() < deadline:
            return None
        return bits, deadline

    def lease_window(self) -> float:
        """The lease deadline of what the current session answered, as a
        `time.perf_counter()` value, for a caller that checks it without
        an await in between (-inf: nothing it answered is trusted)."""
        deadline = self.lease_deadline(self._session)
        if deadline in (math.inf, -math.inf):
            return deadline
        # trio's clock is perf_counter() plus an offset: the same instant
        # on the clock the caller can read without trio's machinery.
        return deadline - trio.current_time() + time.perf_counter()

    def wrote_now(self, writes: int) -> None:
        """`writes` writes went ahead from rewrite_window's answer."""
        self.remembered_grants += writes

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
        if isinstance(message, SnapshotWriteOk | SnapshotDataWritten) and self._owned is not None:
            # Every chunk a snapshot write is given (or csnapd wrote for it)
            # is the snapshot's alone.
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

    def grow_origin(self, origin_chunks: int) -> None:
        """The origin grew to `origin_chunks` (csnap resize): serve its new chunks too.

        Only an origin client grows, and never shrinks; csnapd checks every
        range against its own size whatever this client believes.
        """
        info = self.info
        if info is None or self.snapshot is not None or origin_chunks <= info.origin_chunks:
            return
        self.info = dataclasses.replace(info, origin_chunks=origin_chunks)
        if self._unique is not None:
            self._unique.extend(bytes((origin_chunks + 7) // 8 - len(self._unique)))

    def _forget_unique(self) -> None:
        if self._unique is not None:
            self._unique = bytearray(len(self._unique))

    def _known_unique(self, ranges: Ranges) -> bool:
        """Whether every chunk of `ranges` is known unique (a write may go ahead)."""
        bits = self._unique_now()
        if bits is None:
            return False
        for start, count in ranges:
            if start < 0 or count < 1 or start + count > len(bits) * 8:
                return False
            for chunk in range(start, start + count):
                if not bits[chunk >> 3] & (1 << (chunk & 7)):
                    return False
        return True

    def _unique_now(self) -> bytearray | None:
        """The bitmap of chunks known unique, while a session that answered
        it is open; else None (nothing is known unique)."""
        session = self._session
        if session is None or session.closed.is_set():
            return None
        return self._unique

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

    async def wait_ended(self) -> None:
        """Return once this client will serve nothing more: its snapshot was
        deleted (or squashed away across a restart), it was closed, or its
        connection was lost with `reconnect` off."""
        while not (self._deleted or self._closing or self._lost):
            await self._changed.wait()

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


@dataclass
class OriginCheck:
    """Origin ranges read without locks, and which of them csnapd says were copied."""

    ranges: tuple[tuple[int, int], ...]
    copied: set[int] | None = None


def _retryable(exc: ServerError) -> bool:
    return exc.error in (
        ErrorCode.TOO_MANY_CONNECTIONS,
        ErrorCode.SHUTTING_DOWN,
        ErrorCode.NOT_ACTIVE,
        ErrorCode.SERVER_FAILED,
        ErrorCode.FENCED,
    )
