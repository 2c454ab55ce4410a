"""Upgrading a store formatted before a feature this server knows.

Owns the one upgrade there is: a store without FEATURE_INDEX_SUMMARIES or
FEATURE_COPY_CRCS (docs/format.md, "Legacy nodes") gets the flags in its
geometry on its first open, before any transaction could carry copy CRCs.
Nothing else is rewritten: legacy index nodes read as summaries of every
bit and are rewritten with summaries when they next change. The flag
goes into the superblock with the open's own commit (journaled like every
superblock), and then into the geometry backup in block 1, which is read
only when block 0's geometry is not; a backup left without the flag by a
crash between the two is rewritten by the next open, as after a resize
(csnapd.engine.resize.repair_geometry_backup).
"""

from __future__ import annotations

import dataclasses

from csnap_format import (
    KNOWN_INCOMPAT_FEATURES,
    Geometry,
)

__all__ = ["upgraded_geometry"]


def upgraded_geometry(geometry: Geometry) -> Geometry | None:
    """`geometry` with every feature this server writes, or None if it has them."""
    if geometry.features & KNOWN_INCOMPAT_FEATURES == KNOWN_INCOMPAT_FEATURES:
        return None
    return dataclasses.replace(geometry, features=geometry.features | KNOWN_INCOMPAT_FEATURES)
