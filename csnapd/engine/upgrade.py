"""Upgrading a store formatted before a feature this server knows.

Owns the one upgrade there is: a store without FEATURE_INDEX_SUMMARIES
(docs/format.md, "Legacy nodes") gets the flag in its geometry on its first
open. Nothing else is rewritten: legacy index nodes read as summaries of
every bit and are rewritten with summaries when they next change. The flag
goes into the superblock with the open's own commit (journaled like every
superblock), and then into the geometry backup in block 1, which is read
only when block 0's geometry is not; a backup left without the flag by a
crash between the two (its geometry sits in one sector, written whole or
not at all) is rewritten by the next open.
"""

from __future__ import annotations

import dataclasses
import logging

from csnap_format import (
    FEATURE_INDEX_SUMMARIES,
    GEOMETRY_BACKUP_ADDRESS,
    FormatError,
    Geometry,
    decode_geometry,
    encode_geometry_backup,
)
from csnapd.engine.device import BlockDevice
from csnapd.engine.errors import StoreIOError

__all__ = ["backup_lags", "upgraded_geometry", "write_geometry_backup"]

log = logging.getLogger("csnapd.engine")


def upgraded_geometry(geometry: Geometry) -> Geometry | None:
    """`geometry` with every feature this server writes, or None if it has them."""
    if geometry.features & FEATURE_INDEX_SUMMARIES:
        return None
    return dataclasses.replace(geometry, features=geometry.features | FEATURE_INDEX_SUMMARIES)


def backup_lags(store: BlockDevice, geometry: Geometry) -> bool:
    """Whether block 1 holds `geometry` but for feature flags it lacks."""
    try:
        at = GEOMETRY_BACKUP_ADDRESS * geometry.block_size
        backup = decode_geometry(store.read(at, geometry.block_size))
    except (OSError, FormatError):
        return False  # damage, not a lagging upgrade: csnap-check reports it
    return dataclasses.replace(backup, features=geometry.features) == geometry and (
        geometry.features & ~backup.features != 0
    )


def write_geometry_backup(store: BlockDevice, geometry: Geometry) -> None:
    """Rewrite block 1 with `geometry` (after the superblock holding it is durable).

    Raises:
        StoreIOError: the write or its sync failed.
    """
    try:
        store.write(GEOMETRY_BACKUP_ADDRESS * geometry.block_size, encode_geometry_backup(geometry))
        store.sync()
    except OSError as exc:
        raise StoreIOError(f"writing the geometry backup: {exc.strerror or exc}") from exc
    log.info("store upgraded: index nodes carry subtree summaries from now on")
