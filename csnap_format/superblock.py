"""The superblock (block 0) and the geometry backup (block 1).

The superblock holds three things (docs/format.md, "Superblock"):

  bytes    0..40    common header (checksum over the whole block)
  bytes   40..512   geometry: identity, sizes, region positions, and a
                    CRC32 of its own at 508..512
  bytes  512..1024  state: clean/busy, btree root and depth, free counts,
                    allocation cursors, deletion sweep position, exceptions,
                    client registry and its version, fencing token,
                    revert progress
  bytes 1024..4096  snapshot table: 64 records of 48 bytes, one per share bit

Why the geometry has its own checksum: the superblock is rewritten in place
(after its new contents are durable in the journal), and a write torn at a
512-byte sector boundary would fail the whole-block checksum. The first
sector is byte-for-byte the same in every version except for the header's
checksum and sequence fields, which the geometry CRC skips, so the journal
can always be found and replayed, and the replay repairs the tear.
"""

from __future__ import annotations

import dataclasses
import struct
from dataclasses import dataclass

from csnap_format._structs import is_zero
from csnap_format.checksum import crc32
from csnap_format.constants import (
    FORMAT_VERSION,
    GEOMETRY_BACKUP_ADDRESS,
    HEADER_SIZE,
    MAGIC,
    MAX_DEPTH,
    MAX_SNAPSHOTS,
    SECTOR_SIZE,
    SUPERBLOCK_ADDRESS,
    BlockType,
    SnapshotState,
)
from csnap_format.errors import (
    BadMagicError,
    ChecksumError,
    CorruptBlockError,
    UnsupportedVersionError,
    WrongBlockTypeError,
)
from csnap_format.geometry import KNOWN_INCOMPAT_FEATURES, Geometry, geometry_problems
from csnap_format.header import read_header, write_header

__all__ = [
    "RevertProgress",
    "SnapshotRecord",
    "Superblock",
    "encode_superblock",
    "decode_superblock",
    "revert_overcounted",
    "decode_geometry",
    "encode_geometry_backup",
    "STATE_CLEAN",
    "STATE_REPAIRING",
    "STATE_BUSY",
]

#: Superblock `state` values: closed cleanly, or open (or crashed) since.
STATE_CLEAN = 1
STATE_BUSY = 2
#: A repair that switches in several transactions marks the store so first:
#: until its last one, the bitmaps may not match the btree, and only the
#: repair itself may go on.
STATE_REPAIRING = 3

# Geometry: version, incompat, compat, reserved, uuid, created, block size,
# chunk size, then 12 u64 sizes and positions.
_GEOMETRY = struct.Struct("<IIII16sQII12Q")
_GEOMETRY_AT = HEADER_SIZE
_GEOMETRY_CRC_AT = SECTOR_SIZE - 4
# State: state, depth, root, meta free, data free, meta cursor, data cursor,
# sweep cursor, sweep mask, exception count, client registry block, fencing
# token and the time it was journaled.
_STATE = struct.Struct("<II11Q")
_STATE_AT = SECTOR_SIZE
# Revert progress (state bytes 96..127): cursor, chunks restored, chunks to
# restore, tag, active flag, share bit, reserved.
_REVERT = struct.Struct("<QQQIBBH")
_REVERT_AT = _STATE_AT + 96
_STATE_END = 1024
# Geometry changes (docs/format.md, "Resizing"): when the last resize was
# journaled, then 8 bytes kept zero; state bytes 128..143.
_RESIZE = struct.Struct("<Q8x")
_RESIZE_AT = _STATE_AT + 128
# The client registry's version (docs/format.md, "Client registry state"):
# the sequence of the transaction that wrote the registry block last, then 8
# bytes kept zero; state bytes 176..191.
_REGISTRY = struct.Struct("<Q8x")
_REGISTRY_AT = _STATE_AT + 176
# Snapshot record: tag, state, priority, reserved, use count, reserved,
# created, origin chunks, unique chunks, shared chunks.
_RECORD = struct.Struct("<IBbHIIQQQQ")
_TABLE_AT = 1024
_TABLE_END = _TABLE_AT + MAX_SNAPSHOTS * _RECORD.size
_NAME = "superblock"

