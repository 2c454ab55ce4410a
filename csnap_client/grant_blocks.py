"""The block of the grant a data client opens without awaiting:
DataClient.owned_read.

A class, not a generator: the gateway's reader enters one per inline
request, and entering a generator-based context costs several times more.
"""

from __future__ import annotations

from types import TracebackType
from typing import TYPE_CHECKING

from csnap_client.reconnecting import ReadPlan

if TYPE_CHECKING:
    from csnap_client.client import DataClient

__all__ = ["OwnedRead"]


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
