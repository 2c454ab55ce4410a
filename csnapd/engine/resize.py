"""Online resizing: growing (or safely shrinking) the origin and the store
while the server runs, and the per-snapshot sizes that growing brings.

What a resize may change (docs/format.md, "Resizing"): the geometry's
`origin_chunks`, `store_chunks` and `data_chunks`, nothing else. Every
region (journal, bitmaps, metadata area, data area start) stays where it is,
so the journal is found with the old geometry or the new one alike, and a
resize is an ordinary journaled transaction: the superblock with the new
geometry and the data bitmap blocks whose bits the new store end changes
(several such transactions, each a consistent store, when those blocks do
not fit in one: `resize_steps`).
The geometry backup in block 1 is rewritten after that transaction is
durable at home, and again at open whenever it disagrees with block 0
(`repair_geometry_backup`), so a crash at any point leaves one intact copy
that names the journal, and the next open makes both agree.

A store grows up to its capacity (`csnap_format.store_capacity`): what its
data bitmap covers and its metadata area can index in the worst case.

Shrinking is refused unless provably safe:
  * the store, only when no data chunk at or past the new end is allocated
    (metadata lies below the data area, which a shrink never reaches);
  * the origin, only when no snapshot was taken with a larger origin (any
    state: a deleting snapshot still has exceptions) and no btree key lies at
    or past the new end.

Each snapshot keeps the origin size it was taken at (its record's
`origin_chunks`): it reads and writes only below it, and an origin write
past it copies nothing for it (`LiveMasks`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass

from csnap_format import (
    FormatError,
    Geometry,
    bitmap_bits_per_block,
    decode_geometry,
    encode_geometry_backup,
    store_capacity,
)
from csnap_format.constants import GEOMETRY_BACKUP_ADDRESS
from csnapd.engine.device import BlockDevice, FileDevice
from csnapd.engine.errors import EngineError, StoreIOError
from csnapd.engine.pager import Pager
from csnapd.engine.state import LiveMasks, StoreState

__all__ = [
    "ResizeRefusedError",
    "ShrinkRefusedError",
    "DeviceTooSmallError",
    "BeyondCapacityError",
    "ResizeResult",
    "LiveMasks",
    "plan_resize",
    "apply_resize",
    "resize_steps",
    "highest_key",
    "write_geometry_backup",
    "repair_geometry_backup",
]

log = logging.getLogger("csnapd.engine")


class ResizeRefusedError(EngineError):
    """A resize that cannot be done; nothing was changed."""

    code = "resize_refused"


class ShrinkRefusedError(ResizeRefusedError):
    """A shrink that is not provably safe: data, metadata or a snapshot lies past the new end."""

    code = "shrink_refused"


class DeviceTooSmallError(ResizeRefusedError):
    """The file or device under the store or origin is smaller than the size asked for."""

    code = "device_too_small"


class BeyondCapacityError(ResizeRefusedError):
    """The store would outgrow what its bitmap and metadata area were formatted for."""

    code = "beyond_capacity"


@dataclass(frozen=True, slots=True)
class ResizeResult:
    """Sizes before and after a resize, in chunks."""

    origin_chunks_before: int
    origin_chunks: int
    store_chunks_before: int
    store_chunks: int
    #: The most chunks the store can grow to.
    capacity_chunks: int
    data_chunks: int
    data_free: int
    #: Which files ("origin", "store") csnapd grew itself (grow_files).
    grown_files: tuple[str, ...] = ()


def highest_key(pager: Pager, state: StoreState) -> int:
    """The largest logical chunk the btree names (a key or an exception's chunk).

    Keys increase left to right at every level, so the rightmost path holds
    the largest of each; one descent.
    """
    address, highest = state.root, 0
    for _ in range(state.depth):
        node = pager.index(address)
        highest = max(highest, node.keys[-1])
        address = node.children[-1]
    leaf = pager.leaf(address)
    highest = max(highest, leaf.base)
    if leaf.chunks:
        highest = max(highest, leaf.chunks[-1])
    return highest


def _ensure_size(
    device: BlockDevice, wanted: int, name: str, grow_files: bool, grown: list[str]
) -> None:
    """Check that `device` holds `wanted` bytes, growing a regular file if allowed.

    Raises:
        DeviceTooSmallError: it does not, and cannot be grown here.
        StoreIOError: growing the file failed.
    """
    size = device.size
    if size >= wanted:
        return
    if grow_files and isinstance(device, FileDevice) and device.regular_file:
        try:
            fd = os.open(device.path, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.ftruncate(fd, wanted)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise StoreIOError(f"growing the {name} file: {exc.strerror or exc}") from exc
        grown.append(name)
        log.info("grew the %s file %s from %d to %d bytes", name, device.path, size, wanted)
        return
    hint = (
        " (give --grow-files to let csnapd grow a regular file)"
        if isinstance(device, FileDevice) and device.regular_file
        else " (grow the device first)"
    )
    raise DeviceTooSmallError(f"the {name} has {size} bytes, fewer than the {wanted} asked{hint}")


def plan_resize(
    geometry: Geometry,
    state: StoreState,
    pager: Pager,
    devices: tuple[BlockDevice, BlockDevice],
    *,
    origin_bytes: int | None,
    store_bytes: int | None,
    grow_files: bool,
) -> tuple[Geometry, tuple[str, ...]]:
    """The geometry after the resize asked for, after checking it is safe.

    Checks everything before changing anything; only growing a file (with
    `grow_files`) happens before the last check, and a grown file holds
    nothing the store uses.

    Raises:
        ResizeRefusedError: a subclass naming why; nothing was changed.
        StoreIOError: a file could not be grown.
    """
    store, origin = devices
    chunk = geometry.chunk_size
    origin_chunks = geometry.origin_chunks if origin_bytes is None else origin_bytes // chunk
    store_chunks = geometry.store_chunks if store_bytes is None else store_bytes // chunk
    if origin_chunks < 1:
        raise ResizeRefusedError(f"an origin of {origin_bytes} bytes holds no {chunk}-byte chunk")
    if store_chunks <= geometry.data_start:
        raise ShrinkRefusedError(
            f"a store of {store_bytes} bytes leaves no data area: its metadata alone"
            f" takes {geometry.data_start * chunk} bytes"
        )
    capacity = store_capacity(geometry)
    if store_chunks > capacity:
        raise BeyondCapacityError(
            f"the store can grow to {capacity * chunk} bytes ({capacity} chunks): its bitmap"
            " and metadata area were formatted for that (mkcsnap --max-store-size)"
        )
    if origin_chunks < geometry.origin_chunks:
        _check_origin_shrink(state, pager, origin_chunks)
    if store_chunks < geometry.store_chunks:
        _check_store_shrink(geometry, pager, store_chunks)
    grown: list[str] = []
    _ensure_size(origin, origin_chunks * chunk, "origin", grow_files, grown)
    _ensure_size(store, store_chunks * chunk, "store", grow_files, grown)
    resized = dataclasses.replace(
        geometry,
        origin_chunks=origin_chunks,
        store_chunks=store_chunks,
        data_chunks=store_chunks - geometry.data_start,
    )
    return resized, tuple(grown)


def _check_origin_shrink(state: StoreState, pager: Pager, origin_chunks: int) -> None:
    for record in state.snapshots:
        if record is not None and record.origin_chunks > origin_chunks:
            raise ShrinkRefusedError(
                f"snapshot {record.tag} ({record.state.name.lower()}) was taken of an origin"
                f" of {record.origin_chunks} chunks: the origin cannot shrink below that"
            )
    highest = highest_key(pager, state)
    if highest >= origin_chunks:
        raise ShrinkRefusedError(
            f"the btree still names origin chunk {highest}: the origin cannot shrink"
            f" to {origin_chunks} chunks"
        )


def _check_store_shrink(geometry: Geometry, pager: Pager, store_chunks: int) -> None:
    for index, offset, span in _bitmap_spans(geometry, store_chunks, geometry.store_chunks):
        page = pager.bitmap(geometry.data_bitmap_start + index)
        used = (page.bits | page.reserved) >> offset & ((1 << span) - 1)
        if used:
            unit = index * bitmap_bits_per_block(geometry.block_size) + offset
            unit += (used & -used).bit_length() - 1
            raise ShrinkRefusedError(
                f"store chunk {unit} is in use: the store cannot shrink to {store_chunks}"
                " chunks (only free space at its end can go)"
            )


def _bitmap_spans(geometry: Geometry, low: int, high: int) -> list[tuple[int, int, int]]:
    """(bitmap block index, first bit, bit count) covering chunks [low, high)."""
    bits = bitmap_bits_per_block(geometry.block_size)
    spans = []
    unit = low
    while unit < high:
        index, offset = divmod(unit, bits)
        span = min(high - unit, bits - offset)
        spans.append((index, offset, span))
        unit += span
    return spans


def resize_steps(before: Geometry, after: Geometry, max_blocks: int) -> list[Geometry]:
    """The geometries to commit in turn to get from `before` to `after`.

    One step unless the store's end moves over more data bitmap blocks than
    one transaction carries (with the superblock): then the store moves in
    steps of that many blocks, the origin with the first. Every step is a
    consistent store; a crash between steps leaves a size between the two.
    """
    bits = bitmap_bits_per_block(before.block_size)
    # A span of n chunks touches at most n // bits + 2 bitmap blocks.
    most = max(1, (max_blocks - 3) * bits)
    steps = []
    store = before.store_chunks
    while True:
        distance = after.store_chunks - store
        store += max(-most, min(most, distance))
        steps.append(
            dataclasses.replace(after, store_chunks=store, data_chunks=store - after.data_start)
        )
        if store == after.store_chunks:
            return steps


def apply_resize(
    before: Geometry, after: Geometry, state: StoreState, pager: Pager, now: int
) -> None:
    """Stage the resize in the open request: bitmap bits, free count, cursor.

    The caller rebuilt its components for `after`, so the superblock the
    transaction writes carries the new geometry.
    """
    low, high = sorted((before.store_chunks, after.store_chunks))
    growing = after.store_chunks > before.store_chunks
    for index, offset, span in _bitmap_spans(before, low, high):
        mask = ((1 << span) - 1) << offset
        page = pager.modify(pager.bitmap(before.data_bitmap_start + index))
        # Bits past the store's end are set and stay set (docs/format.md).
        page.bits = page.bits & ~mask if growing else page.bits | mask
    state.data_free += after.store_chunks - before.store_chunks
    if state.data_cursor >= after.store_chunks:
        state.data_cursor = after.data_start
    state.resized_ns = now


def write_geometry_backup(store: BlockDevice, geometry: Geometry) -> None:
    """Rewrite block 1 with `geometry`, after block 0 holds it durably.

    Raises:
        StoreIOError: the write or sync failed.
    """
    try:
        store.write(GEOMETRY_BACKUP_ADDRESS * geometry.block_size, encode_geometry_backup(geometry))
        store.sync()
    except OSError as exc:
        raise StoreIOError(f"writing the geometry backup: {exc.strerror or exc}") from exc


def repair_geometry_backup(store: BlockDevice, geometry: Geometry) -> bool:
    """Make block 1 agree with the superblock's geometry; whether it had to.

    A resize rewrites block 1 after its transaction; a crash before that
    write ends (or during it) leaves block 1 stale or torn.
    """
    size = geometry.block_size
    try:
        backup: Geometry | None = decode_geometry(store.read(GEOMETRY_BACKUP_ADDRESS * size, size))
    except FormatError:
        backup = None
    except OSError as exc:
        raise StoreIOError(f"reading the geometry backup: {exc.strerror or exc}") from exc
    if backup == geometry:
        return False
    log.warning("the geometry backup in block 1 disagrees with the superblock; rewriting it")
    write_geometry_backup(store, geometry)
    return True
