"""The handshake phase, byte by byte: the fixed-newstyle greeting, the client
flags, option headers and their data, and every option reply the gateway
sends (export lists, export information, metadata contexts, errors).

Pure functions over bytes: the transport reads exactly the lengths these
structs name and hands the bytes here.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass

from csnap_nbd.wire.constants import (
    IHAVEOPT,
    MAX_STRING,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    ClientFlag,
    HandshakeFlag,
    Info,
    Reply,
)
from csnap_nbd.wire.errors import NbdProtocolError, OptionDataError

__all__ = [
    "GREETING",
    "CLIENT_FLAGS",
    "OPTION_HEADER",
    "OPTION_REPLY_HEADER",
    "OptionHeader",
    "OptionReplyHeader",
    "InfoRequest",
    "MetaContextRequest",
    "greeting",
    "parse_greeting",
    "parse_client_flags",
    "client_flags",
    "parse_option_header",
    "option",
    "option_reply",
    "parse_option_reply_header",
    "error_reply",
    "export_name_reply",
    "parse_export_name",
    "parse_info_request",
    "info_request",
    "parse_meta_context_request",
    "meta_context_request",
    "server_entry",
    "info_export",
    "info_name",
    "info_description",
    "info_block_size",
    "meta_context_entry",
]

#: NBDMAGIC, IHAVEOPT, handshake flags.
GREETING = struct.Struct(">QQH")
#: The client's 32 flag bits.
CLIENT_FLAGS = struct.Struct(">I")
#: IHAVEOPT, option, data length.
OPTION_HEADER = struct.Struct(">QII")
#: Reply magic, option, reply type, data length.
OPTION_REPLY_HEADER = struct.Struct(">QIII")
#: Export size and transmission flags, the answer to NBD_OPT_EXPORT_NAME.
_EXPORT_NAME_REPLY = struct.Struct(">QH")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_INFO_EXPORT = struct.Struct(">HQH")
_INFO_BLOCK_SIZE = struct.Struct(">HIII")


@dataclass(frozen=True, slots=True)
class OptionHeader:
    option: int
    length: int


@dataclass(frozen=True, slots=True)
class OptionReplyHeader:
    option: int
    reply: int
    length: int


@dataclass(frozen=True, slots=True)
class InfoRequest:
    """NBD_OPT_INFO / NBD_OPT_GO data: an export name and the info types asked for."""

    name: str
    infos: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class MetaContextRequest:
    """NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT data."""

    name: str
    queries: tuple[str, ...]


# -- greeting and client flags -------------------------------------------------


def greeting(flags: HandshakeFlag) -> bytes:
    """The server's first 18 bytes."""
    return GREETING.pack(NBDMAGIC, IHAVEOPT, flags)


def parse_greeting(data: bytes) -> HandshakeFlag:
    """A client's view of the greeting (tests and tools)."""
    magic, opt_magic, flags = GREETING.unpack(data)
    if magic != NBDMAGIC or opt_magic != IHAVEOPT:
        raise NbdProtocolError("not a fixed-newstyle NBD server")
    return HandshakeFlag(flags)


def client_flags(flags: ClientFlag) -> bytes:
    return CLIENT_FLAGS.pack(flags)


def parse_client_flags(data: bytes, offered: HandshakeFlag) -> ClientFlag:
    """The client's flags; any bit we did not offer ends the connection (spec MUST)."""
    (value,) = CLIENT_FLAGS.unpack(data)
    allowed = ClientFlag.C_FIXED_NEWSTYLE
    if offered & HandshakeFlag.NO_ZEROES:
        allowed |= ClientFlag.C_NO_ZEROES
    # int(): ~ on an IntFlag only complements the bits the enum defines, and
    # unknown bits are exactly what must be caught.
    if value & ~int(allowed):
        raise NbdProtocolError(f"unknown client flags {value:#x}")
    return ClientFlag(value)


# -- options ---------------------------------------------------------------------


def parse_option_header(data: bytes) -> OptionHeader:
    magic, opt, length = OPTION_HEADER.unpack(data)
    if magic != IHAVEOPT:
        raise NbdProtocolError(f"bad option magic {magic:#x}")
    return OptionHeader(opt, length)


def option(opt: int, data: bytes = b"") -> bytes:
    """An option as a client sends it (tests and tools)."""
    return OPTION_HEADER.pack(IHAVEOPT, opt, len(data)) + data


def option_reply(opt: int, reply: int, data: bytes = b"") -> bytes:
    return OPTION_REPLY_HEADER.pack(OPTION_REPLY_MAGIC, opt, reply, len(data)) + data


def parse_option_reply_header(data: bytes) -> OptionReplyHeader:
    magic, opt, reply, length = OPTION_REPLY_HEADER.unpack(data)
    if magic != OPTION_REPLY_MAGIC:
        raise NbdProtocolError(f"bad option reply magic {magic:#x}")
    return OptionReplyHeader(opt, reply, length)


