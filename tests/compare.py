"""Byte comparisons that fail with the first differing offset.

`assert a == b` on multi-MiB images makes pytest render a diff of the whole
buffers, which can take longer than the test; these helpers say where the
contents first differ, how many bytes differ, and show a few bytes around.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["Bytes", "first_difference", "assert_same_bytes", "assert_same_chunks"]

Bytes = bytes | bytearray | memoryview

#: Compared a block at a time: equal blocks are skipped at memcmp speed.
_BLOCK = 1 << 16
#: Bytes shown on each side of the first difference.
_CONTEXT = 16


def _blocks(a: memoryview, b: memoryview) -> list[tuple[int, int]]:
    """The (start, end) of every block of the common length where a and b differ."""
    common = min(len(a), len(b))
    spans = ((s, min(s + _BLOCK, common)) for s in range(0, common, _BLOCK))
    return [(s, e) for s, e in spans if a[s:e] != b[s:e]]


def first_difference(actual: Bytes, expected: Bytes) -> int | None:
    """The first offset where the two differ (the shorter length if one is a
    prefix of the other), or None if they are equal."""
    a, b = memoryview(actual).cast("B"), memoryview(expected).cast("B")
    for start, end in _blocks(a, b)[:1]:
        return next(i for i in range(start, end) if a[i] != b[i])
    return None if len(a) == len(b) else min(len(a), len(b))


def assert_same_bytes(actual: Bytes, expected: Bytes, what: str = "data") -> None:
    """Fail, naming the first differing offset, unless the bytes are equal."""
    offset = first_difference(actual, expected)
    if offset is None:
        return
    a, b = memoryview(actual).cast("B"), memoryview(expected).cast("B")
    differing = abs(len(a) - len(b)) + sum(
        sum(1 for i in range(s, e) if a[i] != b[i]) for s, e in _blocks(a, b)
    )
    lo, hi = max(0, offset - _CONTEXT), offset + _CONTEXT
    raise AssertionError(
        f"{what}: first difference at offset {offset} ({offset:#x}) of {len(a)} bytes"
        f" ({len(b)} expected); {differing} bytes differ; from offset {lo}, got"
        f" {bytes(a[lo:hi]).hex(' ')}, expected {bytes(b[lo:hi]).hex(' ')}"
    )


def assert_same_chunks(
    actual: Sequence[Bytes], expected: Sequence[Bytes], what: str = "chunks"
) -> None:
    """Like assert_same_bytes for lists of chunks, naming the first bad chunk."""
    if len(actual) != len(expected):
        raise AssertionError(f"{what}: {len(actual)} chunks, expected {len(expected)}")
    for index, (got, want) in enumerate(zip(actual, expected, strict=True)):
        assert_same_bytes(got, want, f"{what}, chunk {index}")
