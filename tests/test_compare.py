"""The byte comparison the end-to-end tests use: it finds the first differing
offset wherever it is, and its failure message stays short however large
the buffers are.
"""

from __future__ import annotations

import pytest

from tests.compare import assert_same_bytes, assert_same_chunks, first_difference

SIZE = 16 << 20


def test_first_difference_anywhere() -> None:
    image = bytes(range(256)) * (SIZE // 256)
    assert first_difference(image, bytearray(image)) is None
    for offset in (0, 1, (1 << 16) - 1, 1 << 16, SIZE // 2 + 7, SIZE - 1):
        changed = bytearray(image)
        changed[offset] ^= 0xFF
        changed[-1] ^= 0x01 if offset != SIZE - 1 else 0
        assert first_difference(changed, image) == offset
    assert first_difference(image[:100], image) == 100  # a prefix differs at its end
    assert first_difference(b"", b"") is None


def test_a_failure_names_the_offset_and_stays_short() -> None:
    image = bytes(SIZE)
    changed = bytearray(image)
    changed[3_000_000 : 3_000_000 + 5000] = b"\x01" * 5000
    assert_same_bytes(image, bytes(SIZE))
    with pytest.raises(AssertionError) as failure:
        assert_same_bytes(changed, image, "snap-1")
    message = str(failure.value)
    assert message.startswith("snap-1: first difference at offset 3000000 (0x2dc6c0)")
    assert "5000 bytes differ" in message
    assert len(message) < 400


def test_the_first_difference_is_found_at_every_position() -> None:
    base = bytes(range(256)) * 64
    assert first_difference(base, base) is None
    for at in (0, 1, 255, 8191, len(base) - 1):
        other = bytearray(base)
        other[at] ^= 0xFF
        assert first_difference(base, other) == at
    assert first_difference(base, base[:-3]) == len(base) - 3
    assert first_difference(b"", b"x") == 0


def test_chunk_lists_name_the_first_bad_chunk() -> None:
    good = [bytes([c]) * 4096 for c in range(4)]
    assert_same_chunks(good, list(good))
    bad = [*good[:2], b"\x09" * 4096, good[3]]
    with pytest.raises(AssertionError, match="chunks, chunk 2: first difference at offset 0"):
        assert_same_chunks(bad, good)
    with pytest.raises(AssertionError, match="3 chunks, expected 4"):
        assert_same_chunks(good[:3], good)
