"""Byte comparisons that fail with the first differing offset, not a diff.

pytest's assertion rewriting renders a diff of two unequal bytes objects;
for megabytes that takes longer than any test should run. These helpers
compare once and report where the two first differ, their lengths, and a
short hex window around the difference.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["assert_same_bytes", "assert_same_chunks", "first_difference"]

Bytes = bytes | bytearray | memoryview

#: Bytes shown either side of the first difference.
WINDOW = 16


def first_difference(actual: Bytes, expected: Bytes) -> int | None:
    """Offset of the first byte where the two differ (or one ends), or None."""
    a, e = memoryview(actual).cast("B"), memoryview(expected).cast("B")
    if a == e:
        return None
    shorter = min(len(a), len(e))
    lo, hi = 0, shorter
    # Binary search on prefixes: memoryview comparison runs at C speed.
    while lo < hi:
        mid = (lo + hi) // 2
        if a[lo : mid + 1] == e[lo : mid + 1]:
            lo = mid + 1
        else:
            hi = mid
    return lo


def _window(data: Bytes, at: int) -> str:
    start = max(0, at - WINDOW)
    piece = bytes(data[start : at + WINDOW])
    return f"[{start}:{start + len(piece)}] {piece.hex(' ')}"


def assert_same_bytes(actual: Bytes, expected: Bytes, what: str = "data") -> None:
    """Fail, without a diff, unless `actual` equals `expected`.

    Raises:
        AssertionError: naming `what`, the first differing offset, both
            lengths, and the bytes of each around that offset.
    """
    at = first_difference(actual, expected)
    if at is None:
        return
    __tracebackhide__ = True
    raise AssertionError(
        f"{what}: first difference at offset {at} (0x{at:x});"
        f" {len(actual)} bytes, expected {len(expected)}\n"
        f"  actual   {_window(actual, at)}\n"
        f"  expected {_window(expected, at)}"
    )


def assert_same_chunks(
    actual: Sequence[Bytes], expected: Sequence[Bytes], what: str = "chunks"
) -> None:
    """Like assert_same_bytes for lists of chunks, naming the first bad chunk."""
    if len(actual) != len(expected):
        raise AssertionError(f"{what}: {len(actual)} chunks, expected {len(expected)}")
    for index, (got, want) in enumerate(zip(actual, expected, strict=True)):
        assert_same_bytes(got, want, f"{what}, chunk {index}")