assert _GEOMETRY_AT + _GEOMETRY.size <= _GEOMETRY_CRC_AT
assert _STATE_AT + _STATE.size == _REVERT_AT
assert _REVERT_AT + _REVERT.size == _RESIZE_AT
assert _RESIZE_AT + _RESIZE.size <= _REGISTRY_AT
assert _REGISTRY_AT + _REGISTRY.size <= _STATE_END
assert _RECORD.size == 48
assert _TABLE_END == 4096


@dataclass(frozen=True, slots=True)
class SnapshotRecord:
    """One row of the snapshot table. Its index in the table is its share bit."""

    tag: int
    state: SnapshotState
    priority: int
    use_count: int
    created_ns: int
    origin_chunks: int
    #: Exceptions whose share mask holds this snapshot's bit alone.
    unique_chunks: int = 0
    #: Exceptions whose share mask holds this bit and others.
    shared_chunks: int = 0


@dataclass(frozen=True, slots=True)
class RevertProgress:
    """A revert in progress: the origin is being made equal to a snapshot."""

    #: The snapshot the origin is reverted to, and its share bit.
    tag: int
    bit: int
    #: Next logical chunk to restore: chunks below it are done.
    cursor: int
    #: Chunks copied onto the origin so far, and how many there are in all.
    restored: int
    total: int


@dataclass(frozen=True, slots=True)
class Superblock:
    """The decoded superblock: geometry, store state and snapshot table."""

    geometry: Geometry
    sequence: int
    clean: bool
    depth: int
    root: int
    meta_free: int
    data_free: int
    meta_cursor: int
    data_cursor: int
    sweep_cursor: int
    #: Share bits of the deleted snapshots the sweep at `sweep_cursor` clears.
    sweep_mask: int
    #: Exceptions in the btree.
    exceptions: int
    #: Block of the client registry, or 0 when there has never been one.
    registry: int
    #: 64 entries indexed by share bit; None marks a free slot.
    snapshots: tuple[SnapshotRecord | None, ...]
    #: Fencing token of the server that activated last under a cluster
    #: coordinator (an etcd revision); 0 when none ever did.
    fence_token: int = 0
    #: When that server journaled its token, nanoseconds since the Unix epoch.
    fence_ns: int = 0
    #: The revert in progress, if any (docs/format.md, "State").
    revert: RevertProgress | None = None
    #: When the last online resize was journaled (ns since the epoch); 0: never.
    resized_ns: int = 0
    #: Sequence of the transaction that wrote the client registry block
    #: last; 0 when unknown (no registry, or a store written before it).
    registry_sequence: int = 0
    #: A repair is switching the store over (STATE_REPAIRING); nothing may open it.
    repairing: bool = False


def _pack_geometry(block: bytearray, g: Geometry) -> None:
    _GEOMETRY.pack_into(
        block,
        _GEOMETRY_AT,
        FORMAT_VERSION,
        g.features,
        0,
        0,
        g.uuid,
        g.created_ns,
        g.block_size,
        g.chunk_size,
        g.store_chunks,
        g.origin_chunks,
        g.journal_start,
        g.journal_blocks,
        g.meta_bitmap_start,
        g.meta_bitmap_blocks,
        g.data_bitmap_start,
        g.data_bitmap_blocks,
        g.meta_start,
        g.meta_blocks,
        g.data_start,
        g.data_chunks,
    )
    crc = crc32(memoryview(block)[_GEOMETRY_AT:_GEOMETRY_CRC_AT])
    struct.pack_into("<I", block, _GEOMETRY_CRC_AT, crc)


