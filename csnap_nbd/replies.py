"""One NBD connection's replies on their way out, and the budget they hold.

Replies go through one writer per connection that sends everything queued
since its last send in one system call: at a queue depth of 16, most
replies share a send. The connection's reader sends the replies it queued
itself before it next waits (`ReplyWriter.send_now`), without waking the
writer; what the kernel does not take, the writer sends next, in order.

The budget is the bytes of READ/WRITE data a connection holds, from the
moment a request is read until its reply is sent: only the reader takes
from it, and the writer gives back once a reply has left.
"""

from __future__ import annotations

import trio
import trio.lowlevel

from csnap_nbd.buffers import BUFFERS
from csnap_nbd.connection import Connection

__all__ = ["Budget", "ReplyWriter"]

#: A queued reply: its header, its data (a READ's), and the budget it holds.
_Queued = tuple[bytes, bytes | bytearray | memoryview, int]


class Budget:
    """Bytes of request data a connection holds; only its reader acquires."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self._lot = trio.lowlevel.ParkingLot()

    def acquire_now(self, size: int) -> bool:
        """Take `size` if it fits now (never waits)."""
        # A request alone may use the whole budget, whatever its size.
        if self.used and self.used + size > self.limit:
            return False
        self.used += size
        return True

    async def acquire(self, size: int) -> None:
        while not self.acquire_now(size):
            await self._lot.park()

    def release(self, size: int) -> None:
        if size:
            self.used -= size
            self._lot.unpark_all()


class ReplyWriter:
    """Sends queued replies in batches; releases their budget once sent."""

    def __init__(self, conn: Connection, budget: Budget):
        self.conn = conn
        self.budget = budget
        self._queue: list[_Queued] = []
        self._wake = trio.Event()
        self._closing = False
        #: The connection's reader task, once it runs.
        self.reader: trio.lowlevel.Task | None = None
        #: What send_now left unsent, and the batch it belongs to.
        self._rest: list[memoryview] = []
        self._rest_batch: list[_Queued] = []
        #: Set when a send failed: the client is gone.
        self.broken = trio.Event()

    @property
    def queued(self) -> list[_Queued]:
        """The replies queued and not yet taken for a send: the reader may
        append to it (csnap_nbd.runs), as put() would from the reader, until
        its next await."""
        return self._queue

    def put(self, header: bytes, data: bytes | bytearray | memoryview = b"", held: int = 0) -> None:
        """Queue one reply (never waits); `held` budget is released once it is sent."""
        if self.broken.is_set():
            self.budget.release(held)
            return
        self._queue.append((header, data, held))
        # The reader sends its own replies before it next waits (send_now).
        if trio.lowlevel.current_task() is not self.reader:
            self._wake.set()

    def close(self) -> None:
        """Send what is queued, then stop."""
        self._closing = True
        self._wake.set()

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            rest, self._rest = self._rest, []
            batch, self._queue = self._queue, []
            if (rest or batch) and not self.broken.is_set():
                try:
                    # What the reader's send left unsent goes first.
                    await self.conn.send_parts([*rest, *self._parts(batch)])
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    self.broken.set()
            self._done(self._rest_batch)
            self._rest_batch = []
            self._done(batch)
            if self._closing and not self._queue:
                return

    def send_now(self) -> None:
        """Send what is queued from this task, without waiting, if the stream
        is free: the reader does, before it waits for more requests, so that
        the replies to those it has just answered leave without a pass of
        the writer task. What the kernel does not take, the writer sends.

        The reader's own replies wake nobody when queued: it calls this
        before every wait."""
        if not self._queue:
            return
        if self._rest or self.broken.is_set() or not self.conn.sends_now:
            self._wake.set()
            return
        batch, self._queue = self._queue, []
        try:
            rest = self.conn.send_parts_now(self._parts(batch))
        except trio.BrokenResourceError:
            self.broken.set()
            rest = []
        if rest:
            self._rest, self._rest_batch = rest, batch
            self._wake.set()
        else:
            self._done(batch)

    def _done(self, batch: list[_Queued]) -> None:
        """Release what a batch, now sent (or dropped), held."""
        for _, data, _ in batch:
            # A READ's data: sent, and no longer referenced elsewhere.
            if type(data) is bytearray:
                BUFFERS.give(data)
        self.budget.release(sum(held for _, _, held in batch))

    @staticmethod
    def _parts(
        batch: list[_Queued],
    ) -> list[bytes | bytearray | memoryview]:
        parts: list[bytes | bytearray | memoryview] = []
        for header, data, _ in batch:
            parts.append(header)
            if data:
                parts.append(data)
        return parts
