"""What the engine checks in a request's arguments before it does anything.

Owns the bounds of a request: ranges lie inside the origin, name at least one
chunk and at most MAX_REQUEST_CHUNKS, and no chunk twice (a chunk copied twice
would give two exceptions of one chunk the same share bit); snapshot tags and
priorities lie in their ranges. A refused request has changed nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

from csnap_common.limits import MAX_REQUEST_CHUNKS
from csnap_format import MAX_TAG
from csnapd.engine.errors import (
    InvalidRequestError,
    OverlappingRangesError,
    RequestTooLargeError,
)

__all__ = ["Ranges", "check_priority", "check_ranges", "check_tag"]


#: (first logical chunk, number of chunks) pairs.
Ranges = Sequence[tuple[int, int]]


def check_ranges(ranges: Ranges, origin_chunks: int) -> None:
    """Refuse ranges outside the origin, naming no chunk, or naming one twice."""
    total = 0
    for start, count in ranges:
        if count < 1 or start < 0 or start + count > origin_chunks:
            raise InvalidRequestError(
                f"chunks {start}..{start + count - 1} are not inside the origin"
                f" (chunks 0..{origin_chunks - 1})"
            )
        total += count
    if total == 0:
        raise InvalidRequestError("the request names no chunks")
    if total > MAX_REQUEST_CHUNKS:
        raise RequestTooLargeError(
            f"the request names {total} chunks; at most {MAX_REQUEST_CHUNKS}"
        )
    following = 0
    for start, count in sorted(ranges):
        if start < following:
            raise OverlappingRangesError(f"chunk {start} is named twice (ranges repeat or overlap)")
        following = start + count


def check_tag(tag: int) -> None:
    """Refuse a snapshot tag outside 0..MAX_TAG."""
    if not 0 <= tag <= MAX_TAG:
        raise InvalidRequestError(f"snapshot tag {tag} is not in 0..{MAX_TAG}")


def check_priority(priority: int) -> None:
    """Refuse a snapshot priority outside -128..127."""
    if not -128 <= priority <= 127:
        raise InvalidRequestError(f"priority {priority} is not in -128..127")
