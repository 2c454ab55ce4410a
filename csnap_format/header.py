"""The common header that starts every metadata block, and its checksum.

  offset size  field
       0    4  magic     b"CSNP"
       4    2  type      BlockType
       6    2  reserved  0
       8    4  checksum  CRC32 of the whole block except these four bytes
      12    4  reserved  0
      16    8  address   the block's own address, in metadata blocks
      24    8  store id  first 8 bytes of the store UUID, little-endian
      32    8  sequence  journal sequence of the transaction that wrote it

The address catches misdirected writes and reads; the store id catches
blocks left over from an earlier format of the same device; the checksum
catches torn and garbage writes. Checks run in an order that gives the most
useful message: magic, checksum, type, address, store id, reserved fields.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from csnap_format.checksum import crc32
from csnap_format.constants import HEADER_SIZE, MAGIC, BlockType
from csnap_format.errors import (
    BadMagicError,
    ChecksumError,
    CorruptBlockError,
    ForeignBlockError,
    FormatError,
    MisdirectedBlockError,
    WrongBlockTypeError,
)

__all__ = [
    "BlockContext",
    "BlockHeader",
    "block_checksum",
    "read_header",
    "write_header",
    "KIND_NAMES",
]

_HEADER = struct.Struct("<4sHHIIQQQ")
assert _HEADER.size == HEADER_SIZE
_CHECKSUM_AT = 8

#: How each block type is named in error messages.
KIND_NAMES = {
    BlockType.SUPERBLOCK: "superblock",
    BlockType.GEOMETRY: "geometry backup",
    BlockType.BITMAP: "bitmap block",
    BlockType.INDEX: "index node",
    BlockType.LEAF: "leaf",
    BlockType.COMMIT: "commit record",
    BlockType.REGISTRY: "client registry",
}


@dataclass(frozen=True, slots=True)
class BlockContext:
    """What the block codecs need to know about the store a block belongs to.

    The bounds let decoders refuse out-of-range addresses, so that no caller
    ever follows a pointer a damaged block made up.
    """

    store_id: int
    block_size: int
    #: First block of the bitmaps (everything from here to `meta_end` and
    #: block 0 may be a journal home address).
    meta_bitmap_start: int
    #: The metadata area: btree nodes live in [meta_start, meta_end).
    meta_start: int
    meta_end: int
    #: The data area: exceptions point at chunks in [data_start, store_chunks).
    data_start: int
    store_chunks: int
    #: Logical chunks (btree keys) are below this.
    origin_chunks: int


@dataclass(frozen=True, slots=True)
class BlockHeader:
    """The decoded common header of a metadata block."""

    kind: BlockType
    address: int
    store_id: int
    sequence: int


def block_checksum(block: bytes | bytearray | memoryview) -> int:
    """CRC32 of a whole metadata block, skipping its checksum field."""
    view = memoryview(block)
    return crc32(view[_CHECKSUM_AT + 4 :], crc32(view[:_CHECKSUM_AT]))


def write_header(
    block: bytearray, kind: BlockType, address: int, store_id: int, sequence: int
) -> None:
    """Fill in the header of `block` (whose body is already written) and seal it."""
    _HEADER.pack_into(block, 0, MAGIC, kind, 0, 0, 0, address, store_id, sequence)
    struct.pack_into("<I", block, _CHECKSUM_AT, block_checksum(block))


def read_header(
    block: bytes | bytearray | memoryview,
    kind: BlockType,
    *,
    address: int | None,
    store_id: int | None,
    block_size: int | None = None,
) -> BlockHeader:
    """Verify the header and checksum of `block` and return the header.

    Args:
        block: the bytes read from the store.
        kind: the block type the caller expects.
        address: where the block was read from, or None to skip that check
            (journal images carry their home address, not their slot's).
        store_id: the store's id, or None when it is not known yet.
        block_size: the expected length, if the caller knows it.

    Raises:
        FormatError: a subclass saying what is wrong.
    """
    name = KIND_NAMES[kind]
    if (block_size is not None and len(block) != block_size) or len(block) < HEADER_SIZE:
        raise _length_error(len(block), block_size, address, name)
    magic, raw_type, reserved1, stored, reserved2, own_address, own_store, sequence = (
        _HEADER.unpack_from(block, 0)
    )
    if magic != MAGIC:
        raise _magic_error(block, magic, address, name)
    computed = block_checksum(block)
    if stored != computed:
        raise ChecksumError(
            f"checksum mismatch (stored {stored:#010x}, computed {computed:#010x}):"
            " torn or damaged write",
            block=address,
            kind=name,
        )
    if raw_type != kind:
        raise _type_error(raw_type, address, name)
    if address is not None and own_address != address:
        raise MisdirectedBlockError(
            f"block names address {own_address}: misdirected write or read",
            block=address,
            kind=name,
        )
    if store_id is not None and own_store != store_id:
        raise ForeignBlockError(
            f"belongs to store id {own_store:#018x}, not {store_id:#018x}"
            " (left over from an earlier format?)",
            block=address,
            kind=name,
        )
    if reserved1 or reserved2:
        raise CorruptBlockError("reserved header fields are not zero", block=address, kind=name)
    return BlockHeader(BlockType(raw_type), own_address, own_store, sequence)


_TYPES = frozenset(int(t) for t in BlockType)


# The errors read_header raises, built apart so that its checks read at once.


def _length_error(
    length: int, block_size: int | None, address: int | None, name: str
) -> FormatError:
    """A block of the wrong length, or too short to hold a header."""
    if block_size is not None and length != block_size:
        return CorruptBlockError(
            f"expected {block_size} bytes, got {length}", block=address, kind=name
        )
    return BadMagicError(
        f"only {length} bytes, shorter than a block header", block=address, kind=name
    )


def _magic_error(
    block: bytes | bytearray | memoryview, magic: bytes, address: int | None, name: str
) -> FormatError:
    """A block without csnap's magic: never written, or not a metadata block."""
    what = (
        "not a csnap metadata block (all zeros: never written)"
        if not any(block)
        else f"not a csnap metadata block (magic {magic!r})"
    )
    return BadMagicError(what, block=address, kind=name)


def _type_error(raw_type: int, address: int | None, name: str) -> FormatError:
    """A block of another type than the one expected."""
    found = KIND_NAMES.get(BlockType(raw_type)) if raw_type in _TYPES else None
    return WrongBlockTypeError(
        f"expected a {name}, found "
        + (f"a {found}" if found else f"unknown block type {raw_type}"),
        block=address,
        kind=name,
    )
