"""A snapshot client's map of the store chunks its snapshot owns alone.

Owns the addresses learnt from `query_owned` (docs/protocol.md): for each
window of WINDOW_CHUNKS logical chunks asked about, the store chunk of every
chunk the snapshot owns alone, ORIGIN for a chunk it shared with the origin
when asked, or UNKNOWN for a chunk it shares with another live snapshot,
which is read through csnapd as before. An owned address does not change
while the snapshot lives, so it is used without asking again (rule: stable
owned addresses, docs/rules.md); what ends its use (a new session, the
snapshot's deletion, the lease) is the client's to apply: see
csnap_client.client. ORIGIN is only a hint: data read from the origin on
its strength counts only once csnapd confirms, after the read, that the
chunk is still shared (rule: verified origin reads).

Memory is bounded: at most MAX_WINDOWS windows of 8 bytes per chunk; the
oldest window goes first when a new one comes.

Read-ahead: a window learnt ahead of its reads (the client asks for the
next window while a reader goes forward through one) is `ahead` until a
read first uses it; that read is the client's cue to ask for the window
after it, so a reader going forward finds each window known before it
gets there.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable

__all__ = ["OwnedMap", "WINDOW_CHUNKS", "MAX_WINDOWS", "UNKNOWN", "ORIGIN"]

#: Chunks one query_owned asks about (fewer when the server takes fewer).
WINDOW_CHUNKS = 1024
#: Windows a map keeps: 8 MiB of addresses at most.
MAX_WINDOWS = 1024
#: A chunk the snapshot does not own alone (or not known to).
UNKNOWN = -1
#: A chunk the snapshot shared with the origin when last asked.
ORIGIN = -2

Segment = tuple[int, int, int]


class OwnedMap:
    """Owned-alone store addresses of one snapshot, window by window."""

    def __init__(self, origin_chunks: int, window: int = WINDOW_CHUNKS):
        self.origin_chunks = origin_chunks
        self.window = max(1, window)
        self._windows: dict[int, array[int]] = {}
        #: Windows learnt ahead of their reads that no read has used yet.
        self.ahead: set[int] = set()

    def __len__(self) -> int:
        return len(self._windows)

    def span(self, index: int) -> tuple[int, int]:
        """(first chunk, count) of window `index`."""
        first = index * self.window
        return first, min(self.window, self.origin_chunks - first)

    def windows(self, first: int, count: int) -> range:
        """The indexes of the windows chunks first..first+count-1 fall in."""
        return range(first // self.window, (first + count - 1) // self.window + 1)

    @property
    def window_count(self) -> int:
        """How many windows the origin's chunks make."""
        return -(-self.origin_chunks // self.window)

    def missing(self, first: int, count: int) -> list[int]:
        """Windows of these chunks not known yet."""
        return [w for w in self.windows(first, count) if w not in self._windows]

    def knows(self, index: int) -> bool:
        """Whether window `index` is known."""
        return index in self._windows

    def learn(
        self,
        index: int,
        segments: Iterable[Segment],
        origin: Iterable[tuple[int, int]] = (),
        *,
        ahead: bool = False,
    ) -> None:
        """Window `index` as a query_owned about its whole span answered;
        `ahead`: asked for before any read needed it."""
        start, count = self.span(index)
        entries = array("q", [UNKNOWN]) * count
        for chunk, run, store in segments:
            for k in range(max(chunk, start), min(chunk + run, start + count)):
                entries[k - start] = store + (k - chunk)
        for chunk, run in origin:
            for k in range(max(chunk, start), min(chunk + run, start + count)):
                entries[k - start] = ORIGIN
        if index not in self._windows and len(self._windows) >= MAX_WINDOWS:
            oldest = next(iter(self._windows))
            del self._windows[oldest]
            self.ahead.discard(oldest)
        self._windows[index] = entries
        if ahead:
            self.ahead.add(index)
        else:
            self.ahead.discard(index)

    def first_use(self, first: int, count: int) -> list[int]:
        """Windows of chunks first..first+count-1 learnt ahead that a read
        uses now for the first time (no longer `ahead` afterwards)."""
        used = [w for w in self.windows(first, count) if w in self.ahead]
        self.ahead.difference_update(used)
        return used

    def note(self, segments: Iterable[Segment]) -> None:
        """Chunks the snapshot now owns alone (a snapshot write's reply), in known windows."""
        for chunk, run, store in segments:
            for k in range(chunk, chunk + run):
                entries = self._windows.get(k // self.window)
                if entries is not None:
                    entries[k % self.window] = store + (k - chunk)

    def unshared(self, chunks: Iterable[int]) -> None:
        """These chunks no longer share the origin: ask csnapd where they are."""
        for k in chunks:
            entries = self._windows.get(k // self.window)
            if entries is not None and entries[k % self.window] == ORIGIN:
                entries[k % self.window] = UNKNOWN

    def store_chunk(self, chunk: int) -> int:
        """The store chunk `chunk` is owned alone at, or a negative value
        (UNKNOWN, ORIGIN) when the map does not place it there."""
        entries = self._windows.get(chunk // self.window)
        return UNKNOWN if entries is None else entries[chunk % self.window]

    def lookup(
        self, first: int, count: int, *, origin: bool = False
    ) -> tuple[tuple[Segment, ...], tuple[tuple[int, int], ...]] | None:
        """Where chunks first..first+count-1 are: owned store segments and, if
        `origin`, ranges last known shared with the origin; None if a chunk is
        neither (or its window is not known)."""
        runs: list[Segment] = []
        shared: list[tuple[int, int]] = []
        window = self.window
        for k in range(first, first + count):
            entries = self._windows.get(k // window)
            if entries is None:
                return None
            store = entries[k % window]
            if store == ORIGIN and origin:
                if shared and shared[-1][0] + shared[-1][1] == k:
                    shared[-1] = (shared[-1][0], shared[-1][1] + 1)
                else:
                    shared.append((k, 1))
                continue
            if store < 0:
                return None
            if runs:
                chunk, run, at = runs[-1]
                # Continues the last run in both chunk and store chunk (a
                # chunk placed on the origin may lie between).
                if chunk + run == k and at + run == store:
                    runs[-1] = (chunk, run + 1, at)
                    continue
            runs.append((k, 1, store))
        return tuple(runs), tuple(shared)
