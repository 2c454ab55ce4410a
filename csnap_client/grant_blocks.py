"""The blocks of the grants a data client opens without awaiting:
DataClient.owned_read and DataClient.origin_write_now.

Classes, not generators: the gateway's reader enters one per inline
request, and entering a generator-based context costs several times more.
"""

from __future__ import annotations

from types import TracebackType
from typing import TYPE_CHECKING

from csnap_client.reconnecting import Ranges, ReadPlan

if TYPE_CHECKING:
    from csnap_client.client import DataClient

__all__ = ["OwnedRead", "OriginWriteNow"]


class OwnedRead:
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


class OriginWriteNow:
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
