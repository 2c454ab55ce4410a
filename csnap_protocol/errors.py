"""Protocol errors and the wire error codes.

Local/Remote split as in h11: a LocalProtocolError means we tried to send
something invalid (a bug on our side); a RemoteProtocolError means the peer
sent something invalid. After either, the connection is in the ERROR state
and must be closed.

ErrorCode is the stable numeric code carried by every `error` message, with
its symbolic name; docs/protocol.md lists them and a test keeps the table
in step with this enum.
"""

from __future__ import annotations

import enum

__all__ = [
    "ProtocolError",
    "LocalProtocolError",
    "RemoteProtocolError",
    "ErrorCode",
]


class ErrorCode(enum.IntEnum):
    """Error codes of the `error` message. Never renumbered."""

    #: A malformed frame or message; the connection is closed after the reply.
    PROTOCOL_ERROR = 1
    #: The peer speaks another protocol version or is not csnap at all.
    VERSION_MISMATCH = 2
    #: The message is not one this connection's role may send.
    WRONG_ROLE = 3
    #: A data-path query before `identify`.
    NOT_IDENTIFIED = 4
    #: A second `identify` on one connection.
    ALREADY_IDENTIFIED = 5
    #: A field has a value the server cannot accept (chunks outside the origin, ...).
    INVALID_REQUEST = 6
    #: The request would change more metadata than one transaction may carry.
    REQUEST_TOO_LARGE = 7
    #: No live snapshot has this tag.
    NO_SUCH_SNAPSHOT = 8
    #: A live snapshot already has this tag.
    SNAPSHOT_EXISTS = 9
    #: All 64 snapshot slots are in use.
    TOO_MANY_SNAPSHOTS = 10
    #: The snapshot's use count is not zero.
    SNAPSHOT_BUSY = 11
    #: The snapshot exists but cannot serve I/O (squashed).
    SNAPSHOT_UNAVAILABLE = 12
    #: No free chunk for a copy-out.
    STORE_FULL = 13
    #: No free block for the btree.
    METADATA_FULL = 14
    #: Reading or writing the store or the origin failed.
    IO_ERROR = 15
    #: Metadata read from the store is damaged.
    STORE_CORRUPT = 16
    #: A commit failed; the server accepts no more work.
    SERVER_FAILED = 17
    #: More requests in flight on this connection than the server allows.
    TOO_MANY_REQUESTS = 18
    #: The server has as many connections as it allows.
    TOO_MANY_CONNECTIONS = 19
    #: The server is shutting down.
    SHUTTING_DOWN = 20
    #: The snapshot this connection identified to was deleted.
    SNAPSHOT_DELETED = 21
    #: A request id already in flight on this connection.
    DUPLICATE_REQUEST = 22
    #: Origin clients did not finish their granted writes in time for a create.
    BARRIER_TIMEOUT = 23
    #: A bug in the server; the request did nothing.
    INTERNAL_ERROR = 24
    #: The server is on standby: its store is not open.
    NOT_ACTIVE = 25
    #: The agent has no active server to give or relay to.
    NO_SERVER = 26
    #: The peer did not authenticate: no TLS, or no credential of this cluster.
    AUTHENTICATION_FAILED = 30
    #: The peer's credential does not grant this role or request.
    NOT_PERMITTED = 31
    #: The server lost its election (its lease ran out, or the store carries a
    #: newer fencing token): it stopped writing and serving.
    FENCED = 40
    #: The origin is being reverted to a snapshot: the request would change
    #: what the revert copies (a create, a second revert, a write to or a
    #: delete of that snapshot).
    REVERT_IN_PROGRESS = 50
    #: A resize would shrink past data, metadata or a snapshot's size.
    SHRINK_REFUSED = 55
    #: A resize asks for more than the store or origin file or device holds.
    DEVICE_TOO_SMALL = 56
    #: A resize would grow the store past what it was formatted to grow to.
    BEYOND_CAPACITY = 57
    #: A resize that is not possible for another reason (an empty origin).
    RESIZE_REFUSED = 58

    @property
    def symbol(self) -> str:
        """The symbolic name carried with the code: "no_such_snapshot"."""
        return self.name.lower()


class ProtocolError(Exception):
    """A violation of the csnap protocol."""

    def __init__(self, message: str, code: ErrorCode = ErrorCode.PROTOCOL_ERROR):
        super().__init__(message)
        self.code = code


class LocalProtocolError(ProtocolError):
    """We tried to send something the protocol does not allow."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow."""
