# The byte comparison the data tests use: it names the first differing
# offset, both lengths and the bytes there, at once, whatever the size.
from __future__ import annotations

import pytest

from tests.compare import assert_same_bytes, assert_same_chunks, first_difference


def test_the_first_difference_is_found_at_every_position() -> None:
    base = bytes(range(256)) * 64
    assert first_difference(base, base) is None
    for at in (0, 1, 255, 8191, len(base) - 1):
        other = bytearray(base)
        other[at] ^= 0xFF
        assert first_difference(base, other) == at
    assert first_difference(base, base[:-3]) == len(base) - 3
    assert first_difference(b"", b"x") == 0


def test_a_mismatch_of_megabytes_reports_offset_lengths_and_window() -> None:
    expected = bytes(16 << 20)
    actual = bytearray(expected)
    actual[12345678] = 0xAB
    with pytest.raises(AssertionError) as info:
        assert_same_bytes(actual, expected, "origin")
    text = str(info.value)
    assert text.startswith("origin: first difference at offset 12345678 (0xbc614e);")
    assert f"{16 << 20} bytes, expected {16 << 20}" in text
    assert "ab 00" in text and len(text) < 400


def test_chunk_lists_name_the_first_bad_chunk() -> None:
    good = [bytes([c]) * 4096 for c in range(4)]
    assert_same_chunks(good, list(good))
    bad = [*good[:2], b"\x09" * 4096, good[3]]
    with pytest.raises(AssertionError, match="chunks, chunk 2: first difference at offset 0"):
        assert_same_chunks(bad, good)
    with pytest.raises(AssertionError, match="3 chunks, expected 4"):
        assert_same_chunks(good[:3], good)
