"""Journal commit records.

  bytes 0..40   common header; its sequence is the transaction's sequence
  40  u64       tail sequence: the oldest transaction recovery must replay
  48  u32       count: blocks in this transaction
  52  u32       payload CRC: CRC32 of the transaction's block images, in order
  56  u64[count] home addresses of those blocks
      then, where at least 8 bytes remain after them, the copied data:
  +0  u32       runs: runs of copied data chunks the transaction wrote
  +4  u32       reserved, zero
  +8  runs x 16 bytes: u64 first store chunk, u32 chunks, u32 CRC32 of
                those chunks' bytes, in order
      zero to the end

A transaction occupies count + 1 consecutive journal slots (wrapping at the
end of the journal): the commit record, then the block images in the order
of the address list. The header checksum covers the record; the payload CRC
covers every block it lists (not just the record's first bytes); each data
run's CRC covers the copy-out data the transaction's metadata points at, so
that one sync can make the data and the record durable together. A record
written before data runs existed has zeros after its addresses: no runs.
See docs/format.md, "Journal", for the write order and recovery rule.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from csnap_format._structs import is_zero, u64_array
from csnap_format.checksum import crc32
from csnap_format.constants import HEADER_SIZE, SUPERBLOCK_ADDRESS, BlockType
from csnap_format.errors import CorruptBlockError
from csnap_format.geometry import COMMIT_BODY_OFFSET, commit_capacity
from csnap_format.header import BlockContext, read_header, write_header

__all__ = [
    "CommitRecord",
    "DataRun",
    "encode_commit",
    "decode_commit",
    "payload_crc",
    "commit_fits",
]

_COMMIT_FIXED = struct.Struct("<QII")
_DATA_HEAD = struct.Struct("<II")
_DATA_RUN = struct.Struct("<QII")


@dataclass(frozen=True, slots=True)
class DataRun:
    """Consecutive store chunks of copy-out data a transaction wrote, and their CRC32."""

    first_chunk: int
    chunks: int
    crc: int


@dataclass(frozen=True, slots=True)
class CommitRecord:
    """A decoded commit record; `address` is its journal slot's block."""

    address: int
    sequence: int
    tail_sequence: int
    payload_crc: int
    homes: tuple[int, ...]
    #: Copy-out data written by the transaction and synced with its record.
    data: tuple[DataRun, ...] = ()


def commit_fits(block_size: int, blocks: int, runs: int) -> bool:
    """Whether a record listing `blocks` homes and `runs` data runs fits one block."""
    used = COMMIT_BODY_OFFSET + 8 * blocks
    if runs:
        used += _DATA_HEAD.size + _DATA_RUN.size * runs
    return used <= block_size


def payload_crc(images: Iterable[bytes | bytearray | memoryview]) -> int:
    """CRC32 over a transaction's block images, in journal order."""
    crc = 0
    for image in images:
        crc = crc32(image, crc)
    return crc


def encode_commit(record: CommitRecord, ctx: BlockContext) -> bytes:
    """Encode a commit record into one block.

    Raises:
        ValueError: too many homes for one record (a bug in the caller).
    """
    count = len(record.homes)
    if count > commit_capacity(ctx.block_size) or not commit_fits(
        ctx.block_size, count, len(record.data)
    ):
        raise ValueError(
            f"{count} blocks and {len(record.data)} data runs do not fit in one commit record"
        )
    block = bytearray(ctx.block_size)
    _COMMIT_FIXED.pack_into(block, HEADER_SIZE, record.tail_sequence, count, record.payload_crc)
    u64_array(count).pack_into(block, COMMIT_BODY_OFFSET, *record.homes)
    if record.data:
        at = COMMIT_BODY_OFFSET + 8 * count
        _DATA_HEAD.pack_into(block, at, len(record.data), 0)
        at += _DATA_HEAD.size
        for run in record.data:
            _DATA_RUN.pack_into(block, at, run.first_chunk, run.chunks, run.crc)
            at += _DATA_RUN.size
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
    data = _decode_data(block, end, ctx, corrupt)
    homes = u64_array(count).unpack_from(block, COMMIT_BODY_OFFSET)
    for home in homes:
        if home != SUPERBLOCK_ADDRESS and not ctx.meta_bitmap_start <= home < ctx.meta_end:
            raise corrupt(f"home address {home} is not a journaled metadata block")
    if len(set(homes)) != count:
        raise corrupt("a home address appears twice")
    return CommitRecord(address, header.sequence, tail, crc, homes, data)


def _decode_data(
    block: bytes | bytearray | memoryview,
    at: int,
    ctx: BlockContext,
    corrupt: Callable[[str], CorruptBlockError],
) -> tuple[DataRun, ...]:
    """The data runs after the home addresses ending at `at`, validated."""
    size = len(block)
    if at + _DATA_HEAD.size > size:
        if not is_zero(block, at, size):
            raise corrupt("bytes after the last home address are not zero")
        return ()
    runs, reserved = _DATA_HEAD.unpack_from(block, at)
    if reserved:
        raise corrupt("the data runs' reserved field is not zero")
    at += _DATA_HEAD.size
    if runs > (size - at) // _DATA_RUN.size:
        raise corrupt(f"{runs} data runs cannot fit in the record")
    data = []
    for _ in range(runs):
        first, chunks, crc = _DATA_RUN.unpack_from(block, at)
        at += _DATA_RUN.size
        if not chunks or first < ctx.data_start or first + chunks > ctx.store_chunks:
            raise corrupt(f"data run of {chunks} chunks at {first} is not in the data area")
        data.append(DataRun(first, chunks, crc))
    if not is_zero(block, at, size):
        raise corrupt("bytes after the last data run are not zero")
    return tuple(data)
