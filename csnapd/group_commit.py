"""When the engine task waits a moment for more requests before a batch.

Owns the gathering policy of group commit. The engine task takes whatever is
queued as one batch; while a commit's sync is in flight, the next batch
accumulates. With every client keeping one request in flight, that splits
the clients into groups that take turns, each paying a sync of its own. So
when the clients of the last commits are not all back, the task waits for
them (`Gathering.more`), never longer than what the quickest recent commit has
been costing, and never when every client of those commits is already in
the batch: a lone client never waits, and a waiting batch costs at most about
one sync more latency for about one sync less per batch. A batch that
commits nothing forgets the clients to wait for, until the next commit.
"""

from __future__ import annotations

from collections import deque

import trio

from csnapd.batch import Item, Peer, Received

__all__ = ["Gathering", "LINGER_FRACTION", "MAX_LINGER"]

#: Longest wait, as a share of the recent commits' duration.
LINGER_FRACTION = 1.0
#: Longest wait in seconds, whatever a commit costs.
MAX_LINGER = 0.010
#: Commits whose clients count as the ones to wait for.
_REMEMBERED = 2


class Gathering:
    """Which clients the recent commits answered, and how long they took."""

    def __init__(self) -> None:
        self._commits: deque[tuple[frozenset[Peer], float]] = deque(maxlen=_REMEMBERED)

    def committed(self, items: list[Item], seconds: float) -> None:
        """A batch of `items` committed (its sync included) in `seconds`."""
        peers = frozenset(item.peer for item in items if isinstance(item, Received))
        if peers:
            self._commits.append((peers, seconds))

    def nothing_committed(self) -> None:
        """A batch committed nothing (lookups, already-unique writes): the
        clients of earlier commits are no longer the ones to wait for. (They
        may have left, and a batch that commits nothing gains nothing by
        waiting: without this, every lookup after a commit would wait for a
        client that may never come back.)"""
        self._commits.clear()

    def linger(self, batch: list[Item]) -> tuple[int, float]:
        """How many more clients to wait for, and for at most how long."""
        missing, seconds = self._missing(batch)
        return len(missing), seconds

    def _missing(self, batch: list[Item]) -> tuple[set[Peer], float]:
        if not self._commits:
            return set(), 0.0
        expected = frozenset().union(*(peers for peers, _ in self._commits))
        present = {item.peer for item in batch if isinstance(item, Received)}
        missing = set(expected - present)
        if not present or not missing:
            return set(), 0.0
        cost = min(seconds for _, seconds in self._commits)
        return missing, min(MAX_LINGER, cost * LINGER_FRACTION)

    async def more(
        self, batch: list[Item], receive: trio.MemoryReceiveChannel[Item], most: int
    ) -> None:
        """Add to `batch` what arrives while clients of the recent commits are
        still missing from it, up to `most` items, within the linger time."""
        missing, seconds = self._missing(batch)
        if not missing:
            return
        with trio.move_on_after(seconds):
            while len(batch) < most:
                try:
                    item = await receive.receive()
                except trio.EndOfChannel:
                    return
                batch.append(item)
                if isinstance(item, Received):
                    missing.discard(item.peer)
                    if not missing:
                        return
