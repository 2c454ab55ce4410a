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

import functools
import logging
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager

import trio
import trio.lowlevel

from csnap_client.grant_blocks import OwnedRead
from csnap_client.owned import OwnedMap
from csnap_client.reconnecting import (
    GRANT_ATTEMPTS,
    TRUST_FRACTION,
    ClientClosedError,
    LeaseExpiredError,
    OriginCheck,
    Ranges,
    ReadPlan,
    SnapshotDeletedError,
)
from csnap_client.session import ConnectionLostError, Connector, ServerError
from csnap_client.snapshot_writes import SnapshotWrites
from csnap_common import single_errors
from csnap_protocol import (
    MAX_RANGES,
    ChangesReply,
    FinishSnapshotRead,
    MapReply,
    OwnedReply,
    QueryChanges,
    QueryMap,
    QueryOwned,
    QuerySnapshotRead,
    QueryWrite,
    SnapshotReadOk,
    WriteOk,
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


class DataClient(SnapshotWrites):
    """A data-path connection to csnapd that survives server restarts.

    What it asks: origin and snapshot write grants, snapshot read plans
    (from the owned map or under read locks), the map and the changelist.
    """

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

    def knows_unique(self, ranges: Ranges) -> bool:
        """Whether every chunk of `ranges` is one this client may write
        without asking csnapd (origin_write would grant it from memory)."""
        return self._known_unique(ranges)

    def may_write_now(self, ranges: Ranges) -> bool:
        """Whether the origin chunks of `ranges` may be written at once, from
        memory: every one is known unique and the lease deadline has not
        passed. False: ask through origin_write.

        Only for a caller that writes them before its next await (the
        gateway's inline rewrites): nothing can come between this answer and
        the write (a barrier, a reconnection, a close), so no grant is opened
        that anyone would have to wait for.
        """
        if not self._known_unique(ranges) or not (
            trio.current_time() < self.lease_deadline(self._session)
        ):
            return False
        self.remembered_grants += 1
        return True

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

    def owned_read(self, first: int, count: int, *, origin: bool = False) -> OwnedRead:
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
        return OwnedRead(self, first, count, origin)

    def owned_store_chunk(self, chunk: int) -> int:
        """The store chunk snapshot chunk `chunk` is owned alone at, from the
        owned map, or -1: what owned_read(chunk, 1) would place, for a caller
        that reads it without awaiting and then asks owned_still_trusted().

        Nothing else runs between the two calls, so no grant needs opening:
        no deletion or new session can come in between.
        """
        owned, session = self._owned, self._session
        if owned is None or not trio.current_time() < self.lease_deadline(session):
            return -1
        store = owned.store_chunk(chunk)
        if store < 0:
            return -1
        self.owned_reads += 1
        if owned.ahead:
            self._read_ahead(owned, chunk, 1)
        return store

    def owned_window(self) -> tuple[OwnedMap, float] | None:
        """owned_store_chunk for a run of reads made without an await: the
        owned map and the lease deadline on `time.perf_counter()`'s clock,
        which the caller compares with the clock after each read. None:
        the map may not be used now. For each chunk it places, the caller
        calls owned_placed(map, chunk) when the map's `ahead` is not empty,
        and counts its reads with owned_read_now; all before its next await.
        """
        owned = self._owned
        if owned is None:
            return None
        deadline = self.lease_window()
        if not time.perf_counter() < deadline:
            return None
        return owned, deadline

    def owned_placed(self, owned: OwnedMap, chunk: int) -> None:
        """A read of `chunk` placed by owned_window's map (read-ahead's cue)."""
        self._read_ahead(owned, chunk, 1)

    def owned_read_now(self, reads: int) -> None:
        """`reads` reads were placed by owned_window's map."""
        self.owned_reads += reads

    def knows_owned(self, chunk: int) -> bool:
        """Whether the owned map places snapshot chunk `chunk` in the store
        (the snapshot owned it alone when last heard): a hint, not a plan."""
        owned = self._owned
        return owned is not None and owned.store_chunk(chunk) >= 0

    def owned_still_trusted(self) -> bool:
        """After a read placed by owned_store_chunk (no await since): whether it
        came within the lease deadline (read_trusted for it)."""
        return trio.current_time() < self.lease_deadline(self._session)

    def open_owned_plan(self, first: int, count: int) -> ReadPlan | None:
        """owned_read(first, count, origin=True) without a block: the plan is an
        open grant until close_plan(plan), which the caller must call (after
        confirm_reads, for one with origin ranges)."""
        return self._open_owned_read(first, count, True)

    def close_plan(self, plan: ReadPlan) -> None:
        """End the grant of a plan from open_owned_plan."""
        self._close_grant(plan.request)

    def _open_owned_read(self, first: int, count: int, origin: bool) -> ReadPlan | None:
        owned, session = self._owned, self._session
        if owned is None or session is None or self._deleted or self._closing:
            return None
        if not trio.current_time() < self.lease_deadline(session):
            return None
        found = owned.lookup(first, count, origin=origin)
        if found is None:
            return None
        if owned.ahead:
            self._read_ahead(owned, first, count)
        request = -next(self._local_grants)
        self._grants.add(request)
        self._answered_on[request] = session
        self.owned_reads += 1
        return ReadPlan(*found, request)

    async def confirm_read(self, plan: ReadPlan) -> bool:
        """Whether what was just read under `plan` is the snapshot's; if not, read again.

        read_trusted(), and for a local plan's origin ranges (read without
        read locks) csnapd's word, asked after the read, that the snapshot
        still shares every one of those chunks with the origin: no origin
        write to them can have been granted before (rule: verified origin
        reads). Concurrent confirmations share one query_map.
        """
        return (await self.confirm_reads([plan]))[0]

    async def confirm_reads(self, plans: Sequence[ReadPlan]) -> list[bool]:
        """confirm_read of each plan, their origin checks sharing query_maps.

        For a caller holding several reads done at once: one query_map (or
        as few as csnapd's limits allow) confirms them all.
        """
        # Each plan's answer without csnapd (a bool), or the check that asks it.
        checks: list[OriginCheck | bool] = []
        for plan in plans:
            if not self.read_trusted(plan):
                checks.append(False)
            elif plan.request >= 0 or not plan.origin:
                checks.append(True)
            else:
                check = OriginCheck(plan.origin)
                self._checks.append(check)
                checks.append(check)
        answers: list[bool] = []
        try:
            for asked in checks:
                if isinstance(asked, bool):
                    answers.append(asked)
                    continue
                copied = await self._checked_now(asked)
                if copied and self._owned is not None:
                    self._owned.unshared(copied)
                answers.append(not copied)
        finally:
            # Asking failed or was cancelled: checks of ours still queued
            # must not ride on somebody else's query_map.
            if len(answers) < len(checks):
                mine = {id(c) for c in checks if isinstance(c, OriginCheck)}
                self._checks = [c for c in self._checks if id(c) not in mine]
        return answers

    async def _checked_now(self, check: OriginCheck) -> set[int]:
        """The chunks of `check` (queued in _checks) the snapshot has a store copy of,
        asked after the check was queued.

        Waits while another query_map of these is out, then asks for every
        check waiting at once. If asking fails, every chunk counts as copied
        (the caller reads through csnapd instead) and the asker sees the error.
        """
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

    def _take_checks(self) -> list[OriginCheck]:
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
        """Ask query_owned about the windows of these chunks the owned map lacks.

        A window a read needed is followed by the next one, asked for in the
        background, when the reader came forward from the window before it
        (or starts at the first): see _read_ahead.
        """
        owned = self._owned
        if owned is None:
            return
        for index in owned.missing(first, count):
            await self._learn_window(owned, index, ahead=False)
            if self._owned is not owned:
                return  # refused, or the session or the snapshot ended
            if index == 0 or owned.knows(index - 1):
                self._ask_ahead(owned, index + 1)

    def _read_ahead(self, owned: OwnedMap, first: int, count: int) -> None:
        """A read from the owned map of chunks first..first+count-1: the first
        read of a window learnt ahead asks for the window after it."""
        for index in owned.first_use(first, count):
            self._ask_ahead(owned, index + 1)

    def _ask_ahead(self, owned: OwnedMap, index: int) -> None:
        """Learn window `index` in the background if it exists and nobody asks yet."""
        if index >= owned.window_count or owned.knows(index) or index in self._owned_asking:
            return
        if self._owned is not owned or self._closing or self._deleted:
            return
        self._nursery.start_soon(self._learn_ahead, owned, index)

    async def _learn_ahead(self, owned: OwnedMap, index: int) -> None:
        # Nothing waits for it: a read that needs the window before it is
        # known waits for this query (_owned_asking) or asks itself.
        try:
            await self._learn_window(owned, index, ahead=True)
        except (ConnectionLostError, ClientClosedError, SnapshotDeletedError) as exc:
            log.debug("owned map window %d not learnt ahead: %s", index, exc)

    async def _learn_window(self, owned: OwnedMap, index: int, *, ahead: bool) -> None:
        """Ask query_owned about window `index` of `owned` (once at a time)."""
        asking = self._owned_asking.get(index)
        if asking is not None:
            await asking.wait()
            return
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
            owned.learn(index, reply.segments, reply.origin, ahead=ahead)

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