def encode_superblock(sb: Superblock) -> bytes:
    """Encode `sb` into one metadata block, header and checksums included."""
    g = sb.geometry
    block = bytearray(g.block_size)
    _pack_geometry(block, g)
    _STATE.pack_into(
        block,
        _STATE_AT,
        STATE_REPAIRING if sb.repairing else STATE_CLEAN if sb.clean else STATE_BUSY,
        sb.depth,
        sb.root,
        sb.meta_free,
        sb.data_free,
        sb.meta_cursor,
        sb.data_cursor,
        sb.sweep_cursor,
        sb.sweep_mask,
        sb.exceptions,
        sb.registry,
        sb.fence_token,
        sb.fence_ns,
    )
    _pack_state_extensions(block, sb)
    for bit, record in enumerate(sb.snapshots):
        if record is not None:
            _RECORD.pack_into(
                block,
                _TABLE_AT + bit * _RECORD.size,
                record.tag,
                record.state,
                record.priority,
                0,
                record.use_count,
                0,
                record.created_ns,
                record.origin_chunks,
                record.unique_chunks,
                record.shared_chunks,
            )
    write_header(block, BlockType.SUPERBLOCK, SUPERBLOCK_ADDRESS, g.store_id, sb.sequence)
    return bytes(block)


def _pack_state_extensions(block: bytearray, sb: Superblock) -> None:
    """The state fields after the first 96 bytes: revert, resize, registry."""
    revert = sb.revert
    if revert is not None:
        _REVERT.pack_into(
            block,
            _REVERT_AT,
            revert.cursor,
            revert.restored,
            revert.total,
            revert.tag,
            1,
            revert.bit,
            0,
        )
    _RESIZE.pack_into(block, _RESIZE_AT, sb.resized_ns)
    _REGISTRY.pack_into(block, _REGISTRY_AT, sb.registry_sequence)


def encode_geometry_backup(g: Geometry) -> bytes:
    """Block 1: the geometry sector again, for when block 0 is unreadable."""
    block = bytearray(g.block_size)
    _pack_geometry(block, g)
    write_header(block, BlockType.GEOMETRY, GEOMETRY_BACKUP_ADDRESS, g.store_id, 0)
    return bytes(block)


def decode_geometry(block: bytes | bytearray | memoryview) -> Geometry:
    """Read the geometry from the first sector of block 0 or from block 1.

    Only the first 512 bytes are trusted: their own CRC is checked, not the
    whole block's, so that a superblock torn after its first sector still
    tells where the journal is.

    Raises:
        FormatError: not a csnap store, an unsupported version, or damage.
    """
    if len(block) < SECTOR_SIZE:
        raise BadMagicError(f"only {len(block)} bytes, not a csnap store", kind=_NAME)
    if bytes(block[:4]) != MAGIC:
        raise BadMagicError("not a csnap store (no csnap magic at byte 0)", kind=_NAME)
    # type, then skip reserved (2), checksum (4), reserved (4): address, store id.
    kind, address, store_id = struct.unpack_from("<H10xQQ", block, 4)
    expected = {
        BlockType.SUPERBLOCK: SUPERBLOCK_ADDRESS,
        BlockType.GEOMETRY: GEOMETRY_BACKUP_ADDRESS,
    }
    if kind not in expected:
        raise WrongBlockTypeError(f"block type {kind} is not a superblock", kind=_NAME)
    name = "superblock" if kind == BlockType.SUPERBLOCK else "geometry backup"
    stored_crc = struct.unpack_from("<I", block, _GEOMETRY_CRC_AT)[0]
    crc = crc32(memoryview(block)[_GEOMETRY_AT:_GEOMETRY_CRC_AT])
    if crc != stored_crc:
        raise ChecksumError(
            f"geometry checksum mismatch (stored {stored_crc:#010x}, computed {crc:#010x})",
            block=expected[kind],
            kind=name,
        )
    fields = _GEOMETRY.unpack_from(block, _GEOMETRY_AT)
    version, incompat, compat, reserved = fields[:4]
    if version != FORMAT_VERSION:
        raise UnsupportedVersionError(
            f"format version {version}; this csnap reads version {FORMAT_VERSION}",
            block=expected[kind],
            kind=name,
        )
    if incompat & ~KNOWN_INCOMPAT_FEATURES or compat or reserved:
        raise UnsupportedVersionError(
            f"unknown feature flags (incompat {incompat:#x}, compat {compat:#x})",
            block=expected[kind],
            kind=name,
        )
    if not is_zero(block, _GEOMETRY_AT + _GEOMETRY.size, _GEOMETRY_CRC_AT):
        raise CorruptBlockError(
            "reserved geometry bytes are not zero", block=expected[kind], kind=name
        )
    geometry = dataclasses.replace(Geometry(fields[4], *fields[5:]), features=incompat)
    problems = geometry_problems(geometry)
    if problems:
        raise CorruptBlockError("; ".join(problems), block=expected[kind], kind=name)
    if address != expected[kind] or store_id != geometry.store_id:
        raise CorruptBlockError(
            "header address or store id disagrees with the geometry",
            block=expected[kind],
            kind=name,
        )
    return geometry


