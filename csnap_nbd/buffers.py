"""Request data buffers larger than glibc's mapping threshold, kept for reuse.

The services fix glibc's mapping threshold (csnap_common.allocator), so every
buffer above it is a fresh mapping: zeroed pages faulted in one by one, then
unmapped when freed. For a 256 KiB read that is most of the gateway's work.
A WRITE's payload and a READ's data are taken from here and given back once
the request is done or its reply sent; at most POOL_BYTES stay kept, so the
memory still returns after a burst beyond that.
"""

from __future__ import annotations

from csnap_common.allocator import MMAP_THRESHOLD

__all__ = ["BufferPool", "BUFFERS", "POOL_BYTES"]

#: Most bytes of free buffers kept: twice a queue of 16 requests of 256 KiB
#: (a backup's usual shape). A connection holds a few more buffers than its
#: client has requests in flight (the next request is read while a reply is
#: still being sent); a pool exactly one queue deep ran empty on one large
#: read in six.
POOL_BYTES = 8 << 20


class BufferPool:
    """Free buffers by size; contents are whatever was there (callers fill them)."""

    def __init__(self, limit: int = POOL_BYTES, floor: int = MMAP_THRESHOLD):
        self._limit = limit
        self._floor = floor
        self._free: dict[int, list[bytearray]] = {}
        self.kept = 0

    def take(self, size: int) -> bytearray:
        """A buffer of `size` bytes, not zeroed if it comes from the pool."""
        free = self._free.get(size)
        if free:
            self.kept -= size
            return free.pop()
        return bytearray(size)

    def give(self, buffer: bytearray) -> None:
        """`buffer` is no longer used by anyone: keep it if there is room."""
        size = len(buffer)
        if size <= self._floor or self.kept + size > self._limit:
            return
        self._free.setdefault(size, []).append(buffer)
        self.kept += size


#: The gateway's one pool (its connections all run on one trio thread).
BUFFERS = BufferPool()
