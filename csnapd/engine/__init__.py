"""csnapd.engine: the synchronous store engine.

Owns the store's block devices and bounded page cache, the allocators, the
exception btree, the journal, snapshots, copy-out, the read-lock table and
the offline check. Imports no trio, msgpack or sockets: a call into the
engine is atomic with respect to trio tasks, so one task owns it and nothing
needs locks. Other packages import only from this module.
"""

from __future__ import annotations

from csnapd.engine.changes import CHANGES_LEAVES_PER_STEP, Changes
from csnapd.engine.device import (
    BlockDevice,
    DeviceStats,
    FileDevice,
    MemoryDevice,
    PendingWrite,
)
from csnapd.engine.engine import (
    DEFAULT_CACHE_BYTES,
    CommitWrite,
    Engine,
    EngineStats,
    Ranges,
    read_geometry,
)
from csnapd.engine.errors import (
    EngineError,
    EngineFailedError,
    FencedError,
    InvalidRequestError,
    MetadataFullError,
    OverlappingRangesError,
    RequestTooLargeError,
    RevertInProgressError,
    SnapshotBusyError,
    SnapshotExistsError,
    SnapshotNotFoundError,
    SnapshotUnavailableError,
    StoreCorruptError,
    StoreFullError,
    StoreIOError,
    StoreLockedError,
    StoreOpenError,
    TooManySnapshotsError,
)
from csnapd.engine.journal import RecoveryReport
from csnapd.engine.resize import (
    BeyondCapacityError,
    DeviceTooSmallError,
    ResizeRefusedError,
    ResizeResult,
    ShrinkRefusedError,
)
from csnapd.engine.results import (
    OriginWriteResult,
    ReadSegment,
    SnapshotInfo,
    StoreStatus,
    WriteSegment,
)
from csnapd.engine.squash import Squashed

__all__ = [
    "CHANGES_LEAVES_PER_STEP",
    "Changes",
    "BlockDevice",
    "DeviceStats",
    "FileDevice",
    "MemoryDevice",
    "PendingWrite",
    "CommitWrite",
    "Engine",
    "EngineStats",
    "Ranges",
    "DEFAULT_CACHE_BYTES",
    "read_geometry",
    "RecoveryReport",
    "Squashed",
    "OriginWriteResult",
    "ReadSegment",
    "WriteSegment",
    "SnapshotInfo",
    "StoreStatus",
    "EngineError",
    "EngineFailedError",
    "FencedError",
    "InvalidRequestError",
    "RequestTooLargeError",
    "RevertInProgressError",
    "OverlappingRangesError",
    "MetadataFullError",
    "SnapshotBusyError",
    "SnapshotExistsError",
    "SnapshotNotFoundError",
    "SnapshotUnavailableError",
    "StoreCorruptError",
    "StoreFullError",
    "StoreIOError",
    "StoreLockedError",
    "StoreOpenError",
    "TooManySnapshotsError",
    "ResizeResult",
    "ResizeRefusedError",
    "ShrinkRefusedError",
    "DeviceTooSmallError",
    "BeyondCapacityError",
]
