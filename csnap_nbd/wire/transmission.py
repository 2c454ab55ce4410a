"""The transmission phase, byte by byte: request headers, simple replies,
structured reply chunks (data, hole, block status, error, none), and the
rules that decide whether a request may run at all (flags, bounds, sizes)
before any I/O is attempted.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from csnap_nbd.wire.constants import (
    MAX_STRING,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    ChunkType,
    Command,
    CommandFlag,
    Errno,
    ReplyFlag,
    TransmissionFlag,
)
from csnap_nbd.wire.errors import NbdProtocolError

__all__ = [
    "REQUEST",
    "SIMPLE_REPLY",
    "CHUNK_HEADER",
    "MAX_EXTENTS",
    "Request",
    "ReplyHeader",
    "ExportShape",
    "Refusal",
    "parse_request",
    "request",
    "simple_reply",
    "parse_reply_header",
    "decode_reply_header",
    "chunk",
    "offset_data_header",
    "offset_hole",
    "none_chunk",
    "error_chunk",
    "block_status_chunk",
    "parse_error_payload",
    "parse_block_status_payload",
    "check_request",
]

#: Magic, command flags, type, cookie, offset, length.
REQUEST = struct.Struct(">IHHQQI")
#: Magic, error, cookie.
SIMPLE_REPLY = struct.Struct(">IIQ")
#: Magic, flags, type, cookie, payload length.
CHUNK_HEADER = struct.Struct(">IHHQI")
_OFFSET = struct.Struct(">Q")
#: A chunk header and the offset of an OFFSET_DATA chunk, packed at once.
_DATA_HEADER = struct.Struct(">IHHQIQ")
_HOLE = struct.Struct(">QI")
_ERROR = struct.Struct(">IH")
_U32 = struct.Struct(">I")
_EXTENT = struct.Struct(">II")
#: Most descriptors one BLOCK_STATUS chunk may carry (spec limit 2^20).
MAX_EXTENTS = 1 << 20
_U32_MAX = (1 << 32) - 1
_DONE = int(ReplyFlag.DONE)
_OFFSET_DATA = int(ChunkType.OFFSET_DATA)


class Request(NamedTuple):
    """One request header's fields (a named tuple: one is made per request,
    at about half the cost of a frozen dataclass)."""

    flags: int
    command: int
    cookie: int
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class ReplyHeader:
    """A simple reply (structured False: error set, no type) or a chunk header."""

    structured: bool
    cookie: int
    error: int = 0
    flags: int = 0
    type: int = 0
    length: int = 0


def parse_request(data: bytes | bytearray) -> Request:
    """The request header at the start of `data` (REQUEST.size bytes)."""
    magic, flags, command, cookie, start, length = REQUEST.unpack_from(data)
    if magic != REQUEST_MAGIC:
        raise NbdProtocolError(f"bad request magic {magic:#x}")
    return Request(flags, command, cookie, start, length)


def request(command: int, cookie: int, offset: int, length: int, flags: int = 0) -> bytes:
    """A request header as a client sends it (tests and tools)."""
    return REQUEST.pack(REQUEST_MAGIC, flags, command, cookie, offset, length)


def simple_reply(cookie: int, error: int = 0) -> bytes:
    """A simple reply header; a successful READ's data follows it."""
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)


def parse_reply_header(data: bytes) -> tuple[int, int]:
    """The magic of a reply and how many more header bytes follow (tests, tools)."""
    (magic,) = _U32.unpack(data[:4])
    if magic == SIMPLE_REPLY_MAGIC:
        return magic, SIMPLE_REPLY.size - 4
    if magic == STRUCTURED_REPLY_MAGIC:
        return magic, CHUNK_HEADER.size - 4
    raise NbdProtocolError(f"bad reply magic {magic:#x}")


def decode_reply_header(data: bytes) -> ReplyHeader:
    """A full simple reply or chunk header (tests and tools)."""
    magic, _ = parse_reply_header(data)
    if magic == SIMPLE_REPLY_MAGIC:
        _, error, cookie = SIMPLE_REPLY.unpack(data)
        return ReplyHeader(False, cookie, error=error)
    _, flags, kind, cookie, length = CHUNK_HEADER.unpack(data)
    return ReplyHeader(True, cookie, flags=flags, type=kind, length=length)


