"""Decoding arbitrary or damaged bytes raises a FormatError subclass, never
anything else, and never returns a structure from damaged bytes.
"""

from __future__ import annotations

import contextlib
import struct
import zlib
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from csnap_format import (
    BadMagicError,
    BlockContext,
    ChecksumError,
    CorruptBlockError,
    ForeignBlockError,
    FormatError,
    Geometry,
    MisdirectedBlockError,
    Registry,
    UnsupportedVersionError,
    WrongBlockTypeError,
    block_checksum,
    decode_bitmap,
    decode_commit,
    decode_geometry,
    decode_index,
    decode_leaf,
    decode_registry,
    decode_superblock,
    encode_commit,
    encode_index,
    encode_leaf,
    encode_registry,
    encode_superblock,
    format_blocks,
)
from tests.format.strategies import commit_records, index_nodes, leaves, small_geometry

G = small_geometry()
CTX = G.context
B = G.block_size


def reseal(block: bytearray) -> bytes:
    """Recompute the header checksum, so that field validation is reached."""
    struct.pack_into("<I", block, 8, block_checksum(block))
    return bytes(block)


Decoder = Callable[[bytes], object]
DECODERS: dict[str, Decoder] = {
    "superblock": decode_superblock,
    "geometry": decode_geometry,
    "bitmap": lambda b: decode_bitmap(b, CTX, G.meta_bitmap_start),
    "leaf": lambda b: decode_leaf(b, CTX, G.meta_start),
    "index": lambda b: decode_index(b, CTX, G.meta_start),
    "commit": lambda b: decode_commit(b, CTX, G.journal_start),
    "registry": lambda b: decode_registry(b, CTX, G.meta_start),
}


def _valid_blocks() -> dict[str, bytes]:
    image = dict(format_blocks(G))
    return {
        "superblock": image[0],
        "geometry": image[0],
        "bitmap": image[G.meta_bitmap_start],
        "leaf": encode_leaf(
            __import__("csnap_format").Leaf(
                G.meta_start, 3, 0, (5, 9), (1, 2), (1, 2, 4), (G.data_start,) * 3
            ),
            CTX,
        ),
        "index": encode_index(
            __import__("csnap_format").IndexNode(
                G.meta_start, 3, 1, (0, 100), (G.meta_start + 1, G.meta_start + 2)
            ),
            CTX,
        ),
        "commit": image[G.journal_start],
        "registry": encode_registry(Registry(G.meta_start, 4, (3, 9, 12), False), CTX),
    }


VALID = _valid_blocks()


@pytest.mark.parametrize("name", sorted(DECODERS))
def test_valid_sample_blocks_decode(name: str) -> None:
    DECODERS[name](VALID[name])


@pytest.mark.parametrize("name", sorted(DECODERS))
@given(data=st.binary(max_size=2 * B))
def test_arbitrary_bytes_raise_only_format_error(name: str, data: bytes) -> None:
    with pytest.raises(FormatError):
        DECODERS[name](data)


@pytest.mark.parametrize("name", sorted(DECODERS))
@given(st.data())
def test_mutated_blocks_raise_only_format_error(name: str, data: st.DataObject) -> None:
    block = bytearray(VALID[name])
    positions = data.draw(st.lists(st.integers(0, B - 1), min_size=1, max_size=8))
    for at in positions:
        block[at] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        mutated = reseal(block)
    else:
        mutated = bytes(block)
    with contextlib.suppress(FormatError):
        DECODERS[name](mutated)


@pytest.mark.parametrize("name", sorted(DECODERS))
@given(st.data())
def test_resealed_field_mutations_raise_only_format_error(name: str, data: st.DataObject) -> None:
    """Mutations of the first few hundred bytes, checksum fixed up: the
    field validation itself must hold the line."""
    block = bytearray(VALID[name])
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(12, min(B, 1200) - 1))
        block[at] = data.draw(st.integers(0, 255))
    with contextlib.suppress(FormatError):
        DECODERS[name](reseal(block))


def test_bit_flip_is_a_checksum_error() -> None:
    block = bytearray(VALID["leaf"])
    block[100] ^= 0x10
    with pytest.raises(ChecksumError, match="leaf at block"):
        decode_leaf(bytes(block), CTX, G.meta_start)


def test_never_written_block_says_so() -> None:
    with pytest.raises(BadMagicError, match="never written"):
        decode_leaf(bytes(B), CTX, G.meta_start)


def test_misdirected_block_names_both_addresses() -> None:
    with pytest.raises(MisdirectedBlockError, match=f"at block {G.meta_start + 7}"):
        decode_leaf(VALID["leaf"], CTX, G.meta_start + 7)


