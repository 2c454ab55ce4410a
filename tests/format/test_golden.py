"""A byte-exact image of a small formatted store: its blocks hash to the
recorded digests, and the fields sit where docs/format.md says they do.
"""

from __future__ import annotations

import hashlib
import json
import struct
import uuid
from pathlib import Path

from csnap_format import decode_superblock, format_blocks, plan_geometry
from tests.docs_tables import marked_tables

GOLDEN = Path(__file__).resolve().parent.parent / "data" / "golden_store.json"
UUID = uuid.UUID("6373 6e61 7021 4000 8000 0000 0000 0001".replace(" ", "")).bytes
CREATED_NS = 1_790_000_000_000_000_000

_FORMATS = {"u8": "<B", "s8": "<b", "u16": "<H", "u32": "<I", "u64": "<Q"}


def golden_image() -> dict[int, bytes]:
    """The blocks of a 1 MiB store for a 1 MiB origin, fixed uuid and time."""
    g = plan_geometry(store_bytes=1 << 20, origin_bytes=1 << 20, uuid=UUID, created_ns=CREATED_NS)
    return dict(format_blocks(g))


def digests(image: dict[int, bytes]) -> dict[str, str]:
    return {str(a): hashlib.sha256(b).hexdigest() for a, b in sorted(image.items())}


def test_blocks_match_recorded_digests() -> None:
    recorded = json.loads(GOLDEN.read_text())
    actual = digests(golden_image())
    changed = sorted(
        (a for a in set(recorded) | set(actual) if recorded.get(a) != actual.get(a)),
        key=int,
    )
    assert not changed, f"blocks differ from the golden image: {changed}"


def _field(block: bytes, row: list[str], base: int = 0) -> object:
    offset, kind = int(row[0]) + base, row[2]
    if kind in _FORMATS:
        return struct.unpack_from(_FORMATS[kind], block, offset)[0]
    return block[offset : offset + int(row[1])]


def test_documented_offsets_read_the_golden_values() -> None:
    tables = marked_tables("format.md", "layout")
    block0 = golden_image()[0]
    sb = decode_superblock(block0)
    header = {r[3]: _field(block0, r) for r in tables["HEADER"]}
    assert header["magic"] == b"CSNP"
    assert header["type"] == 1 and header["address"] == 0
    assert header["store_id"] == int.from_bytes(UUID[:8], "little")
    geometry = {r[3]: _field(block0, r, base=40) for r in tables["GEOMETRY"]}
    assert geometry["format_version"] == 1
    assert geometry["incompat_features"] == 3  # index summaries, copy CRCs
    assert geometry["uuid"] == UUID
    assert geometry["created_ns"] == CREATED_NS
    for name in (
        "block_size",
        "chunk_size",
        "store_chunks",
        "origin_chunks",
        "data_start",
    ):
        assert geometry[name] == getattr(sb.geometry, name), name
    assert (geometry["block_size"], geometry["store_chunks"]) == (4096, 256)
    state = {r[3]: _field(block0, r, base=512) for r in tables["STATE"]}
    assert state["state"] == 1
    assert state["root"] == sb.geometry.meta_start
    assert state["data_free"] == sb.geometry.data_chunks


def write_golden() -> None:  # pragma: no cover - run by hand after a format change
    GOLDEN.write_text(json.dumps(digests(golden_image()), indent=1) + "\n")


if __name__ == "__main__":  # pragma: no cover
    write_golden()
