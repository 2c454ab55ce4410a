"""Read locks on origin chunks.

A snapshot reader told to read chunk X from the origin holds a read lock on
X until it says it has finished; an origin write to X is not granted while
anyone holds X (docs/protocol.md, "Reading a snapshot"). Locks are counted
per holder and chunk (a holder may read a chunk twice at once) and live
only in memory: after a restart, holders re-declare them.

Memory: one entry per holder and chunk, and one per chunk; counts of locks
(a chunk locked twice counts twice) are kept per holder and in all, so a
caller can bound the table before it grows (docs/protocol.md, "Limits").
A Python dict keeps its size when entries are deleted, so the per-chunk
table is rebuilt once it holds far fewer entries than it once did: memory
returns when the locks do.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Iterable
from typing import Generic, TypeVar

__all__ = ["LockTable"]

H = TypeVar("H", bound=Hashable)

#: The per-chunk table is rebuilt when it shrinks below 1/_SHRINK of its peak...
_SHRINK = 4
#: ...and that peak was at least this many chunks.
_SHRINK_FROM = 1024


def _chunks(ranges: Iterable[tuple[int, int]]) -> Iterable[int]:
    for start, count in ranges:
        yield from range(start, start + count)


class LockTable(Generic[H]):
    """Who holds read locks on which origin chunks."""

    def __init__(self) -> None:
        #: Locks on each locked chunk, all holders together.
        self._by_chunk: dict[int, int] = {}
        self._by_holder: dict[H, dict[int, int]] = {}
        #: Locks of each holder, a chunk locked twice counted twice.
        self._counts: dict[H, int] = {}
        self._total = 0
        #: Most entries _by_chunk held since it was last rebuilt.
        self._peak = 0

    def hold(self, holder: H, ranges: Iterable[tuple[int, int]]) -> None:
        """Take one more read lock on every chunk of `ranges` for `holder`."""
        mine = self._by_holder.setdefault(holder, {})
        by_chunk = self._by_chunk
        taken = 0
        for chunk in _chunks(ranges):
            by_chunk[chunk] = by_chunk.get(chunk, 0) + 1
            mine[chunk] = mine.get(chunk, 0) + 1
            taken += 1
        if not mine:
            del self._by_holder[holder]
            return
        self._counts[holder] = self._counts.get(holder, 0) + taken
        self._total += taken
        self._peak = max(self._peak, len(by_chunk))

    def missing(self, holder: H, ranges: Iterable[tuple[int, int]]) -> list[int]:
        """Chunks of `ranges` that `holder` holds fewer locks on than `ranges` names them."""
        mine = self._by_holder.get(holder, {})
        wanted = Counter(_chunks(ranges))
        return sorted(chunk for chunk, n in wanted.items() if mine.get(chunk, 0) < n)

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
        self._compact()
        return stray

    def release_all(self, holder: H) -> int:
        """Drop every lock of `holder` (it went away); returns how many chunks."""
        mine = self._by_holder.pop(holder, {})
        by_chunk = self._by_chunk
        for chunk, count in mine.items():
            left = by_chunk[chunk] - count
            if left:
                by_chunk[chunk] = left
            else:
                del by_chunk[chunk]
        self._total -= self._counts.pop(holder, 0)
        self._compact()
        return len(mine)

    def _compact(self) -> None:
        """Give back the memory of a per-chunk table that shrank a lot."""
        size = len(self._by_chunk)
        if self._peak >= _SHRINK_FROM and size * _SHRINK < self._peak:
            self._by_chunk = dict(self._by_chunk)
            self._peak = size

    def _drop(self, holder: H, chunk: int, remaining: int) -> None:
        mine = self._by_holder[holder]
        if remaining:
            mine[chunk] = remaining
        else:
            del mine[chunk]
        left = self._by_chunk[chunk] - 1
        if left:
            self._by_chunk[chunk] = left
        else:
            del self._by_chunk[chunk]
        self._total -= 1
        count = self._counts[holder] - 1
        if count:
            self._counts[holder] = count
        else:
            del self._counts[holder]

    def locked(self, ranges: Iterable[tuple[int, int]]) -> bool:
        """Whether anyone holds a lock on any chunk of `ranges`."""
        by_chunk = self._by_chunk
        if not by_chunk:
            return False
        return any(chunk in by_chunk for chunk in _chunks(ranges))

    def held_by(self, holder: H) -> int:
        """How many chunks `holder` holds locks on."""
        return len(self._by_holder.get(holder, {}))

    def locks_of(self, holder: H) -> int:
        """How many locks `holder` holds (a chunk locked twice counts twice)."""
        return self._counts.get(holder, 0)

    @property
    def locked_chunks(self) -> int:
        """How many chunks are locked by anyone."""
        return len(self._by_chunk)

    @property
    def total(self) -> int:
        """How many locks are held, by everyone (a chunk locked twice counts twice)."""
        return self._total

    @property
    def holders(self) -> int:
        """How many holders hold locks."""
        return len(self._by_holder)
