# The byte comparison the end-to-end tests use: it finds the first differing
# offset wherever it is, and its failure message stays short however large
# the buffers are.
from __future__ import annotations

import pytest

from tests.compare import assert_same_bytes, first_difference

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
