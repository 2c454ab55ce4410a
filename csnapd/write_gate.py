"""The write gate: when an origin write may be granted.

Owns the read-lock table, the parked origin writes, the post-restart grace
period and the store's registry of snapshot clients. An origin write is
granted only when none of its chunks is read-locked, no create barrier is
running, no revert is in progress and the grace period is over; until then
it is parked, and whenever a reason clears it is applied again (copying out for any snapshot created
meanwhile) and checked again (docs/protocol.md, "Origin write deferred by a
snapshot read"; rule: write gate). After a crash, the snapshot clients
the registry names re-declare their read locks before any origin write is
granted, or the grace period ends (docs/protocol.md, "Server restart": the
rule: locks survive a restart). A silent client keeps its read locks for at most
its lease (docs/protocol.md, "Liveness").
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from csnap_protocol import ErrorCode, WriteOk
from csnapd.batch import EngineRefusal, ParkedWrite, Peer, Sends
from csnapd.checks import RequestRefused
from csnapd.create_barrier import CreateBarrier
from csnapd.engine import Engine, EngineError, EngineFailedError
from csnapd.engine.locks import LockTable

__all__ = ["WriteGate"]

log = logging.getLogger("csnapd")


class WriteGate:
    """Read locks, parked origin writes, and the grace period after a restart."""

    def __init__(
        self,
        engine: Engine,
        barrier: CreateBarrier,
        refusal: EngineRefusal,
        *,
        lease_ms: int,
        max_read_locks: int,
        max_server_read_locks: int,
        room: Callable[[], tuple[frozenset[int], bool]] = lambda: (frozenset(), True),
    ):
        self._engine = engine
        #: The store-full policy's terms for a copy-out now: the tags it must
        #: spare and whether it may reclaim at all (csnapd.dispatch).
        self.room = room
        self._barrier = barrier
        self._refusal = refusal
        #: Told to clients in identified: how long the transport lets them be
        #: silent before it drops them and their read locks.
        self.lease_ms = lease_ms
        self.max_read_locks = max_read_locks
        self.max_server_read_locks = max_server_read_locks
        self.locks: LockTable[Peer] = LockTable()
        self.parked: list[ParkedWrite] = []
        registered, overflow = engine.registered_clients()
        #: Snapshot clients the registry named at start, not yet uploaded.
        self.awaiting: set[int] = set(registered)
        #: Origin writes wait for uploads (or the grace period) after a crash.
        self.grace = bool(registered) or overflow
        self._registered = frozenset(registered)
        if self.grace:
            log.info(
                "waiting for %d snapshot clients to re-declare their read locks%s",
                len(self.awaiting),
                " (registry overflowed: the whole grace period)" if overflow else "",
            )

    @property
    def closed(self) -> bool:
        """No origin write is granted now, whatever its chunks."""
        return self._barrier.running or self.grace or self._engine.revert_progress is not None

    def settle(self, writes: Iterable[ParkedWrite], replies: Sends) -> None:
        """After the commit: grant each write the gate lets through, park the rest."""
        for write in writes:
            if self.closed or self.locks.locked(write.ranges):
                self.parked.append(write)
            else:
                replies.append((write.peer, WriteOk(write.request, write.copied)))

    def reapply(self, replies: Sends) -> list[ParkedWrite]:
        """Parked writes whose reasons may have cleared: apply them again."""
        if self.closed:
            return []
        ready, self.parked = self.parked, []
        out = []
        for write in ready:
            try:
                spare, reclaim = self.room()
                result = self._engine.origin_write(write.ranges, spare=spare, reclaim=reclaim)
            except EngineFailedError:
                raise
            except EngineError as exc:
                replies.append((write.peer, self._refusal(write.request, exc)))
                continue
            copied = write.copied + result.copied
            out.append(ParkedWrite(write.peer, write.request, write.ranges, copied))
        return out

    def grace_expired(self) -> bool:
        """The grace period ran out; whether it was still on."""
        if not self.grace:
            return False
        log.warning(
            "grace period over; still missing lock uploads from %d clients", len(self.awaiting)
        )
        self.grace = False
        return True

    def uploaded(self, client_id: int | None) -> bool:
        """`client_id` re-declared all its read locks; whether the grace period ended."""
        if client_id not in self.awaiting:
            return False
        self.awaiting.discard(client_id)
        if self.awaiting or not self.grace:
            return False
        log.info("every snapshot client re-declared its read locks")
        self.grace = False
        return True

    def peer_gone(self, peer: Peer) -> int:
        """Drop `peer`'s read locks and parked writes; how many chunk locks it held."""
        self.parked = [w for w in self.parked if w.peer is not peer]
        return self.locks.release_all(peer)

    def check_lock_limits(self, peer: Peer, locks: int) -> None:
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

    def sync_registry(self, peers: Iterable[Peer]) -> None:
        """Keep the store's registry equal to the snapshot clients connected."""
        clients = frozenset(
            p.client_id
            for p in peers
            if p.identified and p.snapshot is not None and p.client_id is not None
        )
        # Clients the last server knew, still expected back, stay registered.
        clients |= self.awaiting
        if clients != self._registered:
            self._engine.set_registered_clients(clients)
            self._registered = clients
