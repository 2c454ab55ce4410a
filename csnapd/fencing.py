"""Self-fencing: a server elected through a cluster coordinator serves only
while its lease is known to be held, and never under an outdated token.

The agent that won the election hands the server its fencing token and a
deadline (CLOCK_MONOTONIC on this node) with `start_server`, and moves the
deadline with every `renew_lease`. The server stops writing and serving when
the deadline passes without renewal, or when the store's superblock on disk
carries a newer token than its own (another server was elected and journaled
its token). The agent sets each deadline well before etcd can expire the
lease, so this server has stopped before anyone else can be elected
(docs/operations.md, "Running a cluster").
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

import trio

__all__ = ["Fence", "DISK_CHECK_INTERVAL"]

log = logging.getLogger("csnapd.fence")

#: Seconds between two looks at the token in the store's superblock.
DISK_CHECK_INTERVAL = 0.5


class Fence:
    """The token a server serves under and the deadline of its lease."""

    def __init__(self, token: int, until_ns: int):
        self.token = token
        self.until_ns = until_ns
        #: Set once the server must no longer write or serve.
        self.fenced = trio.Event()
        self.reason = ""
        self._moved = trio.Event()

    def renew(self, token: int, until_ns: int) -> bool:
        """A renewal from the agent; False when this server is already fenced."""
        if self.fenced.is_set() or token != self.token or not self.may_write():
            return False
        if until_ns > self.until_ns:
            self.until_ns = until_ns
            self._moved.set()
            self._moved = trio.Event()
        return True

    def may_write(self) -> bool:
        """Whether the lease still holds now; fences the server once it does not.

        Asked before every batch, so a server that was stopped (SIGSTOP, a
        long pause) and resumes past its deadline writes nothing.
        """
        if self.fenced.is_set():
            return False
        late_ns = time.monotonic_ns() - self.until_ns
        if late_ns >= 0:
            self.fence(f"the lease was not renewed in time ({late_ns / 1e9:.3f}s past it)")
            return False
        return True

    def fence(self, reason: str) -> None:
        """Stop: no more writes, no more replies (idempotent)."""
        if self.fenced.is_set():
            return
        self.reason = reason
        log.critical(
            "fenced: %s; this server stops writing and serving",
            reason,
            extra={"event": "server.fenced", "token": self.token},
        )
        self.fenced.set()

    async def watch(self, token_on_disk: Callable[[], Awaitable[int | None]]) -> None:
        """Fence at the deadline or on a newer token on disk; returns once fenced."""
        next_look = 0.0
        while self.may_write():
            if trio.current_time() >= next_look:
                on_disk = await token_on_disk()
                if on_disk is not None and on_disk > self.token:
                    self.fence(
                        f"the store carries fencing token {on_disk}, newer than {self.token}"
                    )
                    return
                next_look = trio.current_time() + DISK_CHECK_INTERVAL
            remaining = (self.until_ns - time.monotonic_ns()) / 1e9
            with trio.move_on_after(max(0.0, min(remaining, next_look - trio.current_time()))):
                await self._moved.wait()
