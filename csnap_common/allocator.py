"""How a long-running service asks the C allocator to give freed buffers back.

A peer may make a service hold a large buffer for a while: a frame of up to
`max_frame` bytes arriving in pieces, a reply queue, a thousand connections.
glibc serves large allocations from their own mappings and unmaps them when
they are freed, but by default it raises that threshold to the size of each
such block freed: after the first burst, the next buffers of that size come
from the heap, where a freed block the system cannot take back (anything
above it still in use) keeps the service's memory high for good, and a few
rounds of the same abuse ratchet it up. Fixing the threshold keeps memory
after a burst where it was after the first one (docs/operations.md,
"Memory").
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "return_freed_buffers", "release_free_pages"]

log = logging.getLogger("csnap.allocator")

#: Allocations of at least this many bytes get a mapping of their own,
#: returned to the system when freed (glibc's default before it adapts).
MMAP_THRESHOLD = 128 << 10
#: Free memory at the top of the heap beyond this is returned at once.
TRIM_THRESHOLD = 256 << 10
#: mallopt(3) parameter numbers, from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def return_freed_buffers() -> bool:
    """Fix glibc's mapping and trim thresholds; False where that is not possible.

    Another C library (musl, a sanitiser's allocator) has no mallopt or
    ignores it: the service runs as before, its memory as that library keeps it.
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        log.debug("no mallopt in the C library %s: freed buffers stay as it keeps them", name)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    fixed: bool = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    trimmed: bool = mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    return fixed and trimmed


def release_free_pages() -> bool:
    """Give the system back the free pages inside the heap (malloc_trim(0)).

    Small allocations freed in their thousands (each TLS connection's
    buffers) leave free holes between blocks still in use, which the
    thresholds above cannot return; glibc's malloc_trim can. False where the
    C library has none.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        trim = libc.malloc_trim
    except (OSError, AttributeError, TypeError):
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    trim(0)
    return True
