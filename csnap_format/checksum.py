"""The store's checksum: CRC-32 with zlib's polynomial and conventions.

Every CRC the store keeps (block headers, the superblock's geometry, a
commit record's payload, the data runs of copied chunks) is this one
function. It is computed by zlib-ng, whose CRC-32 gives zlib's answer for
every input and runs several times faster on a machine with carry-less
multiply: a batch of first writes checksums every chunk it copies on the
server's event loop (docs/performance-log.md, "The store's CRC through
zlib-ng"). Where zlib-ng cannot be
imported, the standard library's zlib computes the same value.
"""

from __future__ import annotations

__all__ = ["crc32", "IMPLEMENTATION"]

try:
    from zlib_ng.zlib_ng import crc32 as _crc32

    IMPLEMENTATION = "zlib-ng"
except ImportError:  # pragma: no cover - the dependency is installed with csnap
    from zlib import crc32 as _crc32  # noqa: TID251 - the same CRC, slower

    IMPLEMENTATION = "zlib"


def crc32(data: bytes | bytearray | memoryview, value: int = 0) -> int:
    """The CRC-32 of `data`, continuing from `value` (the CRC of the bytes
    before it, 0 to start): crc32(b, crc32(a)) == crc32(a + b)."""
    return _crc32(data, value)
