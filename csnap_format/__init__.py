"""csnap_format: the on-disk format of a csnap store.

Owns every byte layout (superblock, bitmaps, btree nodes, journal commit
records), their checksums, and pure encode/decode functions between bytes
and frozen dataclasses. Rule 1: decoding arbitrary bytes raises a
FormatError subclass and nothing else. Rule 2: nothing here does I/O except
the mkcsnap command-line tool. Other packages import only from this module.
"""

from __future__ import annotations

from csnap_format.bitmap import BitmapBlock, decode_bitmap, encode_bitmap
from csnap_format.btree import (
    ALL_BITS,
    INDEX_SUMMARIES,
    RCHUNK_LIMIT,
    IndexNode,
    Leaf,
    decode_index,
    decode_leaf,
    encode_index,
    encode_leaf,
    leaf_bytes_used,
)
from csnap_format.constants import (
    FORMAT_VERSION,
    GEOMETRY_BACKUP_ADDRESS,
    HEADER_SIZE,
    LOST_CHUNK,
    MAX_BLOCK_SIZE,
    MAX_CHUNK_SIZE,
    MAX_DEPTH,
    MAX_SNAPSHOTS,
    MAX_TAG,
    MIN_BLOCK_SIZE,
    MIN_CHUNK_SIZE,
    MIN_JOURNAL_BLOCKS,
    SECTOR_SIZE,
    SUPERBLOCK_ADDRESS,
    BlockType,
    SnapshotState,
)
from csnap_format.errors import (
    BadMagicError,
    ChecksumError,
    CorruptBlockError,
    ForeignBlockError,
    FormatError,
    LayoutError,
    MisdirectedBlockError,
    UnsupportedVersionError,
    WrongBlockTypeError,
)
from csnap_format.geometry import (
    EXCEPTION_BYTES,
    FEATURE_COPY_CRCS,
    FEATURE_INDEX_SUMMARIES,
    KNOWN_INCOMPAT_FEATURES,
    LEAF_ENTRY_BYTES,
    Geometry,
    bitmap_bits_per_block,
    commit_capacity,
    index_capacity,
    leaf_room,
    plan_geometry,
    store_capacity,
    summary_index_capacity,
)
from csnap_format.header import BlockContext, BlockHeader, block_checksum, read_header
from csnap_format.journal import (
    CommitRecord,
    DataRun,
    commit_fits,
    decode_commit,
    encode_commit,
    payload_crc,
)
from csnap_format.mkfs import (
    FORMAT_SEQUENCE,
    empty_superblock,
    format_block_count,
    format_blocks,
)
from csnap_format.registry import Registry, decode_registry, encode_registry, registry_capacity
from csnap_format.superblock import (
    RevertProgress,
    SnapshotRecord,
    Superblock,
    decode_geometry,
    decode_superblock,
    encode_geometry_backup,
    encode_superblock,
    revert_overcounted,
)

__all__ = [
    # constants
    "FORMAT_VERSION",
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
    "RCHUNK_LIMIT",
    "LOST_CHUNK",
    "LEAF_ENTRY_BYTES",
    "EXCEPTION_BYTES",
    "FORMAT_SEQUENCE",
    "BlockType",
    "SnapshotState",
    # errors
    "FormatError",
    "BadMagicError",
    "WrongBlockTypeError",
    "ChecksumError",
    "MisdirectedBlockError",
    "ForeignBlockError",
    "UnsupportedVersionError",
    "CorruptBlockError",
    "LayoutError",
    # geometry
    "Geometry",
    "plan_geometry",
    "store_capacity",
    "bitmap_bits_per_block",
    "index_capacity",
    "summary_index_capacity",
    "FEATURE_INDEX_SUMMARIES",
    "FEATURE_COPY_CRCS",
    "KNOWN_INCOMPAT_FEATURES",
    "ALL_BITS",
    "INDEX_SUMMARIES",
    "leaf_room",
    "commit_capacity",
    # blocks
    "BlockContext",
    "BlockHeader",
    "block_checksum",
    "read_header",
    "Superblock",
    "SnapshotRecord",
    "encode_superblock",
    "decode_superblock",
    "revert_overcounted",
    "RevertProgress",
    "decode_geometry",
    "encode_geometry_backup",
    "BitmapBlock",
    "encode_bitmap",
    "decode_bitmap",
    "Leaf",
    "IndexNode",
    "encode_leaf",
    "decode_leaf",
    "encode_index",
    "decode_index",
    "leaf_bytes_used",
    "CommitRecord",
    "encode_commit",
    "decode_commit",
    "DataRun",
    "commit_fits",
    "payload_crc",
    "Registry",
    "encode_registry",
    "decode_registry",
    "registry_capacity",
    # a new store
    "empty_superblock",
    "format_blocks",
    "format_block_count",
]
