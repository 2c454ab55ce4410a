"""Every number of the NBD protocol the gateway speaks: magics, handshake and
transmission flags, option and reply codes, info types, commands, command
flags, structured reply chunk types, metadata context state bits, errors.

Values are from the NBD protocol specification (doc/proto.md of
NetworkBlockDevice/nbd). Error-like codes are written as (1 << 31) | n,
never 2 ^ 31 + 1 or 1 << 31 + 1, which mean something else in Python; a
unit test checks each against the spec's decimal value.
"""

from __future__ import annotations

import enum

__all__ = [
    "NBDMAGIC",
    "IHAVEOPT",
    "OPTION_REPLY_MAGIC",
    "REQUEST_MAGIC",
    "SIMPLE_REPLY_MAGIC",
    "STRUCTURED_REPLY_MAGIC",
    "HandshakeFlag",
    "ClientFlag",
    "TransmissionFlag",
    "Option",
    "Reply",
    "Info",
    "Command",
    "CommandFlag",
    "ReplyFlag",
    "ChunkType",
    "Errno",
    "STATE_HOLE",
    "STATE_ZERO",
    "MAX_STRING",
]

#: "NBDMAGIC": first 8 bytes the server sends.
NBDMAGIC = 0x4E42444D41474943
#: "IHAVEOPT": second 8 bytes of the greeting, and the start of every option.
IHAVEOPT = 0x49484156454F5054
#: Start of every option reply.
OPTION_REPLY_MAGIC = 0x0003E889045565A9
#: Start of every transmission request.
REQUEST_MAGIC = 0x25609513
#: Start of every simple reply.
SIMPLE_REPLY_MAGIC = 0x67446698
#: Start of every structured reply chunk.
STRUCTURED_REPLY_MAGIC = 0x668E33EF

#: Longest string (export name, context name, message) the spec allows.
MAX_STRING = 4096


class HandshakeFlag(enum.IntFlag):
    """16 bits the server sends after the magics."""

    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class ClientFlag(enum.IntFlag):
    """32 bits the client answers with; any other bit ends the connection."""

    C_FIXED_NEWSTYLE = 1 << 0
    C_NO_ZEROES = 1 << 1


class TransmissionFlag(enum.IntFlag):
    """16 bits describing an export, sent with its size."""

    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11
    BLOCK_STAT_PAYLOAD = 1 << 12


class Option(enum.IntEnum):
    """Options a client may send during the handshake."""

    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


class Reply(enum.IntEnum):
    """Option reply types; errors have bit 31 set."""

    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = (1 << 31) | 1
    ERR_POLICY = (1 << 31) | 2
    ERR_INVALID = (1 << 31) | 3
    ERR_PLATFORM = (1 << 31) | 4
    ERR_TLS_REQD = (1 << 31) | 5
    ERR_UNKNOWN = (1 << 31) | 6
    ERR_SHUTDOWN = (1 << 31) | 7
    ERR_BLOCK_SIZE_REQD = (1 << 31) | 8
    ERR_TOO_BIG = (1 << 31) | 9
    ERR_EXT_HEADER_REQD = (1 << 31) | 10


class Info(enum.IntEnum):
    """Information types carried by NBD_REP_INFO (and asked for by INFO/GO)."""

    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class Command(enum.IntEnum):
    """Transmission request types."""

    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7
    RESIZE = 8


class CommandFlag(enum.IntFlag):
    """16 bits of per-request flags."""

    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4
    PAYLOAD_LEN = 1 << 5


class ReplyFlag(enum.IntFlag):
    """16 bits of structured reply chunk flags."""

    DONE = 1 << 0


class ChunkType(enum.IntEnum):
    """Structured reply chunk types; error chunks have bit 15 set."""

    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    BLOCK_STATUS_EXT = 6
    ERROR = (1 << 15) | 1
    ERROR_OFFSET = (1 << 15) | 2


class Errno(enum.IntEnum):
    """The only error values a reply may carry (the spec fixes them, not the OS)."""

    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


#: base:allocation bit 0: not allocated in the backing store.
STATE_HOLE = 1 << 0
#: base:allocation bit 1: reads as zeroes.
STATE_ZERO = 1 << 1
