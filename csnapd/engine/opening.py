"""Opening a store: finding its geometry, replaying its journal and reading
the state that counts, before an `Engine` is built over it.

Owns what happens between the devices and the first request: the geometry
from block 0 or its backup, the size checks against what the store was
formatted for, journal replay, the superblock as replay left it (a resize
journaled but not written home counts), the geometry backup made to agree,
and the upgrade of an older store's feature flags. Also opens the devices
of a store kept in files or block devices.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from csnap_format import MIN_BLOCK_SIZE, FormatError, Geometry, decode_geometry, decode_superblock
from csnapd.engine.device import BlockDevice, FileDevice
from csnapd.engine.errors import StoreIOError, StoreOpenError
from csnapd.engine.journal import Journal, RecoveryReport
from csnapd.engine.resize import repair_geometry_backup
from csnapd.engine.state import StoreState
from csnapd.engine.upgrade import upgraded_geometry

__all__ = ["RecoveredStore", "open_devices", "read_geometry", "recover_store"]

log = logging.getLogger("csnapd.engine")


def read_geometry(store: BlockDevice) -> Geometry:
    """The store's geometry, from block 0 or, failing that, its backup.

    Raises:
        StoreOpenError: neither copy is readable.
    """
    try:
        return decode_geometry(store.read(0, min(MIN_BLOCK_SIZE, store.size)))
    except OSError as exc:
        raise StoreIOError(f"reading the superblock: {exc.strerror or exc}") from exc
    except FormatError as first:
        size = MIN_BLOCK_SIZE
        while size <= 1 << 20 and 2 * size <= store.size:
            try:
                geometry = decode_geometry(store.read(size, MIN_BLOCK_SIZE))
            except (OSError, FormatError):
                geometry = None
            if geometry is not None and geometry.block_size == size:
                log.warning("superblock geometry unreadable (%s); using the backup", first)
                return geometry
            size *= 2
        raise StoreOpenError(f"not a usable csnap store: {first}") from first


def _check_sizes(store: BlockDevice, origin: BlockDevice, geometry: Geometry) -> None:
    """Refuse devices smaller than the store was formatted for."""
    if store.size < geometry.store_bytes:
        raise StoreOpenError(
            f"the store device has {store.size} bytes but was formatted for {geometry.store_bytes}"
        )
    if origin.size < geometry.origin_bytes:
        raise StoreOpenError(
            f"the origin has {origin.size} bytes but the store was formatted"
            f" for an origin of {geometry.origin_bytes}: wrong origin?"
        )


@dataclass(frozen=True)
class RecoveredStore:
    """A store after journal replay, ready for an `Engine`."""

    #: The geometry to serve with (upgraded, when `upgraded`).
    geometry: Geometry
    journal: Journal
    #: What the replay found.
    recovery: RecoveryReport
    state: StoreState
    #: Whether the geometry was upgraded: the caller commits the superblock
    #: and then rewrites the backup (`write_geometry_backup`).
    upgraded: bool


def recover_store(store: BlockDevice, origin: BlockDevice) -> RecoveredStore:
    """Replay the store's journal and read its superblock as replay left it.

    Raises:
        StoreOpenError: not a store, damaged, or the origin is too small.
        StoreIOError: the store cannot be read or written.
    """
    geometry = read_geometry(store)
    _check_sizes(store, origin, geometry)
    journal, report = Journal.recover(store, geometry)
    if report.problem:
        log.error("journal replay incomplete: %s", report.problem)
    if report.uncommitted:
        # A crash during a sync: the record was never answered.
        log.info("journal: %s", report.uncommitted)
    try:
        sb = decode_superblock(store.read(0, geometry.block_size))
    except OSError as exc:
        raise StoreIOError(f"reading the superblock: {exc.strerror or exc}") from exc
    except FormatError as exc:
        raise StoreOpenError(f"the superblock is damaged after replay: {exc}") from exc
    if sb.repairing:
        raise StoreOpenError(
            "a repair of this store was interrupted and its bitmaps may not match its"
            " btree: run csnap-check --repair to finish it"
        )
    # A resize journaled but not yet written home: the replayed
    # superblock holds the geometry that counts (csnapd.engine.resize).
    geometry = sb.geometry
    _check_sizes(store, origin, geometry)
    repair_geometry_backup(store, geometry)
    upgraded = upgraded_geometry(geometry)
    return RecoveredStore(
        geometry=upgraded or geometry,
        journal=journal,
        recovery=report,
        state=StoreState.from_superblock(sb),
        upgraded=upgraded is not None,
    )


def open_devices(
    store_path: str | os.PathLike[str],
    origin_path: str | os.PathLike[str],
    *,
    lock: bool,
    origin_writable: bool,
    direct: bool | None,
) -> tuple[FileDevice, FileDevice]:
    """The store's and the origin's devices, the store's lock taken.

    Raises:
        StoreLockedError: another server holds the store (rule: one server per store).
        StoreOpenError: either cannot be opened.
    """
    try:
        store = FileDevice(store_path, writable=True, lock=lock, direct=direct)
    except OSError as exc:
        raise StoreOpenError(f"cannot open store {store_path}: {exc.strerror}") from exc
    try:
        origin = FileDevice(origin_path, writable=origin_writable, direct=direct, random_reads=True)
    except OSError as exc:
        store.close()
        raise StoreOpenError(f"cannot open origin {origin_path}: {exc.strerror}") from exc
    return store, origin
