"""Errors the engine raises to its callers.

Each carries a stable symbolic `code` that the protocol layer maps to a wire
error; the message is for people. Rule: a request that fails with an
EngineError has changed nothing (its staged changes are rolled back), except
EngineFailedError, after which the engine refuses all work until reopened.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "EngineError",
    "InvalidRequestError",
    "RequestTooLargeError",
    "OverlappingRangesError",
    "SnapshotNotFoundError",
    "SnapshotExistsError",
    "TooManySnapshotsError",
    "SnapshotBusyError",
    "SnapshotUnavailableError",
    "StoreFullError",
    "MetadataFullError",
    "StoreIOError",
    "StoreCorruptError",
    "EngineFailedError",
    "StoreOpenError",
    "StoreLockedError",
    "lost_chunk_error",
]


class EngineError(Exception):
    """Base of every error the engine reports to a caller."""

    #: Stable symbolic name, used on the wire and in logs.
    code: ClassVar[str] = "engine_error"


class InvalidRequestError(EngineError):
    """A request names chunks outside the origin, a bad value, or no chunks."""

    code = "invalid_request"


class OverlappingRangesError(InvalidRequestError):
    """A request names one chunk twice (repeated or overlapping ranges).

    Applying it would copy that chunk twice and give two exceptions of one
    chunk the same share bit: the store would be damaged for good.
    """


class RequestTooLargeError(InvalidRequestError):
    """One request names more chunks than the engine takes at once."""

    code = "request_too_large"


class SnapshotNotFoundError(EngineError):
    """No live snapshot has this tag."""

    code = "no_such_snapshot"


class SnapshotExistsError(EngineError):
    """A live snapshot already has this tag."""

    code = "snapshot_exists"


class TooManySnapshotsError(EngineError):
    """All 64 snapshot slots are taken (live, or still being deleted)."""

    code = "too_many_snapshots"


class SnapshotBusyError(EngineError):
    """The snapshot's use count is not zero, so it may not be deleted."""

    code = "snapshot_busy"


class SnapshotUnavailableError(EngineError):
    """The snapshot exists but cannot serve I/O (squashed)."""

    code = "snapshot_unavailable"


class RevertInProgressError(EngineError):
    """The request would change what a revert in progress copies (csnapd.engine.revert)."""

    code = "revert_in_progress"


class _SpaceError(EngineError):
    """Not enough free units; some may only be waiting for a commit."""

    def __init__(self, message: str, *, pending_frees: int = 0, wanted: int = 0):
        super().__init__(message)
        #: Units freed by the open transaction, usable once it is durable.
        self.pending_frees = pending_frees
        #: Free units the refused allocation asked for.
        self.wanted = wanted


class StoreFullError(_SpaceError):
    """No free chunk in the data area for a copy-out."""

    code = "store_full"


class MetadataFullError(_SpaceError):
    """No free block in the metadata area for a btree node."""

    code = "metadata_full"


class StoreIOError(EngineError):
    """Reading or writing the store or the origin failed."""

    code = "io_error"


class StoreCorruptError(EngineError):
    """A metadata block read from the store is damaged or inconsistent."""

    code = "store_corrupt"


def lost_chunk_error(tag: int, chunk: int) -> StoreCorruptError:
    """The error for a chunk whose copy a repair could not recover.

    docs/format.md, "Lost copies": such a chunk reads as an error on the
    snapshots that lost it, never as the origin's data.
    """
    return StoreCorruptError(
        f"snapshot {tag} chunk {chunk}: its copy was lost (csnap-check --repair marked it)"
    )


class EngineFailedError(EngineError):
    """A commit or sync failed; nothing more is accepted until a reopen.

    After a failed sync the page cache may have dropped the data, so neither
    retrying nor carrying on is safe: the only way on is recovery from the
    journal.
    """

    code = "engine_failed"


class FencedError(EngineError):
    """The store carries a newer fencing token: another server was elected since."""

    code = "fenced"


class StoreOpenError(EngineError):
    """The store cannot be opened: not a store, wrong origin, damaged."""

    code = "cannot_open"


class StoreLockedError(StoreOpenError):
    """Another server holds the store's lock (docs/rules.md, "one server per store")."""

    code = "store_locked"
