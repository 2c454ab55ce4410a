"""Byte ranges of an export against csnap's chunks: which chunks a request
touches, in pieces the server accepts (at most max_chunks each), where each
byte of a piece lives in the origin or store file, and the extents of a
chunk-granular answer (query_map) clipped to a byte-granular request.

Pure arithmetic, no I/O: unaligned requests are the point of this module,
and it is tested on its own.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

__all__ = [
    "Piece",
    "Placement",
    "pieces",
    "halves",
    "store_placements",
    "origin_placements",
    "extents",
    "join_extent",
    "chunk_runs",
    "ZEROES",
    "zero_placements",
]


@dataclass(frozen=True, slots=True)
class Piece:
    """Chunks first..first+count-1, covering export bytes start..end-1 of a request."""

    first: int
    count: int
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class Placement:
    """`size` bytes at byte `position` of a file, and at `buffer` in the request's data."""

    position: int
    buffer: int
    size: int


def pieces(offset: int, length: int, chunk_size: int, max_chunks: int) -> Iterator[Piece]:
    """Split export bytes offset..offset+length-1 into runs of at most max_chunks chunks."""
    if length <= 0:
        return
    end = offset + length
    chunk = offset // chunk_size
    last = (end - 1) // chunk_size
    while chunk <= last:
        count = min(max_chunks, last - chunk + 1)
        start = max(offset, chunk * chunk_size)
        stop = min(end, (chunk + count) * chunk_size)
        yield Piece(chunk, count, start, stop)
        chunk += count


def halves(piece: Piece, chunk_size: int) -> tuple[Piece, Piece]:
    """`piece` (of at least two chunks) as two pieces, the first chunk-aligned at its end."""
    if piece.count < 2:
        raise ValueError(f"a piece of {piece.count} chunk cannot be halved")
    count = piece.count // 2
    middle = (piece.first + count) * chunk_size
    return (
        Piece(piece.first, count, piece.start, middle),
        Piece(piece.first + count, piece.count - count, middle, piece.end),
    )


def _clip(chunk: int, count: int, chunk_size: int, piece: Piece) -> tuple[int, int] | None:
    lo = max(piece.start, chunk * chunk_size)
    hi = min(piece.end, (chunk + count) * chunk_size)
    return (lo, hi) if lo < hi else None


def store_placements(
    segments: Iterable[tuple[int, int, int]], piece: Piece, offset: int, chunk_size: int
) -> list[Placement]:
    """Where the bytes of `piece` are in the store, for (chunk, count, store chunk) segments.

    `offset` is where the request's buffer starts in the export. Only the
    bytes the request covers are placed: a partial chunk is never widened.
    """
    out: list[Placement] = []
    for chunk, count, store_chunk in segments:
        span = _clip(chunk, count, chunk_size, piece)
        if span is not None:
            lo, hi = span
            position = store_chunk * chunk_size + (lo - chunk * chunk_size)
            out.append(Placement(position, lo - offset, hi - lo))
    return out


def origin_placements(
    ranges: Iterable[tuple[int, int]], piece: Piece, offset: int, chunk_size: int
) -> list[Placement]:
    """Where the bytes of `piece` are in the origin, for (chunk, count) ranges."""
    out: list[Placement] = []
    for chunk, count in ranges:
        span = _clip(chunk, count, chunk_size, piece)
        if span is not None:
            lo, hi = span
            out.append(Placement(lo, lo - offset, hi - lo))
    return out


def join_extent(out: list[tuple[int, int]], length: int, value: int) -> None:
    """Append a (length, flags) descriptor, merged into the last one if its flags are equal."""
    if length <= 0:
        return
    if out and out[-1][1] == value:
        out[-1] = (out[-1][0] + length, value)
    else:
        out.append((length, value))


def extents(
    piece: Piece, flagged: Sequence[tuple[int, int]], chunk_size: int, flag: int
) -> list[tuple[int, int]]:
    """(length, flags) descriptors for bytes piece.start..piece.end-1.

    `flagged` are ascending (chunk, count) ranges whose chunks get `flag`;
    every other byte gets 0. Neighbours with equal flags are merged, as the
    spec asks servers to do.
    """
    out: list[tuple[int, int]] = []

    def emit(length: int, value: int) -> None:
        join_extent(out, length, value)

    position = piece.start
    for chunk, count in sorted(flagged):
        span = _clip(chunk, count, chunk_size, piece)
        if span is None:
            continue
        lo, hi = span
        emit(lo - position, 0)
        emit(hi - max(lo, position), flag)
        position = max(position, hi)
    emit(piece.end - position, 0)
    return out


def chunk_runs(chunks: Iterable[int]) -> list[tuple[int, int]]:
    """Chunk numbers (any order, repeats allowed) as ascending (first, count) runs."""
    runs: list[tuple[int, int]] = []
    for chunk in sorted(set(chunks)):
        if runs and runs[-1][0] + runs[-1][1] == chunk:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((chunk, 1))
    return runs


#: Zeroes are written from one shared buffer of this size.
ZERO_SLICE = 1 << 20
ZEROES = memoryview(bytes(ZERO_SLICE))


def zero_placements(placements: list[Placement]) -> list[Placement]:
    """Placements that all read from the start of the shared zero buffer, ZEROES."""
    return [
        Placement(p.position + done, 0, min(ZERO_SLICE, p.size - done))
        for p in placements
        for done in range(0, p.size, ZERO_SLICE)
    ]
