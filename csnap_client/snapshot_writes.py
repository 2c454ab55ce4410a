"""A snapshot client's writes: store chunks granted to write into
(query_write), or small writes sent with their bytes (write_snapshot_data),
which csnapd writes into the copies itself when each chunk needs one
(docs/protocol.md, "Snapshot writes with their data").
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from csnap_client.reconnecting import (
    GRANT_ATTEMPTS,
    LeaseExpiredError,
    Ranges,
    ReconnectingClient,
)
from csnap_protocol import (
    MAX_WRITE_DATA,
    QueryWrite,
    Request,
    SnapshotDataWritten,
    SnapshotWriteOk,
    WriteSnapshotData,
    touched_chunks,
)

__all__ = ["SnapshotWrites"]

#: Most bytes a write_snapshot_data frame takes beyond its data: the map's
#: keys, the id, the offset and the headers, at their widest.
DATA_WRITE_OVERHEAD = 80


class SnapshotWrites(ReconnectingClient):
    """The write requests of a client identified to a snapshot."""

    @asynccontextmanager
    async def snapshot_write(
        self, ranges: Ranges
    ) -> AsyncIterator[tuple[tuple[int, int, int], ...]]:
        """Where to write snapshot chunks: (chunk, count, store chunk) segments."""
        reply = await self._snapshot_grant(lambda rid: QueryWrite(rid, tuple(ranges)))
        assert isinstance(reply, SnapshotWriteOk)
        try:
            yield reply.segments
        finally:
            self._close_grant(reply.id)

    def data_write_fits(self, length: int) -> bool:
        """Whether `length` bytes go to csnapd in one write_snapshot_data now:
        at most MAX_WRITE_DATA, in a frame csnapd takes."""
        session = self._session
        return (
            0 < length <= MAX_WRITE_DATA
            and session is not None
            and length + DATA_WRITE_OVERHEAD <= session.codec.peer_max_frame
        )

    @asynccontextmanager
    async def snapshot_write_data(
        self, offset: int, data: bytes
    ) -> AsyncIterator[tuple[tuple[int, int, int], ...] | None]:
        """Write `data` at byte `offset` of the snapshot through csnapd.

        Inside the block: None when csnapd wrote the bytes into new copies
        of the chunks (durable already: nothing is left to do); else the
        (chunk, count, store chunk) segments to write the bytes into, a grant
        open inside the block as in snapshot_write(). Bytes that would not
        fit one message go the snapshot_write() way.
        """
        if not self.data_write_fits(len(data)):
            ranges = [touched_chunks(offset, len(data), self.chunk_size)]
            async with self.snapshot_write(ranges) as segments:
                yield segments
            return
        reply = await self._snapshot_grant(lambda rid: WriteSnapshotData(rid, offset, data))
        if isinstance(reply, SnapshotDataWritten):
            yield None
            return
        try:
            yield reply.segments
        finally:
            self._close_grant(reply.id)

    async def _snapshot_grant(
        self, make: Callable[[int], Request]
    ) -> SnapshotWriteOk | SnapshotDataWritten:
        """The reply to a snapshot write request: snapshot_write_ok opens a
        grant, asked again while it comes past the lease deadline (the
        snapshot may have been deleted and its store chunks reused
        meanwhile; asked again, csnapd hands out the chunks it now finds
        owned). snapshot_data_written opens none: nothing is left to write."""
        for _ in range(GRANT_ATTEMPTS):
            reply = await self._call(make)
            assert isinstance(reply, SnapshotWriteOk | SnapshotDataWritten)
            if isinstance(reply, SnapshotDataWritten) or self._grant_in_lease(reply.id):
                return reply
            self._close_grant(reply.id)
        raise LeaseExpiredError(
            f"{GRANT_ATTEMPTS} snapshot write grants in a row came past the lease deadline"
        )
