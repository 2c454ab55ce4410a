"""The wire code of every engine error: one table, from error class to `ErrorCode`.

An engine error that reaches a client becomes an `error` reply whose code is
looked up here (docs/protocol.md, "Error codes"). The lookup walks the error's
class hierarchy, so a subclass without an entry of its own answers with its
nearest listed ancestor's code; `EngineError` itself, which no request raises,
answers `internal_error`.
"""

from __future__ import annotations

from csnap_protocol import ErrorCode
from csnapd.engine import (
    BeyondCapacityError,
    DeviceTooSmallError,
    EngineError,
    EngineFailedError,
    FencedError,
    InvalidRequestError,
    MetadataFullError,
    OverlappingRangesError,
    RequestTooLargeError,
    ResizeRefusedError,
    RevertInProgressError,
    ShrinkRefusedError,
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

__all__ = ["ENGINE_ERROR_CODES", "error_code", "wire_code_of"]

#: The wire code of each engine error class.
ENGINE_ERROR_CODES: dict[type[EngineError], ErrorCode] = {
    EngineError: ErrorCode.INTERNAL_ERROR,
    InvalidRequestError: ErrorCode.INVALID_REQUEST,
    OverlappingRangesError: ErrorCode.INVALID_REQUEST,
    RequestTooLargeError: ErrorCode.REQUEST_TOO_LARGE,
    SnapshotNotFoundError: ErrorCode.NO_SUCH_SNAPSHOT,
    SnapshotExistsError: ErrorCode.SNAPSHOT_EXISTS,
    TooManySnapshotsError: ErrorCode.TOO_MANY_SNAPSHOTS,
    SnapshotBusyError: ErrorCode.SNAPSHOT_BUSY,
    SnapshotUnavailableError: ErrorCode.SNAPSHOT_UNAVAILABLE,
    StoreFullError: ErrorCode.STORE_FULL,
    MetadataFullError: ErrorCode.METADATA_FULL,
    StoreIOError: ErrorCode.IO_ERROR,
    StoreCorruptError: ErrorCode.STORE_CORRUPT,
    # After a failed commit the server stops: every client hears why.
    EngineFailedError: ErrorCode.SERVER_FAILED,
    # A store that cannot be opened is, to a client, a store that cannot be read.
    StoreOpenError: ErrorCode.IO_ERROR,
    StoreLockedError: ErrorCode.IO_ERROR,
    FencedError: ErrorCode.FENCED,
    RevertInProgressError: ErrorCode.REVERT_IN_PROGRESS,
    ResizeRefusedError: ErrorCode.RESIZE_REFUSED,
    ShrinkRefusedError: ErrorCode.SHRINK_REFUSED,
    DeviceTooSmallError: ErrorCode.DEVICE_TOO_SMALL,
    BeyondCapacityError: ErrorCode.BEYOND_CAPACITY,
}


def wire_code_of(error_class: type[EngineError]) -> ErrorCode:
    """The wire code of an engine error class (its nearest listed ancestor's)."""
    for ancestor in error_class.__mro__:
        code = ENGINE_ERROR_CODES.get(ancestor)
        if code is not None:
            return code
    raise AssertionError("EngineError is in the table")  # pragma: no cover


def error_code(exc: EngineError) -> ErrorCode:
    """The wire code of an engine error."""
    return wire_code_of(type(exc))
