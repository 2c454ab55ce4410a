"""Cached struct formats for variable-length arrays of little-endian integers."""

from __future__ import annotations

import functools
import struct

__all__ = ["u32_array", "u64_array", "is_zero"]

# Compared against with memcmp; as large as the largest block.
_ZEROS = bytes(1 << 20)


@functools.lru_cache(maxsize=1024)
def u32_array(count: int) -> struct.Struct:
    """A struct for `count` little-endian u32 values."""
    return struct.Struct(f"<{count}I")


@functools.lru_cache(maxsize=1024)
def u64_array(count: int) -> struct.Struct:
    """A struct for `count` little-endian u64 values."""
    return struct.Struct(f"<{count}Q")


def is_zero(buf: bytes | bytearray | memoryview, start: int, end: int) -> bool:
    """Whether buf[start:end] is all zero bytes (memcmp speed, no copies)."""
    if end <= start:
        return True
    return memoryview(buf)[start:end] == _ZEROS[: end - start]
