"""Allocation bitmap blocks.

  bytes 0..40   common header
  bytes 40..    bits, least significant bit first within each byte

Bit i of bitmap block k of a space stands for unit k * bits_per_block + i of
that space: a metadata block (metadata area bitmap, counted from the area's
first block) or a store chunk (data bitmap, counted from chunk 0 of the
store). A set bit is in use. Units that the layout itself occupies, and bits
past the end of the space, are set at format time and stay set.
"""

from __future__ import annotations

from dataclasses import dataclass

from csnap_format.constants import HEADER_SIZE, BlockType
from csnap_format.header import BlockContext, read_header, write_header

__all__ = ["BitmapBlock", "encode_bitmap", "decode_bitmap"]


@dataclass(frozen=True, slots=True)
class BitmapBlock:
    """One bitmap block: its address, the sequence that wrote it, its bits."""

    address: int
    sequence: int
    #: (block_size - 40) bytes; bit i is (bits[i // 8] >> (i % 8)) & 1.
    bits: bytes


def encode_bitmap(bitmap: BitmapBlock, ctx: BlockContext) -> bytes:
    """Encode a bitmap block; `bits` must fill the block exactly."""
    if len(bitmap.bits) != ctx.block_size - HEADER_SIZE:
        raise ValueError(
            f"bitmap body is {len(bitmap.bits)} bytes, expected {ctx.block_size - HEADER_SIZE}"
        )
    block = bytearray(HEADER_SIZE) + bitmap.bits
    write_header(block, BlockType.BITMAP, bitmap.address, ctx.store_id, bitmap.sequence)
    return bytes(block)


def decode_bitmap(
    block: bytes | bytearray | memoryview, ctx: BlockContext, address: int
) -> BitmapBlock:
    """Decode a bitmap block read from `address`.

    Raises:
        FormatError: a subclass naming what is wrong.
    """
    header = read_header(
        block,
        BlockType.BITMAP,
        address=address,
        store_id=ctx.store_id,
        block_size=ctx.block_size,
    )
    return BitmapBlock(address, header.sequence, bytes(block[HEADER_SIZE:]))
