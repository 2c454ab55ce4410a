# Read locks on origin chunks.
#
# A snapshot reader told to read chunk X from the origin holds a read lock on
# X until it says it has finished; an origin write to X is not granted while
# anyone holds X (docs/protocol.md, "Reading a snapshot"). Locks are counted
# per holder and chunk (a holder may read a chunk twice at once) and live
# only in memory: after a restart, holders re-declare them.
from __future__ import annotations

from collections.abc import Hashable, Iterable
from typing import Generic, TypeVar

__all__ = ["LockTable"]

H = TypeVar("H", bound=Hashable)


def _chunks(ranges: Iterable[tuple[int, int]]) -> Iterable[int]:
    for start, count in ranges:
        yield from range(start, start + count)


class LockTable(Generic[H]):
    """Who holds read locks on which origin chunks."""

    def __init__(self) -> None:
        self._by_chunk: dict[int, dict[H, int]] = {}
        self._by_holder: dict[H, dict[int, int]] = {}

    def hold(self, holder: H, ranges: Iterable[tuple[int, int]]) -> None:
        """Take one more read lock on every chunk of `ranges` for `holder`."""
        mine = self._by_holder.setdefault(holder, {})
        for chunk in _chunks(ranges):
            holders = self._by_chunk.setdefault(chunk, {})
            holders[holder] = holders.get(holder, 0) + 1
            mine[chunk] = mine.get(chunk, 0) + 1

    def release(self, holder: H, ranges: Iterable[tuple[int, int]]) -> list[int]:
        """Drop one read lock per chunk; returns the chunks `holder` did not hold."""
        mine = self._by_holder.get(holder, {})
        stray = []
        for chunk in _chunks(ranges):
            count = mine.get(chunk, 0)
            if not count:
                stray.append(chunk)
                continue
            self._drop(holder, chunk, count - 1)
        if not mine:
            self._by_holder.pop(holder, None)
        return stray

    def release_all(self, holder: H) -> int:
        """Drop every lock of `holder` (it went away); returns how many chunks."""
        mine = self._by_holder.pop(holder, {})
        for chunk in list(mine):
            holders = self._by_chunk[chunk]
            del holders[holder]
            if not holders:
                del self._by_chunk[chunk]
        return len(mine)

    def _drop(self, holder: H, chunk: int, remaining: int) -> None:
        mine = self._by_holder[holder]
        holders = self._by_chunk[chunk]
        if remaining:
            mine[chunk] = holders[holder] = remaining
            return
        del mine[chunk]
        del holders[holder]
        if not holders:
            del self._by_chunk[chunk]

    def locked(self, ranges: Iterable[tuple[int, int]]) -> bool:
        """Whether anyone holds a lock on any chunk of `ranges`."""
        by_chunk = self._by_chunk
        if not by_chunk:
            return False
        return any(chunk in by_chunk for chunk in _chunks(ranges))

    def held_by(self, holder: H) -> int:
        """How many chunks `holder` holds locks on."""
        return len(self._by_holder.get(holder, {}))

    @property
    def locked_chunks(self) -> int:
        """How many chunks are locked by anyone."""
        return len(self._by_chunk)