def test_block_of_another_store_is_foreign() -> None:
    other = BlockContext(**{**{f: getattr(CTX, f) for f in CTX.__slots__}, "store_id": 1})
    with pytest.raises(ForeignBlockError, match="earlier format"):
        decode_leaf(VALID["leaf"], other, G.meta_start)


def test_wrong_block_type_is_named() -> None:
    with pytest.raises(WrongBlockTypeError, match="expected a leaf, found a index node"):
        decode_leaf(VALID["index"], CTX, G.meta_start)


def test_future_version_is_refused() -> None:
    block = bytearray(VALID["superblock"])
    struct.pack_into("<I", block, 40, 2)
    struct.pack_into("<I", block, 508, zlib.crc32(block[40:508]))
    with pytest.raises(UnsupportedVersionError, match="format version 2"):
        decode_geometry(bytes(block))


def test_torn_superblock_keeps_its_geometry() -> None:
    """A write torn after the first sector loses the state, not the geometry."""
    old = VALID["superblock"]
    new = bytearray(old)
    struct.pack_into("<Q", new, 32, 99)  # a later sequence
    struct.pack_into("<Q", new, 520, G.meta_start + 1)  # a new root
    new_block = reseal(new)
    torn = new_block[:512] + old[512:]
    assert decode_geometry(torn) == G
    with pytest.raises(ChecksumError):
        decode_superblock(torn)


def test_leaf_chunk_beyond_origin_is_corrupt() -> None:
    from csnap_format import Leaf

    leaf = Leaf(G.meta_start, 1, 0, (G.origin_chunks,), (1,), (1,), (G.data_start,))
    with pytest.raises(CorruptBlockError, match="beyond the origin"):
        decode_leaf(encode_leaf(leaf, CTX), CTX, G.meta_start)


def test_leaf_exception_outside_data_area_is_corrupt() -> None:
    from csnap_format import Leaf

    leaf = Leaf(G.meta_start, 1, 0, (3,), (1,), (1,), (G.data_start - 1,))
    with pytest.raises(CorruptBlockError, match="outside the data area"):
        decode_leaf(encode_leaf(leaf, CTX), CTX, G.meta_start)


def test_leaf_overlapping_share_masks_are_corrupt() -> None:
    from csnap_format import Leaf

    leaf = Leaf(G.meta_start, 1, 0, (3,), (2,), (3, 2), (G.data_start, G.data_start + 1))
    with pytest.raises(CorruptBlockError, match="share a snapshot"):
        decode_leaf(encode_leaf(leaf, CTX), CTX, G.meta_start)


def test_commit_home_in_journal_is_corrupt() -> None:
    from csnap_format import CommitRecord

    record = CommitRecord(G.journal_start, 5, 4, 0, (G.journal_start + 3,))
    with pytest.raises(CorruptBlockError, match="not a journaled metadata block"):
        decode_commit(encode_commit(record, CTX), CTX, G.journal_start)


def test_superblock_root_outside_metadata_area_is_corrupt() -> None:
    block = bytearray(VALID["superblock"])
    struct.pack_into("<Q", block, 520, 3)
    with pytest.raises(CorruptBlockError, match="outside the metadata area"):
        decode_superblock(reseal(block))


@given(st.data())
def test_generated_structures_fail_when_read_at_another_address(
    data: st.DataObject,
) -> None:
    leaf: Any = data.draw(leaves(G))
    node: Any = data.draw(index_nodes(G))
    record: Any = data.draw(commit_records(G))
    with pytest.raises(MisdirectedBlockError):
        decode_leaf(encode_leaf(leaf, CTX), CTX, leaf.address + 1)
    with pytest.raises(MisdirectedBlockError):
        decode_index(encode_index(node, CTX), CTX, node.address + 1)
    with pytest.raises(MisdirectedBlockError):
        decode_commit(encode_commit(record, CTX), CTX, record.address + 1)


def test_superblock_encode_of_geometry_is_stable() -> None:
    """The first sector (less checksum and sequence) never changes."""
    from dataclasses import replace

    from csnap_format import empty_superblock

    sb = empty_superblock(G)
    a = encode_superblock(sb)
    b = encode_superblock(replace(sb, sequence=77, clean=False, data_free=3))
    assert a[12:32] == b[12:32] and a[40:512] == b[40:512]


def test_geometry_type_is_used_for_the_dataclass() -> None:
    assert isinstance(decode_geometry(VALID["geometry"]), Geometry)
