"""The on-disk structures, declared with construct: the normative definition
of every byte (docs/format.md is checked against these tables by a test).

Why two codecs: these declarations read like the specification and are
what the documentation and the property tests compare against, but
construct parses a 4 KiB leaf in about 3 ms, two hundred times slower than
the struct-based codecs in the sibling modules that the engine uses on its
hot path. A property test proves that both read and write the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from construct import (
    Array,
    Bytes,
    Construct,
    FormatField,
    GreedyBytes,
    IfThenElse,
    Int8sl,
    Int8ul,
    Int16ul,
    Int32ul,
    Int64ul,
    Pointer,
    Renamed,
    SizeofError,
    Struct,
    this,
)

from csnap_format.constants import HEADER_SIZE, MAX_SNAPSHOTS, SECTOR_SIZE

__all__ = [
    "HEADER",
    "GEOMETRY",
    "STATE",
    "RESIZE_STATE",
    "REGISTRY_STATE",
    "SNAPSHOT_RECORD",
    "SUPERBLOCK",
    "GEOMETRY_BACKUP",
    "BITMAP",
    "INDEX_ENTRY",
    "INDEX_SUMMARY_ENTRY",
    "INDEX",
    "LEAF_MAP_ENTRY",
    "EXCEPTION",
    "LEAF",
    "COMMIT",
    "COMMIT_DATA",
    "DATA_RUN",
    "REGISTRY",
    "FieldRow",
    "field_rows",
]

HEADER = Struct(
    "magic" / Bytes(4),
    "type" / Int16ul,
    "reserved1" / Int16ul,
    "checksum" / Int32ul,
    "reserved2" / Int32ul,
    "address" / Int64ul,
    "store_id" / Int64ul,
    "sequence" / Int64ul,
)

GEOMETRY = Struct(
    "format_version" / Int32ul,
    "incompat_features" / Int32ul,
    "compat_features" / Int32ul,
    "reserved" / Int32ul,
    "uuid" / Bytes(16),
    "created_ns" / Int64ul,
    "block_size" / Int32ul,
    "chunk_size" / Int32ul,
    "store_chunks" / Int64ul,
    "origin_chunks" / Int64ul,
    "journal_start" / Int64ul,
    "journal_blocks" / Int64ul,
    "meta_bitmap_start" / Int64ul,
    "meta_bitmap_blocks" / Int64ul,
    "data_bitmap_start" / Int64ul,
    "data_bitmap_blocks" / Int64ul,
    "meta_start" / Int64ul,
    "meta_blocks" / Int64ul,
    "data_start" / Int64ul,
    "data_chunks" / Int64ul,
)

STATE = Struct(
    "state" / Int32ul,
    "depth" / Int32ul,
    "root" / Int64ul,
    "meta_free" / Int64ul,
    "data_free" / Int64ul,
    "meta_cursor" / Int64ul,
    "data_cursor" / Int64ul,
    "sweep_cursor" / Int64ul,
    "sweep_mask" / Int64ul,
    "exceptions" / Int64ul,
    "registry" / Int64ul,
    "fence_token" / Int64ul,
    "fence_ns" / Int64ul,
    "revert_cursor" / Int64ul,
    "revert_restored" / Int64ul,
    "revert_total" / Int64ul,
    "revert_tag" / Int32ul,
    "revert_active" / Int8ul,
    "revert_bit" / Int8ul,
    "revert_reserved" / Int16ul,
)

#: State bytes 128..143 (superblock 640..655): online resizing.
RESIZE_STATE = Struct(
    "resized_ns" / Int64ul,
    "reserved" / Bytes(8),
)

#: State bytes 176..191 (superblock 688..703): which version of the client
#: registry block is current.
REGISTRY_STATE = Struct(
    "registry_sequence" / Int64ul,
    "reserved" / Bytes(8),
)

SNAPSHOT_RECORD = Struct(
    "tag" / Int32ul,
    "state" / Int8ul,
    "priority" / Int8sl,
    "reserved1" / Int16ul,
    "use_count" / Int32ul,
    "reserved2" / Int32ul,
    "created_ns" / Int64ul,
    "origin_chunks" / Int64ul,
    "unique_chunks" / Int64ul,
    "shared_chunks" / Int64ul,
)

_GEOMETRY_PAD = SECTOR_SIZE - 4 - HEADER_SIZE - GEOMETRY.sizeof()
_RESIZE_STATE_AT = 128
assert STATE.sizeof() == _RESIZE_STATE_AT  # resizing state follows at once
_REGISTRY_STATE_AT = 176
_STATE_GAP = _REGISTRY_STATE_AT - _RESIZE_STATE_AT - RESIZE_STATE.sizeof()
_STATE_PAD = 1024 - SECTOR_SIZE - _REGISTRY_STATE_AT - REGISTRY_STATE.sizeof()

SUPERBLOCK = Struct(
    "header" / HEADER,
    "geometry" / GEOMETRY,
    "geometry_reserved" / Bytes(_GEOMETRY_PAD),
    "geometry_crc" / Int32ul,
    "state" / STATE,
    "resize" / RESIZE_STATE,
    "state_gap" / Bytes(_STATE_GAP),
    "client_registry" / REGISTRY_STATE,
    "state_reserved" / Bytes(_STATE_PAD),
    "snapshots" / Array(MAX_SNAPSHOTS, SNAPSHOT_RECORD),
    "reserved" / GreedyBytes,
)
assert SUPERBLOCK.subcons[-2].sizeof() == 3072  # the table fills 1024..4096

GEOMETRY_BACKUP = Struct(
    "header" / HEADER,
    "geometry" / GEOMETRY,
    "geometry_reserved" / Bytes(_GEOMETRY_PAD),
    "geometry_crc" / Int32ul,
    "reserved" / GreedyBytes,
)

BITMAP = Struct(
    "header" / HEADER,
    "bits" / GreedyBytes,
)

INDEX_ENTRY = Struct(
    "key" / Int64ul,
    "child" / Int64ul,
)

INDEX_SUMMARY_ENTRY = Struct(
    "key" / Int64ul,
    "child" / Int64ul,
    "summary" / Int64ul,
)

INDEX = Struct(
    "header" / HEADER,
    "count" / Int16ul,
    "level" / Int16ul,
    "flags" / Int32ul,
    "entries" / Array(this.count, IfThenElse(this.flags & 1, INDEX_SUMMARY_ENTRY, INDEX_ENTRY)),
    "unused" / GreedyBytes,
)

LEAF_MAP_ENTRY = Struct(
    "rchunk" / Int32ul,
    "offset" / Int32ul,
)

EXCEPTION = Struct(
    "share" / Int64ul,
    "chunk" / Int64ul,
)

# Parse with `LEAF.parse(block, block_size=n)`: the exceptions run from the
# first directory offset to the end of the block.
LEAF = Struct(
    "header" / HEADER,
    "base_chunk" / Int64ul,
    "count" / Int32ul,
    "reserved" / Int32ul,
    "map" / Array(this.count + 1, LEAF_MAP_ENTRY),
    "exceptions"
    / Pointer(
        lambda ctx: ctx.map[0].offset,
        Array(lambda ctx: (ctx._params.block_size - ctx.map[0].offset) // 16, EXCEPTION),
    ),
)

REGISTRY = Struct(
    "header" / HEADER,
    "count" / Int32ul,
    "flags" / Int32ul,
    "clients" / Array(this.count, Int64ul),
    "unused" / GreedyBytes,
)

COMMIT = Struct(
    "header" / HEADER,
    "tail_sequence" / Int64ul,
    "count" / Int32ul,
    "payload_crc" / Int32ul,
    "homes" / Array(this.count, Int64ul),
    "unused" / GreedyBytes,
)

# Right after a commit record's home addresses (when 8 bytes remain).
DATA_RUN = Struct(
    "first_chunk" / Int64ul,
    "chunks" / Int32ul,
    "crc" / Int32ul,
)

COMMIT_DATA = Struct(
    "runs" / Int32ul,
    "reserved" / Int32ul,
    "data" / Array(this.runs, DATA_RUN),
)


@dataclass(frozen=True, slots=True)
class FieldRow:
    """One row of a field table: where a fixed-size field sits and what it is."""

    offset: int
    size: int
    type: str
    name: str


_TYPE_NAMES = {"<B": "u8", "<b": "s8", "<H": "u16", "<L": "u32", "<Q": "u64"}


def _type_name(subcon: Construct[Any, Any]) -> str:
    if isinstance(subcon, FormatField):
        return _TYPE_NAMES[subcon.fmtstr]
    if isinstance(subcon, Bytes):
        return f"bytes[{subcon.sizeof()}]"
    return type(subcon).__name__


def field_rows(layout: Struct) -> list[FieldRow]:
    """The fixed-size fields of `layout`, in order, with their byte offsets.

    Nested structs are named by their own table; the walk stops at the first
    field whose size depends on the data.
    """
    rows, offset = [], 0
    for named in layout.subcons:
        if not isinstance(named, Renamed) or named.name is None:
            raise TypeError("every field of a layout must be named")
        subcon = named.subcon
        try:
            size = subcon.sizeof()
        except SizeofError:
            break
        if isinstance(subcon, Struct):
            kind = named.name
        elif isinstance(subcon, Array):
            element = subcon.subcon
            inner = "record" if isinstance(element, Struct) else _type_name(element)
            kind = f"{inner}[{subcon.count}]"
        else:
            kind = _type_name(subcon)
        rows.append(FieldRow(offset, size, kind, named.name))
        offset += size
    return rows
