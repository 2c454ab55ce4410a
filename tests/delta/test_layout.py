"""The delta file layout: docs/format.md's tables say what the structs say;
a header and records round-trip; damage anywhere in a file is refused by
apply, which then leaves its target untouched.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from csnap_delta import DeltaFormatError, DeltaRefusedError, apply_delta
from csnap_delta.layout import (
    FLAG_ZSTD,
    LAYOUTS,
    DeltaEnd,
    DeltaHeader,
    ExtentHeader,
    SequenceDigest,
    compress,
    digest,
    field_rows,
)
from tests.docs_tables import marked_tables

TABLES = marked_tables("format.md", "delta")
CHUNK = 4096
CHUNKS = 64


def test_every_part_is_documented_as_declared() -> None:
    assert set(TABLES) == set(LAYOUTS)
    for name, rows in TABLES.items():
        documented = [(int(r[0]), int(r[1]), r[2], r[3]) for r in rows]
        assert documented == field_rows(name), name
        assert all(r[4] for r in rows), f"{name}: a field has no meaning written"


def make_delta(
    path: Path, base: bytes, new: bytes, extents: list[tuple[int, int]], *, packed: bool
) -> None:
    """A delta from image `base` to image `new` over `extents`, as csnap delta lays it out."""
    header = DeltaHeader(
        FLAG_ZSTD if packed else 0, CHUNK, bytes(range(16)), CHUNKS, 1, 2, 10, 20, 30
    )
    sequence = SequenceDigest()
    out = [header.encode()]
    total = 0
    for number, (first, count) in enumerate(extents):
        span = slice(first * CHUNK, (first + count) * CHUNK)
        payload: bytes = new[span]
        flags = 0
        if packed and (frame := compress(payload)) is not None:
            payload, flags = frame, FLAG_ZSTD
        record = ExtentHeader(
            number, first, count, len(payload), flags, digest(base[span]), digest(new[span])
        ).encode()
        sequence.add(record)
        out += [record, payload]
        total += count
    out.append(DeltaEnd(len(extents), total, sequence.digest()).encode())
    path.write_bytes(b"".join(out))


def images() -> tuple[bytes, bytes, list[tuple[int, int]]]:
    rng = random.Random(7)
    base = bytearray(rng.randbytes(CHUNKS * CHUNK))
    new = bytearray(base)
    extents = [(2, 3), (10, 1), (40, 20)]
    for first, count in extents:
        new[first * CHUNK : (first + count) * CHUNK] = bytes([first]) * (count * CHUNK)
    return bytes(base), bytes(new), extents


@pytest.mark.parametrize("packed", [False, True])
def test_apply_makes_the_new_image_and_again_changes_nothing(tmp_path: Path, packed: bool) -> None:
    base, new, extents = images()
    delta, target = tmp_path / "d", tmp_path / "t"
    make_delta(delta, base, new, extents, packed=packed)
    target.write_bytes(base)
    report = apply_delta(delta, target)
    assert (report.extents, report.chunks, report.written_chunks) == (3, 24, 24)
    assert target.read_bytes() == new
    report = apply_delta(delta, target)
    assert (report.written_chunks, report.already_chunks) == (0, 24)
    assert target.read_bytes() == new


def test_damage_anywhere_is_refused_and_writes_nothing(tmp_path: Path) -> None:
    base, new, extents = images()
    delta, target = tmp_path / "d", tmp_path / "t"
    make_delta(delta, base, new, extents, packed=True)
    good = delta.read_bytes()
    rng = random.Random(3)
    positions = sorted({rng.randrange(len(good)) for _ in range(60)} | {0, len(good) - 1})
    for position in positions:
        damaged = bytearray(good)
        damaged[position] ^= 1 << rng.randrange(8)
        delta.write_bytes(bytes(damaged))
        target.write_bytes(base)
        with pytest.raises(DeltaFormatError):
            apply_delta(delta, target)
        assert target.read_bytes() == base, position
    for cut in (0, 10, 128, 130, len(good) - 64, len(good) - 1):
        delta.write_bytes(good[:cut])
        with pytest.raises(DeltaFormatError):
            apply_delta(delta, target)
        assert target.read_bytes() == base, cut
    delta.write_bytes(good + b"\0")
    with pytest.raises(DeltaFormatError, match="follow the end"):
        apply_delta(delta, target)
    # The right delta on the wrong image: refused, untouched.
    delta.write_bytes(good)
    wrong = bytearray(base)
    wrong[41 * CHUNK] ^= 1
    target.write_bytes(bytes(wrong))
    with pytest.raises(DeltaRefusedError, match=r"chunks 40\.\.59"):
        apply_delta(delta, target)
    assert target.read_bytes() == bytes(wrong)
    os.truncate(target, CHUNKS * CHUNK - 1)
    with pytest.raises(DeltaRefusedError, match="bytes"):
        apply_delta(delta, target)