def error_reply(opt: int, reply: Reply, message: str) -> bytes:
    """An error reply with a message for humans (errors may carry one)."""
    if not reply & (1 << 31):
        raise ValueError(f"{reply!r} is not an error reply")
    return option_reply(opt, reply, _clip(message))


def export_name_reply(size: int, flags: int, *, no_zeroes: bool) -> bytes:
    """The answer to NBD_OPT_EXPORT_NAME: size, flags, and 124 zeroes unless
    the client said it does not want them."""
    reply = _EXPORT_NAME_REPLY.pack(size, flags)
    return reply if no_zeroes else reply + bytes(124)


def parse_export_name(data: bytes) -> str:
    """NBD_OPT_EXPORT_NAME data is the bare name."""
    return _text(data, "export name")


class _Cursor:
    """Reads length-prefixed fields from an option's data, refusing overruns."""

    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    def take(self, size: int, what: str) -> bytes:
        end = self.pos + size
        if end > len(self.data):
            raise OptionDataError(f"option data ends inside the {what}")
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def u16(self, what: str) -> int:
        value: int = _U16.unpack(self.take(2, what))[0]
        return value

    def u32(self, what: str) -> int:
        value: int = _U32.unpack(self.take(4, what))[0]
        return value

    def string(self, what: str) -> str:
        size = self.u32(f"length of the {what}")
        if size > MAX_STRING:
            raise OptionDataError(f"{what} of {size} bytes (at most {MAX_STRING})")
        return _text(self.take(size, what), what)

    def end(self) -> None:
        if self.pos != len(self.data):
            raise OptionDataError(f"{len(self.data) - self.pos} bytes after the option data")


def parse_info_request(data: bytes) -> InfoRequest:
    """32-bit name length, name, 16-bit count, count 16-bit info types."""
    cursor = _Cursor(data)
    name = cursor.string("export name")
    count = cursor.u16("number of info requests")
    infos = tuple(cursor.u16("info request") for _ in range(count))
    cursor.end()
    return InfoRequest(name, infos)


def info_request(name: str, infos: Iterable[int] = ()) -> bytes:
    """INFO/GO data as a client sends it (tests and tools)."""
    wanted = tuple(infos)
    encoded = name.encode()
    return (
        _U32.pack(len(encoded))
        + encoded
        + _U16.pack(len(wanted))
        + b"".join(_U16.pack(i) for i in wanted)
    )


def parse_meta_context_request(data: bytes) -> MetaContextRequest:
    """32-bit name length, name, 32-bit query count, each query length-prefixed."""
    cursor = _Cursor(data)
    name = cursor.string("export name")
    count = cursor.u32("number of queries")
    # Each query needs at least its 4-byte length: refuse counts the data
    # cannot hold before looping over them.
    if count > (len(data) - cursor.pos) // 4:
        raise OptionDataError(f"{count} queries do not fit in {len(data)} bytes")
    queries = tuple(cursor.string("query") for _ in range(count))
    cursor.end()
    return MetaContextRequest(name, queries)


def meta_context_request(name: str, queries: Iterable[str] = ()) -> bytes:
    """LIST/SET_META_CONTEXT data as a client sends it (tests and tools)."""
    parts = [s.encode() for s in queries]
    encoded = name.encode()
    return (
        _U32.pack(len(encoded))
        + encoded
        + _U32.pack(len(parts))
        + b"".join(_U32.pack(len(p)) + p for p in parts)
    )


# -- reply payloads ----------------------------------------------------------------


def server_entry(name: str, description: str = "") -> bytes:
    """NBD_REP_SERVER data: one export of NBD_OPT_LIST."""
    encoded = name.encode()
    return _U32.pack(len(encoded)) + encoded + description.encode()


def info_export(size: int, flags: int) -> bytes:
    """NBD_INFO_EXPORT: the one info every INFO/GO success must carry."""
    return _INFO_EXPORT.pack(Info.EXPORT, size, flags)


def info_name(name: str) -> bytes:
    return _U16.pack(Info.NAME) + name.encode()


def info_description(text: str) -> bytes:
    return _U16.pack(Info.DESCRIPTION) + text.encode()


def info_block_size(minimum: int, preferred: int, maximum: int) -> bytes:
    """NBD_INFO_BLOCK_SIZE: min a power of two, preferred >= min, max a multiple of min."""
    if minimum < 1 or minimum & (minimum - 1) or preferred < minimum or maximum % minimum:
        raise ValueError(f"inconsistent block sizes {minimum}/{preferred}/{maximum}")
    return _INFO_BLOCK_SIZE.pack(Info.BLOCK_SIZE, minimum, preferred, maximum)


def meta_context_entry(context_id: int, name: str) -> bytes:
    """NBD_REP_META_CONTEXT data."""
    return _U32.pack(context_id) + name.encode()


def _text(data: bytes, what: str) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise OptionDataError(f"{what} is not UTF-8") from exc
    if "\0" in text:
        raise OptionDataError(f"{what} contains NUL")
    return text


def _clip(message: str) -> bytes:
    encoded = message.encode()[:MAX_STRING]
    return encoded.decode("utf-8", "ignore").encode()