def chunk(cookie: int, kind: int, payload: bytes = b"", *, done: bool) -> bytes:
    flags = ReplyFlag.DONE if done else 0
    return CHUNK_HEADER.pack(STRUCTURED_REPLY_MAGIC, flags, kind, cookie, len(payload)) + payload


def offset_data_header(cookie: int, offset: int, size: int, *, done: bool) -> bytes:
    """Header of an OFFSET_DATA chunk; `size` bytes of data follow it."""
    if not 0 < size <= _U32_MAX - 8:
        raise ValueError(f"an OFFSET_DATA chunk carries 1..2^32-9 bytes, not {size}")
    flags = _DONE if done else 0
    return _DATA_HEADER.pack(STRUCTURED_REPLY_MAGIC, flags, _OFFSET_DATA, cookie, size + 8, offset)


def offset_hole(cookie: int, offset: int, size: int, *, done: bool) -> bytes:
    if not 0 < size <= _U32_MAX:
        raise ValueError(f"a hole is 1..2^32-1 bytes, not {size}")
    return chunk(cookie, ChunkType.OFFSET_HOLE, _HOLE.pack(offset, size), done=done)


def none_chunk(cookie: int) -> bytes:
    """The empty final chunk: success, nothing more."""
    return chunk(cookie, ChunkType.NONE, done=True)


def error_chunk(cookie: int, error: int, message: str = "", *, done: bool = True) -> bytes:
    if error == 0:
        raise ValueError("an error chunk carries a nonzero error")
    text = message.encode()[: min(MAX_STRING, 0xFFFF)]
    payload = _ERROR.pack(error, len(text)) + text
    return chunk(cookie, ChunkType.ERROR, payload, done=done)


def parse_error_payload(payload: bytes) -> tuple[int, str]:
    """(error, message) of an ERROR chunk (tests and tools)."""
    error, size = _ERROR.unpack(payload[:6])
    return error, payload[6 : 6 + size].decode("utf-8", "replace")


def block_status_chunk(
    cookie: int, context_id: int, extents: Sequence[tuple[int, int]], *, done: bool
) -> bytes:
    """One context's descriptors: (length, flags) pairs, each length nonzero."""
    if not 0 < len(extents) <= MAX_EXTENTS:
        raise ValueError(f"a block status chunk carries 1..2^20 extents, not {len(extents)}")
    body = bytearray(_U32.pack(context_id))
    for length, flags in extents:
        if not 0 < length <= _U32_MAX:
            raise ValueError(f"extent length {length}")
        body += _EXTENT.pack(length, flags)
    return chunk(cookie, ChunkType.BLOCK_STATUS, bytes(body), done=done)


def parse_block_status_payload(payload: bytes) -> tuple[int, list[tuple[int, int]]]:
    """(context id, extents) of a BLOCK_STATUS chunk (tests and tools)."""
    (context_id,) = _U32.unpack(payload[:4])
    extents = [_EXTENT.unpack_from(payload, i) for i in range(4, len(payload), 8)]
    return context_id, [(length, flags) for length, flags in extents]


# -- may this request run? -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ExportShape:
    """What was negotiated for a connection, as far as request checks care."""

    size: int
    flags: TransmissionFlag
    structured: bool
    contexts: int
    max_payload: int
    #: `flags` as a plain int: IntFlag arithmetic costs more than the checks.
    flags_value: int = field(init=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "flags_value", int(self.flags))


@dataclass(frozen=True, slots=True)
class Refusal:
    error: Errno
    message: str


#: Flags each command may carry besides FUA (which every command may carry
#: once SEND_FUA is advertised); each needs its transmission flag as well.
#: Plain ints throughout: this runs for every request, and IntFlag arithmetic
#: costs more than the rest of the check.
_COMMAND_FLAGS: dict[int, int] = {
    Command.READ: int(CommandFlag.DF),
    Command.WRITE: 0,
    Command.DISC: 0,
    Command.FLUSH: 0,
    Command.TRIM: 0,
    Command.CACHE: 0,
    Command.WRITE_ZEROES: int(CommandFlag.NO_HOLE | CommandFlag.FAST_ZERO),
    Command.BLOCK_STATUS: int(CommandFlag.REQ_ONE),
}

#: The transmission flag that must have been advertised for a command.
_NEEDS: dict[int, int] = {
    Command.FLUSH: int(TransmissionFlag.SEND_FLUSH),
    Command.TRIM: int(TransmissionFlag.SEND_TRIM),
    Command.CACHE: int(TransmissionFlag.SEND_CACHE),
    Command.WRITE_ZEROES: int(TransmissionFlag.SEND_WRITE_ZEROES),
}

