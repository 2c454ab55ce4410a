"""base:allocation: the byte ranges of an export the gateway can prove read as
zeroes, from the holes of the origin file (lseek SEEK_DATA / SEEK_HOLE).

  origin export    the origin file's holes in the range asked about
  snapshot export  the origin file's holes under the chunks the snapshot
                   still shares with the origin (those without a store copy,
                   by query_map, asked after the holes were found)

Everything else is reported as data (flags 0), which is always true: a
block device, a file system that cannot tell holes apart (lseek answers
one data extent to the end of the file, or fails), store copies, and the
bytes past the end of the origin file.

Why the answers hold (docs/nbd.md, "Metadata contexts"): csnap never turns
data back into a hole (trims are ignored, zeroes are written as bytes, no
file is punched or shrunk), and an origin write to a chunk is granted only
after every live snapshot that shares it has its own copy. A hole seen in a
chunk that query_map, asked afterwards, still finds shared was the
snapshot's content when it was seen: no origin write to that chunk had
been granted since the snapshot was taken. On the origin the answer is as
true as a hole was at the moment of the lseek; a write that lands after it
makes it stale, as with any NBD server over a sparse file.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Awaitable, Callable, Iterable, Sequence

import trio

from csnap_nbd.geometry import Piece, join_extent
from csnap_nbd.wire.constants import STATE_HOLE, STATE_ZERO

__all__ = ["HOLE_ZERO", "MAX_HOLES", "find_holes", "origin_allocation", "snapshot_allocation"]

#: base:allocation flags of a byte range proved to read as zeroes.
HOLE_ZERO = STATE_HOLE | STATE_ZERO
#: Most holes one lseek scan collects; an answer with more stops after them
#: (the specification lets a server describe less than asked).
MAX_HOLES = 1024

#: A byte range [start, end).
Span = tuple[int, int]
#: query_map: which of these (chunk, count) ranges have store copies.
CopiedRanges = Callable[[tuple[tuple[int, int], ...]], Awaitable[tuple[tuple[int, int], ...]]]


def find_holes(fd: int, start: int, end: int, most: int = MAX_HOLES) -> tuple[list[Span], int]:
    """The holes of file `fd` within [start, end), and where the scan stopped.

    The scan stops at `end`, or after `most` holes and the data that
    follows the last. Past the end of the file, in anything but a
    regular file, and wherever lseek cannot tell, nothing is a hole.
    """
    try:
        info = os.fstat(fd)
    except OSError:
        return [], end
    if not stat.S_ISREG(info.st_mode):
        return [], end  # a block device: lseek would call all of it data anyway
    limit = min(end, info.st_size)
    holes: list[Span] = []
    position = start
    # Each round finds one hole or steps over one data extent.
    for _ in range(2 * most + 2):
        if position >= limit:
            break
        if len(holes) == most:
            return holes, position
        try:
            data = os.lseek(fd, position, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                break  # cannot tell (EINVAL, EOPNOTSUPP): the rest counts as data
            data = limit  # no data from here to the end of the file
        if data > position:
            holes.append((position, min(data, limit)))
        if data >= limit:
            break
        try:
            position = os.lseek(fd, data, os.SEEK_HOLE)
        except OSError:
            break
    return holes, end


def _describe(start: int, stop: int, zeroes: Iterable[Span]) -> list[tuple[int, int]]:
    """Descriptors of [start, stop): HOLE_ZERO over `zeroes` (ascending, disjoint), else 0."""
    out: list[tuple[int, int]] = []
    position = start
    for lo, hi in zeroes:
        lo, hi = max(lo, position), min(hi, stop)
        if lo >= hi:
            continue
        join_extent(out, lo - position, 0)
        join_extent(out, hi - lo, HOLE_ZERO)
        position = hi
    join_extent(out, stop - position, 0)
    return out


def _without(
    holes: Sequence[Span], copied: Iterable[tuple[int, int]], chunk_size: int
) -> list[Span]:
    """`holes` less the bytes of the copied (chunk, count) ranges."""
    out: list[Span] = []
    cuts = sorted((c * chunk_size, (c + n) * chunk_size) for c, n in copied)
    for lo, hi in holes:
        for cut_lo, cut_hi in cuts:
            if cut_hi <= lo or cut_lo >= hi:
                continue
            if cut_lo > lo:
                out.append((lo, cut_lo))
            lo = max(lo, cut_hi)
            if lo >= hi:
                break
        if lo < hi:
            out.append((lo, hi))
    return out


async def origin_allocation(
    fd: int, offset: int, length: int, *, req_one: bool
) -> list[tuple[int, int]]:
    """base:allocation descriptors of the origin export from `offset`."""
    holes, stop = await trio.to_thread.run_sync(find_holes, fd, offset, offset + length)
    out = _describe(offset, stop, holes)
    return out[:1] if req_one else out


async def snapshot_allocation(
    fd: int,
    offset: int,
    length: int,
    pieces: Iterable[Piece],
    copied_ranges: CopiedRanges,
    chunk_size: int,
    *,
    req_one: bool,
    most_queries: int,
) -> list[tuple[int, int]]:
    """base:allocation descriptors of a snapshot export from `offset`.

    `pieces` split the request into query_map-sized runs of chunks. Only a
    piece with a hole in the origin costs a query; after `most_queries` of
    them the answer ends where the next such piece starts.
    """
    end = offset + length
    # The holes first, then query_map: a chunk still shared after the lseek
    # was the snapshot's content at the lseek (see the docstring).
    holes, stop = await trio.to_thread.run_sync(find_holes, fd, offset, end)
    zeroes: list[Span] = []
    queries = first = 0
    for piece in pieces:
        if piece.start >= stop or first == len(holes):
            break
        while first < len(holes) and holes[first][1] <= piece.start:
            first += 1
        inside: list[Span] = []
        for lo, hi in holes[first:]:
            if lo >= piece.end:
                break
            inside.append((max(lo, piece.start), min(hi, piece.end)))
        if not inside:
            continue
        if queries == most_queries:
            stop = piece.start
            break
        queries += 1
        copied = await copied_ranges(((piece.first, piece.count),))
        zeroes += _without(inside, copied, chunk_size)
        if req_one and zeroes:
            stop = min(stop, piece.end)  # the first descriptor is known by now
            break
    out = _describe(offset, stop, zeroes)
    return out[:1] if req_one else out
