"""Journal commit records.

  bytes 0..40   common header; its sequence is the transaction's sequence
  40  u64       tail sequence: the oldest transaction recovery must replay
  48  u32       count: blocks in this transaction
  52  u32       payload CRC: CRC32 of the transaction's block images, in order
  56  u64[count] home addresses of those blocks
      zero to the end

A transaction occupies count + 1 consecutive journal slots (wrapping at the
end of the journal): the commit record, then the block images in the order
of the address list. The header checksum covers the record; the payload CRC
covers every block it lists (not just the record's first bytes).
See docs/format.md, "Journal", for the write order and recovery rule.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass

from csnap_format._structs import is_zero, u64_array
from csnap_format.constants import HEADER_SIZE, SUPERBLOCK_ADDRESS, BlockType
from csnap_format.errors import CorruptBlockError
from csnap_format.geometry import COMMIT_BODY_OFFSET, commit_capacity
from csnap_format.header import BlockContext, read_header, write_header

__all__ = ["CommitRecord", "encode_commit", "decode_commit", "payload_crc"]

_COMMIT_FIXED = struct.Struct("<QII")


@dataclass(frozen=True, slots=True)
class CommitRecord:
    """A decoded commit record; `address` is its journal slot's block."""

    address: int
    sequence: int
    tail_sequence: int
    payload_crc: int
    homes: tuple[int, ...]


def payload_crc(images: Iterable[bytes | bytearray | memoryview]) -> int:
    """CRC32 over a transaction's block images, in journal order."""
    crc = 0
    for image in images:
        crc = zlib.crc32(image, crc)
    return crc


def encode_commit(record: CommitRecord, ctx: BlockContext) -> bytes:
    """Encode a commit record into one block.

    Raises:
        ValueError: too many homes for one record (a bug in the caller).
    """
    count = len(record.homes)
    if count > commit_capacity(ctx.block_size):
        raise ValueError(f"{count} blocks do not fit in one commit record")
    block = bytearray(ctx.block_size)
    _COMMIT_FIXED.pack_into(block, HEADER_SIZE, record.tail_sequence, count, record.payload_crc)
    u64_array(count).pack_into(block, COMMIT_BODY_OFFSET, *record.homes)
    write_header(block, BlockType.COMMIT, record.address, ctx.store_id, record.sequence)
    return bytes(block)


def decode_commit(
    block: bytes | bytearray | memoryview, ctx: BlockContext, address: int
) -> CommitRecord:
    """Decode and validate a commit record read from journal block `address`.

    Raises:
        FormatError: a subclass naming what is wrong.
    """
    header = read_header(
        block,
        BlockType.COMMIT,
        address=address,
        store_id=ctx.store_id,
        block_size=ctx.block_size,
    )
    tail, count, crc = _COMMIT_FIXED.unpack_from(block, HEADER_SIZE)

    def corrupt(what: str) -> CorruptBlockError:
        return CorruptBlockError(what, block=address, kind="commit record")

    if count > commit_capacity(ctx.block_size):
        raise corrupt(f"block count {count} cannot fit in the record")
    if tail > header.sequence:
        raise corrupt(f"tail sequence {tail} is after the record's own {header.sequence}")
    end = COMMIT_BODY_OFFSET + 8 * count
    if not is_zero(block, end, len(block)):
        raise corrupt("bytes after the last home address are not zero")
    homes = u64_array(count).unpack_from(block, COMMIT_BODY_OFFSET)
    for home in homes:
        if home != SUPERBLOCK_ADDRESS and not ctx.meta_bitmap_start <= home < ctx.meta_end:
            raise corrupt(f"home address {home} is not a journaled metadata block")
    if len(set(homes)) != count:
        raise corrupt("a home address appears twice")
    return CommitRecord(address, header.sequence, tail, crc, homes)
