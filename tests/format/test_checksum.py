"""The store's checksum is zlib's CRC-32, whichever library computes it:
stores written before it was computed by zlib-ng read the same, and a
chained CRC equals the CRC of the joined bytes."""

from __future__ import annotations

import zlib

from hypothesis import given
from hypothesis import strategies as st

from csnap_format import checksum
from csnap_format.checksum import crc32

CRC_VALUES = st.integers(min_value=0, max_value=2**32 - 1)


@given(st.binary(max_size=70_000), CRC_VALUES)
def test_the_checksum_is_zlibs_crc32(data: bytes, start: int) -> None:
    assert crc32(data) == zlib.crc32(data)
    assert crc32(data, start) == zlib.crc32(data, start)


@given(st.binary(max_size=5_000), st.binary(max_size=5_000))
def test_a_chained_checksum_is_the_checksum_of_the_joined_bytes(a: bytes, b: bytes) -> None:
    assert crc32(b, crc32(a)) == crc32(a + b)
    assert crc32(memoryview(a + b)[len(a) :], crc32(bytearray(a))) == crc32(a + b)


def test_large_buffers_are_checksummed_by_zlib_ng() -> None:
    # The dependency is installed with csnap; the fallback is for machines
    # without its wheel, not the one the server runs on.
    assert checksum.IMPLEMENTATION == "zlib-ng"
    chunk = bytes(range(256)) * 256
    assert crc32(chunk) == 0xB11DE6A1