def decode_superblock(
    block: bytes | bytearray | memoryview, *, revert_overcount: bool = False
) -> Superblock:
    """Decode and validate block 0 in full.

    Args:
        revert_overcount: accept a revert whose restored count exceeds its
            total (`revert_overcounted`), for csnap-check to report and
            repair; everything else is validated as always.

    Raises:
        FormatError: a subclass naming what is wrong.
    """
    geometry = decode_geometry(block)
    header = read_header(
        block,
        BlockType.SUPERBLOCK,
        address=SUPERBLOCK_ADDRESS,
        store_id=geometry.store_id,
        block_size=geometry.block_size,
    )
    state, depth, root, *counts, registry, fence_token, fence_ns = _STATE.unpack_from(
        block, _STATE_AT
    )
    meta_free, data_free, meta_cursor, data_cursor, sweep, sweep_mask, exceptions = counts
    problems = []
    if state not in (STATE_CLEAN, STATE_BUSY, STATE_REPAIRING):
        problems.append(f"state {state} is neither clean, busy nor repairing")
    revert = _decode_revert(block, problems)
    (resized_ns,) = _RESIZE.unpack_from(block, _RESIZE_AT)
    (registry_sequence,) = _REGISTRY.unpack_from(block, _REGISTRY_AT)
    if not _reserved_zero(block, geometry.block_size):
        problems.append("reserved bytes are not zero")
    sb = Superblock(
        geometry=geometry,
        sequence=header.sequence,
        clean=state == STATE_CLEAN,
        depth=depth,
        root=root,
        meta_free=meta_free,
        data_free=data_free,
        meta_cursor=meta_cursor,
        data_cursor=data_cursor,
        sweep_cursor=sweep,
        sweep_mask=sweep_mask,
        exceptions=exceptions,
        registry=registry,
        snapshots=_decode_table(block, problems),
        fence_token=fence_token,
        fence_ns=fence_ns,
        revert=revert,
        resized_ns=resized_ns,
        registry_sequence=registry_sequence,
        repairing=state == STATE_REPAIRING,
    )
    problems += _state_problems(sb, revert_overcount)
    if problems:
        raise CorruptBlockError("; ".join(problems), block=SUPERBLOCK_ADDRESS, kind=_NAME)
    return sb


def _reserved_zero(block: bytes | bytearray | memoryview, block_size: int) -> bool:
    """Whether the superblock's reserved bytes are all zero."""
    return (
        is_zero(block, _RESIZE_AT + 8, _REGISTRY_AT)
        and is_zero(block, _REGISTRY_AT + 8, _STATE_END)
        and is_zero(block, _TABLE_END, block_size)
    )


def _state_problems(sb: Superblock, revert_overcount: bool) -> list[str]:
    """What is out of range in a superblock's state fields."""
    g = sb.geometry
    problems = []
    if sb.depth > MAX_DEPTH:
        problems.append(f"btree depth {sb.depth} exceeds {MAX_DEPTH}")
    if not g.meta_start <= sb.root < g.meta_end:
        problems.append(f"btree root {sb.root} is outside the metadata area")
    if sb.meta_free >= g.meta_blocks:
        problems.append(f"metadata free count {sb.meta_free} exceeds the area")
    if sb.data_free > g.data_chunks:
        problems.append(f"data free count {sb.data_free} exceeds the data area")
    if not g.meta_start <= sb.meta_cursor < g.meta_end:
        problems.append(f"metadata cursor {sb.meta_cursor} is outside the metadata area")
    if not g.data_start <= sb.data_cursor < g.store_chunks:
        problems.append(f"data cursor {sb.data_cursor} is outside the data area")
    if sb.registry and not g.meta_start <= sb.registry < g.meta_end:
        problems.append(f"client registry {sb.registry} is outside the metadata area")
    # Lost marks count as exceptions but hold no data chunk: a chunk carries
    # at most 64 of them (their masks are disjoint).
    if sb.exceptions > g.data_chunks + 64 * g.origin_chunks:
        problems.append(f"exception count {sb.exceptions} exceeds the data area and lost marks")
    reclaimed = sum(
        1 << bit
        for bit, record in enumerate(sb.snapshots)
        if record is not None and record.state in (SnapshotState.DELETING, SnapshotState.SQUASHED)
    )
    if sb.sweep_mask & ~reclaimed:
        problems.append("the sweep clears bits of snapshots neither deleting nor squashed")
    return problems + _revert_problems(sb, revert_overcount)


