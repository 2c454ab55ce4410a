"""What a hostile peer sends: hypothesis strategies for byte streams that start
from valid csnap frames (encoded with csnap_protocol) and are then bent:
bytes flipped, cut, extended or spliced, length prefixes replaced by
oversized or empty ones, maps of the wrong shape, messages of the wrong
role or for the wrong state, chunks far outside the origin; sent in random
pieces, then closed, half-closed, or left unfinished (a slow sender).

`expect()` says what the service must do with a stream: decode it with the
same sans-IO codec the service uses, as the receiving role, and note where
the peer breaks the protocol or must be refused. The oracle checks the
service's transport, not the codec: that a broken stream ends with an
error or a closed connection, and that a valid one gets neither.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack
from hypothesis import strategies as st

from csnap_protocol import (
    MESSAGES,
    PROTOCOL_MAGIC,
    PROTOCOL_VERSION,
    Connection,
    ConnectionClosed,
    Hello,
    Message,
    QueryMap,
    QueryOwned,
    QuerySnapshotRead,
    QueryWrite,
    RemoteProtocolError,
    Role,
    encode_frame,
)
from csnap_protocol.schema import Ranges
from tests.protocol.strategies import values

__all__ = ["Script", "scripts", "expect", "Expected", "hello_frame"]

#: Messages a fuzzer never sends: an administrator's shutdown is not hostile,
#: it is obeyed, and would end the run.
EXCLUDED = frozenset({"hello", "shutdown"})
ROLE_NAMES = [role.value for role in Role]


def hello_frame(role: str, *, max_frame: int = 1 << 20, magic: str = PROTOCOL_MAGIC) -> bytes:
    return encode_frame(Hello(magic, PROTOCOL_VERSION, role, max_frame, "fuzz"))


@st.composite
def _hellos(draw: st.DrawFn) -> bytes:
    """Mostly good hellos, in every role; some of another protocol or version."""
    role = draw(st.sampled_from(ROLE_NAMES))
    max_frame = draw(st.sampled_from([0, 4096, 1 << 16, 1 << 20, 0xFFFF_FFFF]))
    kind = draw(st.sampled_from(["good"] * 6 + ["magic", "version"]))
    if kind == "magic":
        return hello_frame(role, max_frame=max_frame, magic="nbd")
    if kind == "version":
        body = Hello(PROTOCOL_MAGIC, PROTOCOL_VERSION, role, max_frame, None).to_wire()
        body["version"] = draw(st.integers(2, 0xFFFF))
        payload = msgpack.packb(body, use_bin_type=True)
        return len(payload).to_bytes(4, "big") + payload
    return hello_frame(role, max_frame=max_frame)


#: Chunk ranges mostly inside a small origin's first chunks, so that requests
#: do real work (copies, locks), sometimes anywhere in the u64 space.
_near = st.tuples(st.integers(0, 63), st.integers(1, 4))
_ranges = st.lists(_near, min_size=1, max_size=4).map(tuple) | values(Ranges(8192))


def _message(cls: type[Message]) -> st.SearchStrategy[Message]:
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for name, spec in cls.FIELDS.items():
        if name == "ranges" and cls in (QueryWrite, QuerySnapshotRead, QueryMap, QueryOwned):
            fields[name] = _ranges
        elif name in ("tag", "snapshot"):
            # Tags the service has, or might: small numbers, or none.
            fields[name] = st.one_of(st.integers(0, 3), values(spec))
        elif name == "id":
            fields[name] = st.integers(0, 8)  # repeated ids: duplicates in flight
        else:
            fields[name] = values(spec)
    return st.builds(cls, **fields)


_messages = st.sampled_from(
    sorted((c for t, c in MESSAGES.items() if t not in EXCLUDED), key=lambda c: c.TYPE)
).flatmap(_message)


def _messages_of(role: str) -> st.SearchStrategy[Message]:
    """Messages `role` may send: they pass the codec and reach the service."""
    allowed = [c for t, c in MESSAGES.items() if t not in EXCLUDED and Role(role) in c.SENDERS]
    if not allowed:
        return _messages
    return st.sampled_from(sorted(allowed, key=lambda c: c.TYPE)).flatmap(_message)


_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(1 << 63), (1 << 64) - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
    | st.binary(max_size=8)
)
_loose = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=10,
)


@st.composite
def _wrong_shapes(draw: st.DrawFn) -> bytes:
    """A msgpack map that names a message but holds the wrong fields or types."""
    name = draw(st.sampled_from(sorted(MESSAGES)) | st.text(max_size=10))
    cls = MESSAGES.get(name)
    body: Any = {"type": name}
    if cls is not None:
        for field in cls.FIELDS:
            if draw(st.booleans()):
                body[field] = draw(_loose)
    keys = st.text(max_size=6) | st.integers(-(1 << 63), (1 << 64) - 1)
    body.update(draw(st.dictionaries(keys, _loose, max_size=2)))
    if draw(st.integers(0, 9)) == 0:
        body = draw(_loose)  # not even a map
    payload = msgpack.packb(body, use_bin_type=True)
    return len(payload).to_bytes(4, "big") + payload


@st.composite
def _garbage(draw: st.DrawFn) -> bytes:
    payload = draw(st.binary(min_size=1, max_size=64))
    return len(payload).to_bytes(4, "big") + payload


_frames = st.one_of(
    _messages.map(encode_frame),
    _messages.map(encode_frame),
    _wrong_shapes(),
    _garbage(),
    _hellos(),
)

#: Length prefixes a hostile peer announces: empty, at or just over common
#: limits, a gigabyte, the most a u32 says.
_LENGTHS = [0, 1, 4096, 1 << 16, (1 << 16) + 1, 1 << 20, (1 << 20) + 1, 1 << 30, 0xFFFF_FFFF]


@dataclass(frozen=True)
class Script:
    """One hostile connection: the bytes, how they are cut, and how it ends."""

    data: bytes
    cuts: tuple[int, ...]
    #: "eof": half-close, then listen; "close": hang up at once; "linger":
    #: stay connected without another byte (a slow sender).
    ending: str
    mutation: str

    def pieces(self) -> list[bytes]:
        out, at = [], 0
        for cut in sorted({c for c in self.cuts if 0 < c < len(self.data)}):
            out.append(self.data[at:cut])
            at = cut
        out.append(self.data[at:])
        return [piece for piece in out if piece]


def _mutate(draw: st.DrawFn, data: bytes, starts: list[int]) -> tuple[bytes, str]:
    kind = draw(
        st.sampled_from(
            ["none", "none", "none", "none", "flip", "truncate", "extend", "length", "splice"]
        )
    )
    if kind == "none" or not data:
        return data, "none"
    buffer = bytearray(data)
    if kind == "flip":
        for _ in range(draw(st.integers(1, 4))):
            at = draw(st.integers(0, len(buffer) - 1))
            buffer[at] ^= draw(st.integers(1, 255))
    elif kind == "truncate":
        del buffer[draw(st.integers(0, len(buffer) - 1)) :]
    elif kind == "extend":
        buffer += draw(st.binary(min_size=1, max_size=32))
    elif kind == "length":
        at = draw(st.sampled_from(starts))
        buffer[at : at + 4] = draw(st.sampled_from(_LENGTHS)).to_bytes(4, "big")
    else:
        at = draw(st.integers(0, len(buffer)))
        buffer[at:at] = draw(st.binary(min_size=1, max_size=16))
    return bytes(buffer), kind


@st.composite
def scripts(draw: st.DrawFn, *, roles: list[str]) -> Script:
    """A hostile connection's bytes: usually a hello of one of `roles` first."""
    frames: list[bytes] = []
    role = draw(st.sampled_from(roles))
    if draw(st.integers(0, 9)) > 0:
        frames.append(hello_frame(role))
    # Mostly what this role may send (it gets past the codec to the service),
    # the rest anything at all.
    own = _messages_of(role).map(encode_frame)
    frames += draw(st.lists(st.one_of(own, own, own, own, own, own, _frames), max_size=8))
    starts, at = [0], 0
    for frame in frames:
        at += len(frame)
        starts.append(at)
    data, mutation = _mutate(draw, b"".join(frames), starts[:-1] or [0])
    cuts = tuple(draw(st.lists(st.integers(0, max(len(data), 1)), max_size=4)))
    ending = draw(st.sampled_from(["eof", "eof", "close", "linger"]))
    return Script(data, cuts, ending, mutation)


@dataclass(frozen=True)
class Expected:
    """What the service must do with a script."""

    #: The peer breaks the protocol or must be refused: the service must end
    #: the connection (with an error, unless the close resets the stream).
    ends: bool
    #: Why, for the failure message.
    why: str


def expect(script: Script, *, receiver: Role, max_frame: int, refused: set[str]) -> Expected:
    """Decode the script as the service will; `refused`: hello roles it turns away.

    A service also ends a connection whose peer sends a notice it does not
    take: pass such message types in `refused` too (as "notice:TYPE").
    """
    codec = Connection(receiver, max_frame=max_frame)
    codec.receive_data(script.data)
    if script.ending == "eof":
        codec.receive_data(b"")
    try:
        while (message := codec.next_message()) is not None:
            if isinstance(message, ConnectionClosed):
                return Expected(False, "closed cleanly")
            if isinstance(message, Hello):
                if message.role in refused:
                    return Expected(True, f"a {message.role} is refused")
            elif getattr(message, "id", None) is None and f"notice:{message.TYPE}" in refused:
                return Expected(True, f"{message.TYPE} is a notice it does not take")
    except RemoteProtocolError as exc:
        return Expected(True, f"protocol error: {exc}")
    return Expected(False, "valid so far")
