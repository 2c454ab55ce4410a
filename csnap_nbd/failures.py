"""How a request's failures reach the NBD client: csnapd's errors, a lost
or closed session and file errors become the NBD error to reply with, or
the end of the export."""

from __future__ import annotations

from types import TracebackType

from csnap_client import (
    ClientClosedError,
    ConnectionLostError,
    LeaseExpiredError,
    ServerError,
    SnapshotDeletedError,
)
from csnap_nbd.backing import BackingIOError
from csnap_nbd.wire.constants import Errno
from csnap_protocol import ErrorCode

__all__ = ["IOFailedError", "ExportGoneError", "Translated", "TRANSLATED"]

#: csnapd errors that mean the request can never succeed as asked.
_INVALID = frozenset({ErrorCode.INVALID_REQUEST, ErrorCode.REQUEST_TOO_LARGE})
_NO_SPACE = frozenset({ErrorCode.STORE_FULL, ErrorCode.METADATA_FULL})


class IOFailedError(Exception):
    """A request failed; `error` is the NBD error to reply with."""

    def __init__(self, error: Errno, message: str):
        super().__init__(message)
        self.error = error


class ExportGoneError(IOFailedError):
    """The export's snapshot was deleted (or its client closed): nothing more will work."""

    def __init__(self, message: str):
        super().__init__(Errno.EIO, message)


class Translated:
    """A context in which csnapd and file errors become NBD errors.

    A class, not a generator: it wraps every request, inline ones included,
    and entering a generator-based context costs several times more.
    """

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc is None:
            return
        if isinstance(exc, SnapshotDeletedError | ClientClosedError | ConnectionLostError):
            raise ExportGoneError(str(exc) or type(exc).__name__) from exc
        if isinstance(exc, ServerError):
            if exc.error in _NO_SPACE:
                raise IOFailedError(Errno.ENOSPC, str(exc)) from exc
            if exc.error in _INVALID:
                raise IOFailedError(Errno.EINVAL, str(exc)) from exc
            raise IOFailedError(Errno.EIO, str(exc)) from exc
        if isinstance(exc, LeaseExpiredError):
            raise IOFailedError(Errno.EIO, str(exc)) from exc
        if isinstance(exc, BackingIOError):
            raise IOFailedError(Errno.ENOSPC if exc.no_space else Errno.EIO, str(exc)) from exc


#: The one instance every request enters.
TRANSLATED = Translated()