def revert_overcounted(sb: Superblock) -> bool:
    """Whether the revert in progress counts more chunks restored than its total.

    Servers before the rule that parks origin writes without applying them
    while a revert runs (docs/rules.md, "revert in journaled steps") could
    leave such a count: the writes gave the snapshot copies its total never
    counted. The data is whole; only the count is wrong, and csnap-check
    --repair recounts it.
    """
    return sb.revert is not None and sb.revert.restored > sb.revert.total


def _revert_problems(sb: Superblock, overcount: bool) -> list[str]:
    """What is wrong with the revert in progress, if one is."""
    revert = sb.revert
    if revert is None:
        return []
    problems = []
    record = sb.snapshots[revert.bit] if revert.bit < MAX_SNAPSHOTS else None
    if record is None or record.tag != revert.tag or record.state != SnapshotState.LIVE:
        problems.append(f"the revert names snapshot {revert.tag}, not live at bit {revert.bit}")
    if revert.cursor > sb.geometry.origin_chunks:
        problems.append(f"the revert's cursor {revert.cursor} is past the origin's end")
    if revert.restored > revert.total and not overcount:
        problems.append(
            f"the revert counts {revert.restored} chunks restored of {revert.total}"
            " (csnap-check --repair recounts them)"
        )
    return problems


def _decode_revert(
    block: bytes | bytearray | memoryview, problems: list[str]
) -> RevertProgress | None:
    """The revert progress at state bytes 96..127; None when no revert runs."""
    cursor, restored, total, tag, active, bit, reserved = _REVERT.unpack_from(block, _REVERT_AT)
    if active == 0:
        if cursor or restored or total or tag or bit or reserved:
            problems.append("no revert runs but its fields are not zero")
        return None
    if active != 1 or reserved:
        problems.append(f"revert flag {active} is neither 0 nor 1, or its reserved bytes are set")
        return None
    return RevertProgress(tag=tag, bit=bit, cursor=cursor, restored=restored, total=total)


def _decode_table(
    block: bytes | bytearray | memoryview, problems: list[str]
) -> tuple[SnapshotRecord | None, ...]:
    records: list[SnapshotRecord | None] = []
    tags: set[int] = set()
    for bit in range(MAX_SNAPSHOTS):
        at = _TABLE_AT + bit * _RECORD.size
        fields = _RECORD.unpack_from(block, at)
        tag, state, priority, pad1, use_count, pad2, created, origin_chunks = fields[:8]
        unique, shared = fields[8:]
        if state == SnapshotState.FREE:
            if any(fields):
                problems.append(f"free snapshot slot {bit} is not all zeros")
            records.append(None)
            continue
        if state not in _STATES:
            problems.append(f"snapshot slot {bit} has unknown state {state}")
            records.append(None)
            continue
        if pad1 or pad2:
            problems.append(f"snapshot slot {bit} has non-zero reserved bytes")
        if origin_chunks < 1:
            problems.append(f"snapshot slot {bit} records an empty origin")
        if state != SnapshotState.DELETING:
            if tag in tags:
                problems.append(f"snapshot tag {tag} appears twice")
            tags.add(tag)
        records.append(
            SnapshotRecord(
                tag,
                SnapshotState(state),
                priority,
                use_count,
                created,
                origin_chunks,
                unique,
                shared,
            )
        )
    return tuple(records)


_STATES = frozenset(int(s) for s in SnapshotState)
