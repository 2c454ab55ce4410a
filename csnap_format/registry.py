"""The client registry block.

  bytes 0..40  common header
  40  u32      count: client ids that follow
  44  u32      flags: bit 0 set when more clients were connected than fit
  48  u64[count] client ids, ascending
      zero to the end

The server keeps here the ids of the snapshot clients connected to it, so
that after a crash it knows whose read locks to wait for before it lets
origin writes through (docs/protocol.md, "Reconnecting").
"""

from __future__ import annotations

import itertools
import struct
from dataclasses import dataclass

from csnap_format._structs import is_zero, u64_array
from csnap_format.constants import HEADER_SIZE, BlockType
from csnap_format.errors import CorruptBlockError
from csnap_format.header import BlockContext, read_header, write_header

__all__ = ["Registry", "encode_registry", "decode_registry", "registry_capacity", "OVERFLOW"]

_FIXED = struct.Struct("<II")
_BODY = HEADER_SIZE + _FIXED.size
#: Flag: more clients were connected than the block holds.
OVERFLOW = 1


def registry_capacity(block_size: int) -> int:
    """Client ids one registry block holds."""
    return (block_size - _BODY) // 8


@dataclass(frozen=True, slots=True)
class Registry:
    """A decoded client registry."""

    address: int
    sequence: int
    clients: tuple[int, ...]
    overflow: bool


def encode_registry(registry: Registry, ctx: BlockContext) -> bytes:
    """Encode a registry block.

    Raises:
        ValueError: too many ids, or not ascending (a bug in the caller).
    """
    count = len(registry.clients)
    if count > registry_capacity(ctx.block_size) or list(registry.clients) != sorted(
        set(registry.clients)
    ):
        raise ValueError("registry ids must be distinct, ascending, and fit the block")
    block = bytearray(ctx.block_size)
    _FIXED.pack_into(block, HEADER_SIZE, count, OVERFLOW if registry.overflow else 0)
    u64_array(count).pack_into(block, _BODY, *registry.clients)
    write_header(block, BlockType.REGISTRY, registry.address, ctx.store_id, registry.sequence)
    return bytes(block)


def decode_registry(
    block: bytes | bytearray | memoryview, ctx: BlockContext, address: int
) -> Registry:
    """Decode and validate a registry block read from `address`.

    Raises:
        FormatError: a subclass naming what is wrong.
    """
    header = read_header(
        block, BlockType.REGISTRY, address=address, store_id=ctx.store_id, block_size=ctx.block_size
    )
    count, flags = _FIXED.unpack_from(block, HEADER_SIZE)

    def corrupt(what: str) -> CorruptBlockError:
        return CorruptBlockError(what, block=address, kind="client registry")

    if count > registry_capacity(ctx.block_size):
        raise corrupt(f"count {count} cannot fit in the block")
    if flags & ~OVERFLOW:
        raise corrupt(f"unknown flags {flags:#x}")
    end = _BODY + 8 * count
    if not is_zero(block, end, len(block)):
        raise corrupt("bytes after the last client id are not zero")
    clients = u64_array(count).unpack_from(block, _BODY)
    if any(a >= b for a, b in itertools.pairwise(clients)):
        raise corrupt("client ids are not strictly ascending")
    return Registry(address, header.sequence, clients, bool(flags & OVERFLOW))
