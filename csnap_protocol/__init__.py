"""csnap_protocol: the csnap wire protocol, sans-IO.

Owns the message types, msgpack framing, field validation and the
connection state machine, shared by the server, the agent, the client
library and the NBD gateway. Knows nothing of sockets, trio, the engine or
the on-disk format. docs/protocol.md describes every message; a test keeps
its tables in step with MESSAGES and ErrorCode.
"""

from __future__ import annotations

from csnap_protocol.bounds import largest_payload
from csnap_protocol.codec import (
    DEFAULT_MAX_FRAME,
    MIN_MAX_FRAME,
    Connection,
    ConnectionClosed,
    ConnectionState,
    encode_frame,
)
from csnap_protocol.errors import (
    ErrorCode,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
)
from csnap_protocol.messages import *  # noqa: F403 - the message catalogue is the API
from csnap_protocol.messages import __all__ as _messages

__all__ = [
    "Connection",
    "ConnectionClosed",
    "ConnectionState",
    "DEFAULT_MAX_FRAME",
    "MIN_MAX_FRAME",
    "encode_frame",
    "largest_payload",
    "ErrorCode",
    "ProtocolError",
    "LocalProtocolError",
    "RemoteProtocolError",
    *_messages,
]
