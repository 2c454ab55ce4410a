"""The sans-IO connection: bytes in, messages out; messages in, bytes out.

Framing: every message is a frame of a 4-byte big-endian length followed
by that many bytes of msgpack (a map). A frame longer than the receiver's
limit, an empty frame, a payload that is not a valid message, or a message
the peer's role may not send is a RemoteProtocolError; so is anything but
a hello first, or a hello later.

Handshake: the connecting side says hello first; the server answers with
its own hello, or instead with an `error` (too many connections, shutting
down, another protocol version) and closes. An error as the very first
message is therefore accepted and returned; the connection is then over.

States (docs/protocol.md, "Connection states"):
  HANDSHAKE --hello sent and received--> OPEN
  any --protocol error--> ERROR (poisoned: nothing more is received; after a
      peer's error we may still send one `error` message to say why)
  any --end of stream--> CLOSED

Rule: whatever bytes arrive, in whatever pieces, the receive side yields
messages or raises RemoteProtocolError, nothing else.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack

from csnap_protocol.errors import (
    ErrorCode,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
)
from csnap_protocol.messages import (
    MESSAGES,
    PROTOCOL_MAGIC,
    PROTOCOL_VERSION,
    Error,
    Hello,
    Message,
    Role,
)
from csnap_protocol.schema import FieldError

__all__ = [
    "Connection",
    "ConnectionState",
    "ConnectionClosed",
    "DEFAULT_MAX_FRAME",
    "MIN_MAX_FRAME",
    "encode_frame",
]

#: Largest frame accepted by default: ample for 8192 ranges or segments.
DEFAULT_MAX_FRAME = 1 << 20
#: No peer may ask for frames smaller than this (a hello must fit).
MIN_MAX_FRAME = 4096
_LENGTH = struct.Struct(">I")
#: First buffer of each message's packer: most messages fit; larger ones grow it.
_PACK_BUFFER = 512


class ConnectionState(enum.Enum):
    """Where a connection is in its life (docs/protocol.md)."""

    #: Waiting for the hellos to cross.
    HANDSHAKE = "handshake"
    #: Messages flow both ways.
    OPEN = "open"
    #: A protocol error happened; the connection must be closed.
    ERROR = "error"
    #: The peer closed its side.
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """Returned by next_message() once the peer has closed cleanly."""


def encode_frame(message: Message) -> bytes:
    """The frame for `message`, with no state checks (for tests and tools)."""
    payload = _pack(message.to_wire())
    return _LENGTH.pack(len(payload)) + payload


def _pack(wire: dict[str, Any]) -> bytes:
    """The msgpack bytes of a message's map.

    A packer of its own per message, starting small: msgpack.packb's packer
    starts with a 256 KiB buffer, which the services' allocator settings
    (csnap_common.allocator: buffers over 128 KiB are mapped and unmapped)
    turn into two system calls and a page fault for every message. None is
    kept between messages, so no connection holds a buffer the size of its
    largest message.
    """
    # (msgpack-types does not know the buf_size argument.)
    packer = msgpack.Packer(use_bin_type=True, buf_size=_PACK_BUFFER)  # type: ignore[call-arg]
    return packer.pack(wire)


def _decode(payload: bytes | bytearray) -> Message:
    """Turn one frame's payload into a message; RemoteProtocolError otherwise."""
    try:
        body = msgpack.unpackb(payload, raw=False, strict_map_key=True, use_list=True)
    except (ValueError, msgpack.UnpackException, TypeError) as exc:
        raise RemoteProtocolError(f"frame is not valid msgpack: {exc}") from exc
    if type(body) is not dict:
        raise RemoteProtocolError(f"a message must be a map, got {type(body).__name__}")
    kind = body.pop("type", None)
    if type(kind) is not str:
        raise RemoteProtocolError("a message needs a string 'type'")
    cls = MESSAGES.get(kind)
    if cls is None:
        raise RemoteProtocolError(f"unknown message type {kind!r}")
    layout = _layout(cls)
    if not body.keys() <= layout.names:
        extra = set(body) - layout.names
        raise RemoteProtocolError(f"{kind}: unknown fields {sorted(map(str, extra))}")
    try:
        # The fields in their declared order: the dataclass's own.
        values = [check(body.get(name), where) for name, check, _, where in layout.fields]
    except FieldError as exc:
        raise RemoteProtocolError(str(exc)) from exc
    return cls(*values)


