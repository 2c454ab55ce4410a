"""The administrative client: snapshots and server information, over one
admin-role connection (no reconnecting: the caller retries).
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict
from typing import Any

import trio

from csnap_client.session import Connector, Session, open_session
from csnap_common import single_errors
from csnap_protocol import (
    ChangeUseCount,
    CreateSnapshot,
    DeleteSnapshot,
    GetServerInfo,
    GetStatus,
    ListSnapshots,
    Message,
    Request,
    Resize,
    Resized,
    RevertReply,
    RevertSnapshot,
    Role,
    ServerInfoReply,
    SetPriority,
    Shutdown,
    SnapshotList,
    SnapshotReply,
    StatusReply,
)

__all__ = ["AdminClient", "open_admin"]


class AdminClient:
    """Snapshot administration; each method raises ServerError on refusal."""

    def __init__(self, session: Session):
        self._session = session
        self._ids = itertools.count(1)

    async def _call(self, message: Request) -> Message:
        return await self._session.request(message)

    async def create_snapshot(self, tag: int, priority: int = 0) -> dict[str, Any]:
        reply = await self._call(CreateSnapshot(next(self._ids), tag, priority))
        assert isinstance(reply, SnapshotReply)
        return asdict(reply.snapshot)

    async def delete_snapshot(self, tag: int) -> dict[str, Any]:
        reply = await self._call(DeleteSnapshot(next(self._ids), tag))
        assert isinstance(reply, SnapshotReply)
        return asdict(reply.snapshot)

    async def revert_snapshot(self, tag: int) -> dict[str, Any]:
        """Start reverting the origin to snapshot `tag`; get_status shows how far it is."""
        reply = await self._call(RevertSnapshot(next(self._ids), tag))
        assert isinstance(reply, RevertReply)
        return {"tag": reply.tag, "total": reply.total}

    async def list_snapshots(self) -> list[dict[str, Any]]:
        reply = await self._call(ListSnapshots(next(self._ids)))
        assert isinstance(reply, SnapshotList)
        return [asdict(s) for s in reply.snapshots]

    async def status(self) -> StatusReply:
        reply = await self._call(GetStatus(next(self._ids)))
        assert isinstance(reply, StatusReply)
        return reply

    async def set_priority(self, tag: int, priority: int) -> dict[str, Any]:
        reply = await self._call(SetPriority(next(self._ids), tag, priority))
        assert isinstance(reply, SnapshotReply)
        return asdict(reply.snapshot)

    async def change_use_count(self, tag: int, delta: int) -> dict[str, Any]:
        reply = await self._call(ChangeUseCount(next(self._ids), tag, delta))
        assert isinstance(reply, SnapshotReply)
        return asdict(reply.snapshot)

    async def server_info(self) -> dict[str, Any]:
        reply = await self._call(GetServerInfo(next(self._ids)))
        assert isinstance(reply, ServerInfoReply)
        return asdict(reply.server)

    async def resize(
        self, *, origin_bytes: int | None, store_bytes: int | None, grow_files: bool = False
    ) -> dict[str, Any]:
        """Grow (or safely shrink) the origin and/or the store; sizes before and after."""
        reply = await self._call(Resize(next(self._ids), origin_bytes, store_bytes, grow_files))
        assert isinstance(reply, Resized)
        result = asdict(reply)
        del result["id"]
        result["grown_files"] = list(reply.grown_files)
        return result

    async def shutdown(self) -> None:
        await self._call(Shutdown(next(self._ids)))


@asynccontextmanager
async def open_admin(connect: Connector) -> AsyncIterator[AdminClient]:
    """An admin connection, closed when the block ends.

    Raises:
        OSError: the server (or agent) cannot be reached.
        ServerError: it refused the connection.
    """
    with single_errors():
        async with trio.open_nursery() as nursery:
            session = await open_session(nursery, connect, Role.ADMIN)
            try:
                yield AdminClient(session)
            finally:
                await trio.aclose_forcefully(session.stream)
