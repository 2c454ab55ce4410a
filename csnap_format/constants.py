"""Constants of the on-disk format: magic, version, block types and limits.

Every number here is part of the format (docs/format.md); changing one
changes what older servers can read, so FORMAT_VERSION must move with it.
"""

from __future__ import annotations

import enum

__all__ = [
    "MAGIC",
    "FORMAT_VERSION",
    "BlockType",
    "SnapshotState",
    "HEADER_SIZE",
    "SECTOR_SIZE",
    "MIN_BLOCK_SIZE",
    "MAX_BLOCK_SIZE",
    "MIN_CHUNK_SIZE",
    "MAX_CHUNK_SIZE",
    "MAX_SNAPSHOTS",
    "MAX_DEPTH",
    "MAX_TAG",
    "MIN_JOURNAL_BLOCKS",
    "SUPERBLOCK_ADDRESS",
    "GEOMETRY_BACKUP_ADDRESS",
    "JOURNAL_START",
    "U64_MAX",
    "LOST_CHUNK",
]

#: The first four bytes of every metadata block.
MAGIC = b"CSNP"
#: Bumped on any incompatible change; a server refuses any other version.
FORMAT_VERSION = 1

#: Size of the common header that starts every metadata block.
HEADER_SIZE = 40
#: Writes are assumed atomic per 512-byte sector, never per block; the
#: superblock's geometry lives in its first sector for that reason.
SECTOR_SIZE = 512

#: Metadata blocks and data chunks are powers of two in this range.
MIN_BLOCK_SIZE = 4096
MAX_BLOCK_SIZE = 1 << 20
MIN_CHUNK_SIZE = 4096
MAX_CHUNK_SIZE = 1 << 20

#: Share masks are 64 bits wide: one bit per snapshot.
MAX_SNAPSHOTS = 64
#: Index levels above the leaves. With at least 253 children per index node,
#: 12 levels address far more leaves than a 64-bit chunk space needs.
MAX_DEPTH = 12
#: Largest snapshot tag; tags are u32 on the wire and on disk.
MAX_TAG = 0xFFFF_FFFF
#: The journal must hold three of the largest transactions a single request
#: can make (see docs/format.md, "Journal"); below this it cannot.
MIN_JOURNAL_BLOCKS = 64

U64_MAX = (1 << 64) - 1

#: The store chunk an exception names when csnap-check --repair could not
#: recover where that copy was: reading the chunk through any snapshot in
#: the exception's share mask is an error, never the origin's data. No
#: store has this many chunks, so it can never name a real copy.
LOST_CHUNK = U64_MAX

#: Fixed block addresses (in metadata blocks).
SUPERBLOCK_ADDRESS = 0
GEOMETRY_BACKUP_ADDRESS = 1
JOURNAL_START = 2


class BlockType(enum.IntEnum):
    """The `type` field of the common block header."""

    #: Block 0: geometry, store state and the snapshot table.
    SUPERBLOCK = 1
    #: Block 1: a copy of the superblock's geometry, written at format (and
    #: again when an upgrade sets a feature flag).
    GEOMETRY = 2
    #: One block of an allocation bitmap (metadata area or data area).
    BITMAP = 3
    #: Exception btree index node.
    INDEX = 4
    #: Exception btree leaf.
    LEAF = 5
    #: Journal commit record.
    COMMIT = 6
    #: The client registry: snapshot clients connected to the server.
    REGISTRY = 7


class SnapshotState(enum.IntEnum):
    """The `state` field of a snapshot record."""

    #: The table slot is unused; its share bit is free.
    FREE = 0
    #: A snapshot that clients may identify to.
    LIVE = 1
    #: Deleted: the tag is gone, the sweep is still clearing the share bit.
    DELETING = 2
    #: Its exceptions were dropped to free space; reads fail until deleted.
    SQUASHED = 3