_Check = Callable[[Any, str], Any]


@dataclass(frozen=True, slots=True)
class _Layout:
    """A message kind's fields, as the codec walks them."""

    #: The field names a map of this kind may carry.
    names: frozenset[str]
    #: Per field, in declared order: its name, its spec's check (a value
    #: from the wire) and out (a value to send), and its name in errors.
    fields: tuple[tuple[str, _Check, _Check, str], ...]


#: Per message kind, built once per kind, not for every message.
_LAYOUTS: dict[type[Message], _Layout] = {}


def _layout(cls: type[Message]) -> _Layout:
    layout = _LAYOUTS.get(cls)
    if layout is None:
        fields = tuple(
            (name, spec.check, spec.out, f"{cls.TYPE}.{name}") for name, spec in cls.FIELDS.items()
        )
        layout = _LAYOUTS[cls] = _Layout(frozenset(cls.FIELDS), fields)
    return layout


class Connection:
    """One end of a csnap protocol connection, without any I/O."""

    def __init__(self, role: Role, *, max_frame: int = DEFAULT_MAX_FRAME, name: str | None = None):
        self.our_role = role
        self.name = name
        #: The largest frame we accept.
        self.max_frame = max(max_frame, MIN_MAX_FRAME)
        #: The largest frame the peer accepts (known after its hello).
        self.peer_max_frame = MIN_MAX_FRAME
        self.peer_role: Role | None = None
        self.peer_name: str | None = None
        self.state = ConnectionState.HANDSHAKE
        self._buffer = bytearray()
        self._eof = False
        self._sent_hello = False
        self._received_hello = False
        self._sendable: dict[type[Message], bool] = {}
        #: Filled only once the peer's role is known (its hello).
        self._receivable: dict[type[Message], bool] = {}

    # -- sending -----------------------------------------------------------

    def hello(self) -> bytes:
        """The bytes of our hello (send it first)."""
        return self.send(
            Hello(PROTOCOL_MAGIC, PROTOCOL_VERSION, self.our_role.value, self.max_frame, self.name)
        )

    def send(self, message: Message) -> bytes:
        """The bytes that carry `message`.

        Raises:
            LocalProtocolError: the message is invalid or not ours to send now.
        """
        if self.state is ConnectionState.ERROR and not isinstance(message, Error):
            raise LocalProtocolError("the connection is in the ERROR state")
        kind = type(message)
        if not self._may_send(kind):
            raise LocalProtocolError(f"a {self.our_role.value} may not send {message.TYPE}")
        refusal = isinstance(message, Error) and not self._sent_hello
        if isinstance(message, Hello) == self._sent_hello and not refusal:
            raise LocalProtocolError("hello must be the first message, and only the first")
        # The map message.to_wire() makes, each field checked as the peer
        # will check it, in one pass.
        wire: dict[str, Any] = {"type": message.TYPE}
        try:
            for name, _, out, where in _layout(kind).fields:
                wire[name] = out(getattr(message, name), where)
        except FieldError as exc:
            # Nothing was produced: the connection is as it was.
            raise LocalProtocolError(str(exc)) from exc
        payload = _pack(wire)
        limit = self.peer_max_frame if self._received_hello else MIN_MAX_FRAME
        if len(payload) > limit and not isinstance(message, Hello):
            raise LocalProtocolError(
                f"{message.TYPE} of {len(payload)} bytes exceeds the peer's frame limit {limit}"
            )
        if isinstance(message, Hello):
            self._sent_hello = True
            self._maybe_open()
        return _LENGTH.pack(len(payload)) + payload

    # -- receiving ---------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes from the peer; b"" means it closed its side."""
        if data:
            self._buffer += data
        else:
            self._eof = True

    def next_message(self) -> Message | ConnectionClosed | None:
        """The next complete message, ConnectionClosed, or None (need more data).

        Raises:
            RemoteProtocolError: the peer broke the protocol; the connection is
                now in the ERROR state.
        """
        if self.state is ConnectionState.ERROR:
            raise RemoteProtocolError("the connection is in the ERROR state")
        try:
            return self._next()
        except ProtocolError as exc:
            self.state = ConnectionState.ERROR
            if isinstance(exc, RemoteProtocolError):
                raise
            raise RemoteProtocolError(str(exc), exc.code) from exc

    def _next(self) -> Message | ConnectionClosed | None:
        buffer = self._buffer
        if len(buffer) < 4:
            if self._eof:
                if buffer:
                    raise RemoteProtocolError("the peer closed in the middle of a frame")
                self.state = ConnectionState.CLOSED
                return ConnectionClosed()
            return None
        (length,) = _LENGTH.unpack_from(buffer)
        if length == 0:
            raise RemoteProtocolError("empty frame")
        if length > self.max_frame:
            raise RemoteProtocolError(
                f"frame of {length} bytes exceeds the limit of {self.max_frame}"
            )
        if len(buffer) < 4 + length:
            if self._eof:
                raise RemoteProtocolError("the peer closed in the middle of a frame")
            return None
        payload = buffer[4 : 4 + length]
        del buffer[: 4 + length]
        message = _decode(payload)
        return self._admit(message)

    def _admit(self, message: Message) -> Message:
        if not self._received_hello:
            if isinstance(message, Error) and self._sent_hello:
                # The side that connected said hello first; the accepting
                # side may refuse instead of greeting.
                self.state = ConnectionState.CLOSED
                return message
            if not isinstance(message, Hello):
                raise RemoteProtocolError(f"expected hello, got {message.TYPE}")
            if message.magic != PROTOCOL_MAGIC or message.version != PROTOCOL_VERSION:
                raise RemoteProtocolError(
                    f"peer speaks {message.magic!r} version {message.version}; this side speaks"
                    f" {PROTOCOL_MAGIC!r} version {PROTOCOL_VERSION}",
                    ErrorCode.VERSION_MISMATCH,
                )
            self.peer_role = Role(message.role)
            self.peer_name = message.name
            self.peer_max_frame = max(message.max_frame, MIN_MAX_FRAME)
            self._received_hello = True
            self._maybe_open()
            return message
        if isinstance(message, Hello):
            raise RemoteProtocolError("a second hello")
        if not self._may_receive(type(message)):
            assert self.peer_role is not None
            raise RemoteProtocolError(
                f"a {self.peer_role.value} may not send {message.TYPE}", ErrorCode.WRONG_ROLE
            )
        return message

    def _may_send(self, kind: type[Message]) -> bool:
        """Whether our role may send messages of `kind` (kept per kind: a
        role's membership in a set of roles is a Python-level hash)."""
        allowed = self._sendable.get(kind)
        if allowed is None:
            allowed = self._sendable[kind] = self.our_role in kind.SENDERS
        return allowed

    def _may_receive(self, kind: type[Message]) -> bool:
        """Whether the peer's role may send messages of `kind` (after its hello)."""
        allowed = self._receivable.get(kind)
        if allowed is None:
            allowed = self._receivable[kind] = self.peer_role in kind.SENDERS
        return allowed

    def _maybe_open(self) -> None:
        if self._sent_hello and self._received_hello and self.state is ConnectionState.HANDSHAKE:
            self.state = ConnectionState.OPEN
