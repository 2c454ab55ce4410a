"""What csnapd checks in the chunk ranges of a data-path request, before the
engine or the lock table sees them: the one place every request's ranges
pass through (docs/protocol.md, "What csnapd checks").

Rules:
  * a request names at least one chunk, and at most max_chunks in all;
  * every range lies inside the origin (chunk + count <= origin_chunks);
  * a request that asks about chunks (query_write, query_snapshot_read,
    query_map, query_owned) names each chunk once: repeated or overlapping ranges are
    refused, since acting twice on one chunk would copy it twice;
  * requests about read locks (finish_snapshot_read, upload_lock) may name a
    chunk more than once: locks are counted, and each naming is one lock.
A refused request has done nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

from csnap_protocol import ErrorCode

__all__ = ["RequestRefused", "check_ranges"]


class RequestRefused(Exception):
    """A request csnapd refuses before doing anything, with its wire code."""

    def __init__(self, code: ErrorCode, message: str):
        super().__init__(message)
        self.code = code


def check_ranges(
    ranges: Sequence[tuple[int, int]],
    *,
    origin_chunks: int,
    max_chunks: int,
    repeats: bool,
) -> int:
    """Refuse ranges csnapd must not act on; returns how many chunks they name.

    `repeats`: whether a chunk may be named more than once (lock requests).

    Raises:
        RequestRefused: invalid_request (no chunk, outside the origin, a chunk
            named twice) or request_too_large (more than max_chunks).
    """
    total = sum(count for _, count in ranges)
    if total == 0:
        raise RequestRefused(ErrorCode.INVALID_REQUEST, "the request names no chunk")
    if total > max_chunks:
        raise RequestRefused(
            ErrorCode.REQUEST_TOO_LARGE,
            f"{total} chunks in one request; this server takes at most {max_chunks}",
        )
    for start, count in ranges:
        if count < 1 or start + count > origin_chunks:
            raise RequestRefused(
                ErrorCode.INVALID_REQUEST,
                f"chunks {start}..{start + count - 1} are not inside the origin"
                f" (chunks 0..{origin_chunks - 1})",
            )
    if not repeats:
        following = 0
        for start, count in sorted(ranges):
            if start < following:
                raise RequestRefused(
                    ErrorCode.INVALID_REQUEST,
                    f"chunk {start} is named twice: the ranges repeat or overlap",
                )
            following = start + count
    return total