#: Command flags that need a transmission flag.
_FLAG_NEEDS: tuple[tuple[int, int, str], ...] = tuple(
    (int(flag), int(needs), str(flag.name))
    for flag, needs in (
        (CommandFlag.FUA, TransmissionFlag.SEND_FUA),
        (CommandFlag.DF, TransmissionFlag.SEND_DF),
        (CommandFlag.FAST_ZERO, TransmissionFlag.SEND_FAST_ZERO),
        (CommandFlag.NO_HOLE, TransmissionFlag.SEND_WRITE_ZEROES),
    )
)

_FUA = int(CommandFlag.FUA)
_READ_ONLY = int(TransmissionFlag.READ_ONLY)
_WRITES = frozenset({int(Command.WRITE), int(Command.TRIM), int(Command.WRITE_ZEROES)})
#: Commands whose length the advertised maximum block size bounds (the spec
#: names these four; TRIM and BLOCK_STATUS have no such limit).
_SIZED = frozenset(
    {int(Command.READ), int(Command.WRITE), int(Command.WRITE_ZEROES), int(Command.CACHE)}
)
_NO_SPACE = frozenset({int(Command.WRITE), int(Command.WRITE_ZEROES)})
_FLUSH = int(Command.FLUSH)
_DISC = int(Command.DISC)
_BLOCK_STATUS = int(Command.BLOCK_STATUS)


def check_request(req: Request, shape: ExportShape) -> Refusal | None:
    """Why this request must be refused before any I/O, or None if it may run.

    The checks run in the order docs/nbd.md ("Request checks") lists them,
    and the first that fails gives the error. DISC is never refused (it has
    no reply). Every offset, length and flag combination ends here or runs:
    nothing a client sends in a well-framed request may end the connection.
    """
    command = req.command
    allowed = _COMMAND_FLAGS.get(command)
    if allowed is None:
        return Refusal(Errno.EINVAL, f"unknown command {command}")
    if command == _DISC:
        return None
    flags = shape.flags_value
    if command in _WRITES and flags & _READ_ONLY:
        # Before "not advertised": a read-only export advertises no TRIM or
        # WRITE_ZEROES, and EPERM is the answer that explains why.
        return Refusal(Errno.EPERM, "the export is read-only")
    refusal = _negotiated(req, allowed, flags)
    if refusal is not None:
        return refusal
    if command == _BLOCK_STATUS and not (shape.structured and shape.contexts):
        return Refusal(Errno.EINVAL, "no metadata context was selected")
    if command == _FLUSH:
        if req.offset or req.length:
            # Reserved fields the client must send as zero.
            return Refusal(Errno.EINVAL, "a FLUSH carries offset and length 0")
        return None
    if command in _SIZED and req.length > shape.max_payload:
        return Refusal(
            Errno.EINVAL,
            f"{req.length} bytes in one {Command(command).name}"
            f" (the maximum block size is {shape.max_payload})",
        )
    if command == _BLOCK_STATUS and req.length == 0:
        # A descriptor's length is never 0, so no answer could describe it.
        return Refusal(Errno.EINVAL, "a BLOCK_STATUS of length 0")
    if req.offset + req.length > shape.size:
        # Writes past the end are "no space"; other accesses are invalid (spec).
        error = Errno.ENOSPC if command in _NO_SPACE else Errno.EINVAL
        return Refusal(error, f"{req.offset}+{req.length} is past the end ({shape.size})")
    return None


def _negotiated(req: Request, allowed: int, flags: int) -> Refusal | None:
    """Refuse a command or command flag this connection did not negotiate."""
    needed = _NEEDS.get(req.command)
    if needed is not None and not flags & needed:
        return Refusal(Errno.EINVAL, f"{Command(req.command).name} was not advertised")
    if req.flags & ~(allowed | _FUA):
        return Refusal(
            Errno.EINVAL, f"flags {req.flags:#x} are not valid for {Command(req.command).name}"
        )
    if req.flags:
        for flag, transmission, name in _FLAG_NEEDS:
            if req.flags & flag and not flags & transmission:
                return Refusal(Errno.EINVAL, f"flag {name} was not advertised")
    return None
