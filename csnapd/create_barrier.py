"""The create barrier: a snapshot is a point in time.

Owns the barrier in progress (its number, the origin clients it waits for)
and the creates waiting on it. A create first has every identified origin
client finish the writes it was granted (barrier, barrier_done); only then
is the snapshot created, so that it holds every write acknowledged before
the create and none after it (docs/protocol.md, "Snapshot create with the
barrier"; rule: point-in-time create). A revert starts behind the same
barrier (docs/protocol.md, "Reverting the origin"): no write granted before
it is still landing on the origin while it copies.
"""

from __future__ import annotations

import logging
from collections.abc import Set

from csnap_protocol import (
    Barrier,
    CreateSnapshot,
    ErrorCode,
    Message,
    RevertReply,
    RevertSnapshot,
    SnapshotReply,
)
from csnapd.batch import Batch, EngineRefusal, Peer, Sends, error_reply
from csnapd.engine import Engine, EngineError, EngineFailedError
from csnapd.reporting import snapshot_record

__all__ = ["CreateBarrier"]

log = logging.getLogger("csnapd")


class CreateBarrier:
    """The barrier in progress, if any, and the creates waiting for it."""

    def __init__(self, engine: Engine, refusal: EngineRefusal):
        self._engine = engine
        self._refusal = refusal
        #: The barrier in progress; 0: none.
        self.number = 0
        self._started = 0
        self._waiting: set[Peer] = set()
        self._creates: list[tuple[Peer, CreateSnapshot | RevertSnapshot]] = []

    @property
    def running(self) -> bool:
        """A barrier is in progress: origin writes wait (rule: write gate)."""
        return self.number != 0

    def create(
        self,
        peer: Peer,
        message: CreateSnapshot | RevertSnapshot,
        peers: Set[Peer],
        batch: Batch,
    ) -> bool:
        """Start (or join) a barrier for `message`; whether writes may now be granted."""
        self._creates.append((peer, message))
        if self.running:
            return False  # joins the barrier already running
        origin_peers = {p for p in peers if p.identified and p.snapshot is None}
        if not origin_peers:
            self._run_creates(batch.replies)
            return False
        self._started += 1
        self.number = self._started
        self._waiting = origin_peers
        batch.out.barrier_started = self.number
        log.info("barrier %d: waiting for %d origin clients", self.number, len(origin_peers))
        batch.notices.extend((p, Barrier(self.number)) for p in origin_peers)
        return False

    def done(self, peer: Peer, barrier: int, replies: Sends) -> bool:
        """`peer` finished barrier `barrier`; whether the barrier ended."""
        if not self.running or barrier != self.number:
            # A late answer to a barrier that expired, or an answer to none:
            # it ends nothing (and so sets no parked write going again).
            return False
        self._waiting.discard(peer)
        if self._waiting:
            return False
        self._run_creates(replies)
        self._end()
        return True

    def peer_gone(self, peer: Peer, replies: Sends) -> bool:
        """`peer` closed: it owes the barrier nothing more; whether the barrier ended."""
        if peer not in self._waiting:
            return False
        return self.done(peer, self.number, replies)

    def expired(self, barrier: int, replies: Sends) -> bool:
        """Barrier `barrier` ran out of time: its creates fail; whether it ended."""
        if barrier != self.number or not self._waiting:
            return False
        names = ", ".join(sorted(str(p) for p in self._waiting))
        log.warning(
            "barrier %d expired waiting for %s",
            barrier,
            names,
            extra={"event": "barrier.expired", "barrier": barrier},
        )
        for peer, request in self._creates:
            undone = (
                f"the origin was not reverted to snapshot {request.tag}"
                if isinstance(request, RevertSnapshot)
                else f"snapshot {request.tag} was not created"
            )
            refusal = error_reply(
                request.id,
                ErrorCode.BARRIER_TIMEOUT,
                f"origin clients did not finish their granted writes in time: {names}; {undone}",
            )
            replies.append((peer, refusal))
        self._end()
        return True

    def _run_creates(self, replies: Sends) -> None:
        for peer, message in self._creates:
            try:
                if isinstance(message, RevertSnapshot):
                    replies.append((peer, self._start_revert(peer, message)))
                    continue
                info = self._engine.create_snapshot(message.tag, message.priority)
            except EngineFailedError:
                raise
            except EngineError as exc:
                replies.append((peer, self._refusal(message.id, exc)))
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
            replies.append((peer, SnapshotReply(message.id, snapshot_record(info))))
        self._creates = []

    def _start_revert(self, peer: Peer, message: RevertSnapshot) -> Message:
        progress = self._engine.start_revert(message.tag)
        log.info(
            "reverting the origin to snapshot %d: %d chunks to restore",
            progress.tag,
            progress.total,
            extra={
                "event": "revert.started",
                "snapshot": progress.tag,
                "chunks": progress.total,
                "connection": peer.number,
                "request": message.id,
            },
        )
        return RevertReply(message.id, progress.tag, progress.total)

    def _end(self) -> None:
        self.number = 0
        self._waiting = set()
        self._creates = []
