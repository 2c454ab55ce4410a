"""The NBD wire format, byte by byte and without sockets: every constant
against the spec's decimal values, encoders against decoders, hostile
bytes into every parser (only the two protocol errors may come out), the
request checks, and metadata context selection.
"""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from csnap_nbd.wire import NbdProtocolError, OptionDataError
from csnap_nbd.wire import handshake as hs
from csnap_nbd.wire import transmission as tx
from csnap_nbd.wire.constants import (
    IHAVEOPT,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    ChunkType,
    ClientFlag,
    Command,
    CommandFlag,
    Errno,
    HandshakeFlag,
    Info,
    Option,
    Reply,
    TransmissionFlag,
)
from csnap_nbd.wire.contexts import (
    BASE_ALLOCATION,
    CSNAP_EXCEPTIONS,
    MetaContext,
    select_contexts,
    valid_query,
)


def test_constants_are_the_spec_values() -> None:
    assert NBDMAGIC.to_bytes(8, "big") == b"NBDMAGIC"
    assert IHAVEOPT.to_bytes(8, "big") == b"IHAVEOPT"
    assert OPTION_REPLY_MAGIC == 0x3E889045565A9
    assert (REQUEST_MAGIC, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC) == (
        0x25609513,
        0x67446698,
        0x668E33EF,
    )
    # Error codes with bit 31 (options) and bit 15 (chunks), as decimal in the spec.
    assert [int(r) for r in Reply] == [
        1,
        2,
        3,
        4,
        2147483649,
        2147483650,
        2147483651,
        2147483652,
        2147483653,
        2147483654,
        2147483655,
        2147483656,
        2147483657,
        2147483658,
    ]
    assert int(ChunkType.ERROR) == 32769 and int(ChunkType.ERROR_OFFSET) == 32770
    assert (ChunkType.NONE, ChunkType.OFFSET_DATA, ChunkType.OFFSET_HOLE) == (0, 1, 2)
    assert int(ChunkType.BLOCK_STATUS) == 5
    assert [int(o) for o in Option] == list(range(1, 12))
    assert [int(c) for c in Command] == list(range(9))
    assert [int(i) for i in Info] == [0, 1, 2, 3]
    assert {e.name: int(e) for e in Errno} == {
        "EPERM": 1,
        "EIO": 5,
        "ENOMEM": 12,
        "EINVAL": 22,
        "ENOSPC": 28,
        "EOVERFLOW": 75,
        "ENOTSUP": 95,
        "ESHUTDOWN": 108,
    }
    assert int(TransmissionFlag.CAN_MULTI_CONN) == 256
    assert int(TransmissionFlag.SEND_FAST_ZERO) == 2048
    assert int(CommandFlag.REQ_ONE) == 8 and int(CommandFlag.FAST_ZERO) == 16


def test_greeting_and_client_flags() -> None:
    greeting = hs.greeting(HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES)
    assert greeting == b"NBDMAGICIHAVEOPT\x00\x03"
    assert hs.parse_greeting(greeting) == 3
    offered = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES
    for good in (0, 1, 2, 3):
        assert hs.parse_client_flags(struct.pack(">I", good), offered) == good
    # Any unknown bit, high or low, ends the connection; so does NO_ZEROES
    # when it was not offered.
    for bad in (4, 1 << 31, 0x8000_0001, 0xFFFF_FFFF):
        with pytest.raises(NbdProtocolError):
            hs.parse_client_flags(struct.pack(">I", bad), offered)
    with pytest.raises(NbdProtocolError):
        hs.parse_client_flags(struct.pack(">I", ClientFlag.C_NO_ZEROES), HandshakeFlag(1))


def test_option_framing() -> None:
    assert hs.parse_option_header(hs.option(Option.GO, b"xy")[:16]) == hs.OptionHeader(7, 2)
    with pytest.raises(NbdProtocolError):
        hs.parse_option_header(struct.pack(">QII", NBDMAGIC, 7, 0))
    reply = hs.option_reply(Option.LIST, Reply.SERVER, b"data")
    assert hs.parse_option_reply_header(reply[:20]) == hs.OptionReplyHeader(3, 2, 4)
    error = hs.error_reply(Option.GO, Reply.ERR_UNKNOWN, "no such export")
    assert error[20:] == b"no such export"
    with pytest.raises(ValueError):
        hs.error_reply(Option.GO, Reply.ACK, "not an error")
    assert hs.export_name_reply(1 << 20, 3, no_zeroes=True) == struct.pack(">QH", 1 << 20, 3)
    assert len(hs.export_name_reply(1, 1, no_zeroes=False)) == 10 + 124


@given(st.text(max_size=300), st.lists(st.integers(0, 0xFFFF), max_size=20))
def test_info_request_round_trips(name: str, infos: list[int]) -> None:
    name = name.replace("\0", "")
    assert hs.parse_info_request(hs.info_request(name, infos)) == hs.InfoRequest(name, tuple(infos))


@given(st.text(max_size=100), st.lists(st.text(max_size=100), max_size=10))
def test_meta_context_request_round_trips(name: str, queries: list[str]) -> None:
    name = name.replace("\0", "")
    queries = [q.replace("\0", "") for q in queries]
    parsed = hs.parse_meta_context_request(hs.meta_context_request(name, queries))
    assert parsed == hs.MetaContextRequest(name, tuple(queries))


@given(st.binary(max_size=200))
def test_option_parsers_refuse_garbage_with_option_data_error_only(data: bytes) -> None:
    for parse in (hs.parse_info_request, hs.parse_meta_context_request, hs.parse_export_name):
        with contextlib.suppress(OptionDataError):
            parse(data)


def test_option_parsers_refuse_what_the_spec_forbids() -> None:
    with pytest.raises(OptionDataError):
        hs.parse_export_name(b"a\0b")  # NUL
    with pytest.raises(OptionDataError):
        hs.parse_export_name(b"\xff\xfe")  # not UTF-8
    with pytest.raises(OptionDataError):
        hs.parse_info_request(struct.pack(">I", 5000) + b"x" * 5000 + b"\0\0")  # > 4096
    with pytest.raises(OptionDataError):
        hs.parse_info_request(hs.info_request("a") + b"extra")
    with pytest.raises(OptionDataError):
        # A query count the data cannot hold is refused before looping over it.
        hs.parse_meta_context_request(struct.pack(">II", 0, 0xFFFF_FFFF))


@given(st.binary(min_size=28, max_size=28))
def test_request_parser_accepts_only_its_magic(data: bytes) -> None:
    try:
        req = tx.parse_request(data)
    except NbdProtocolError:
        assert data[:4] != struct.pack(">I", REQUEST_MAGIC)
    else:
        assert tx.request(req.command, req.cookie, req.offset, req.length, req.flags) == data


def test_replies() -> None:
    assert tx.simple_reply(7, 22) == struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, 22, 7)
    header = tx.offset_data_header(9, 4096, 10, done=True)
    assert tx.decode_reply_header(header[:20]) == tx.ReplyHeader(
        True, 9, flags=1, type=ChunkType.OFFSET_DATA, length=18
    )
    assert header[20:] == struct.pack(">Q", 4096)
    none = tx.none_chunk(3)
    assert tx.decode_reply_header(none) == tx.ReplyHeader(True, 3, flags=1, type=0, length=0)
    error = tx.error_chunk(4, Errno.EIO, "broken")
    assert tx.parse_error_payload(error[20:]) == (5, "broken")
    status = tx.block_status_chunk(5, 2, [(4096, 1), (512, 0)], done=False)
    assert tx.decode_reply_header(status[:20]).flags == 0
    assert tx.parse_block_status_payload(status[20:]) == (2, [(4096, 1), (512, 0)])
    hole = tx.offset_hole(6, 0, 512, done=True)
    assert hole[20:] == struct.pack(">QI", 0, 512)
    with pytest.raises(ValueError):
        tx.block_status_chunk(1, 1, [], done=True)
    with pytest.raises(ValueError):
        tx.block_status_chunk(1, 1, [(0, 0)], done=True)
    with pytest.raises(ValueError):
        tx.offset_data_header(1, 0, 0, done=True)
    with pytest.raises(ValueError):
        tx.error_chunk(1, 0)


FULL = (
    TransmissionFlag.HAS_FLAGS
    | TransmissionFlag.SEND_FLUSH
    | TransmissionFlag.SEND_FUA
    | TransmissionFlag.SEND_TRIM
    | TransmissionFlag.SEND_WRITE_ZEROES
    | TransmissionFlag.SEND_DF
    | TransmissionFlag.SEND_CACHE
)
SHAPE = tx.ExportShape(size=1 << 20, flags=FULL, structured=True, contexts=1, max_payload=1 << 16)


def refusal(command: int, offset: int = 0, length: int = 512, flags: int = 0) -> int:
    """The error check_request answers on SHAPE (0: the request may run)."""
    result = tx.check_request(tx.Request(flags, command, 1, offset, length), SHAPE)
    return 0 if result is None else int(result.error)


def test_request_checks() -> None:
    assert refusal(Command.READ) == 0
    assert refusal(Command.DISC, flags=0xFFFF) == 0  # nothing is answered anyway
    assert refusal(99) == Errno.EINVAL
    # Unknown flag bits, including ones the enum does not define.
    assert refusal(Command.READ, flags=1 << 9) == Errno.EINVAL
    assert refusal(Command.READ, flags=1 << 15) == Errno.EINVAL
    # FUA goes with any command once advertised; others only where documented.
    for command in (Command.READ, Command.WRITE, Command.TRIM, Command.CACHE):
        assert refusal(command, flags=CommandFlag.FUA) == 0, command
    assert refusal(Command.FLUSH, 0, 0, flags=CommandFlag.FUA) == 0
    assert refusal(Command.READ, flags=CommandFlag.REQ_ONE) == Errno.EINVAL
    assert refusal(Command.BLOCK_STATUS, flags=CommandFlag.REQ_ONE) == 0
    assert refusal(Command.WRITE_ZEROES, flags=CommandFlag.NO_HOLE) == 0
    assert refusal(Command.WRITE_ZEROES, flags=CommandFlag.FAST_ZERO) == Errno.EINVAL
    assert refusal(Command.READ, flags=CommandFlag.DF) == 0
    # Bounds: writes past the end are ENOSPC, the rest EINVAL.
    assert refusal(Command.READ, (1 << 20) - 1, 2) == Errno.EINVAL
    assert refusal(Command.WRITE, (1 << 20) - 1, 2) == Errno.ENOSPC
    assert refusal(Command.WRITE_ZEROES, 1 << 20, 1) == Errno.ENOSPC
    assert refusal(Command.TRIM, 1 << 20, 1) == Errno.EINVAL
    assert refusal(Command.BLOCK_STATUS, 1 << 20, 1) == Errno.EINVAL
    assert refusal(Command.CACHE, (1 << 20) - 1, 2) == Errno.EINVAL
    # offset + length past 2^64 is past the end, not a wrapped small number.
    for command in (Command.READ, Command.TRIM, Command.BLOCK_STATUS, Command.CACHE):
        assert refusal(command, (1 << 64) - 1, 2) == Errno.EINVAL, command
    assert refusal(Command.WRITE, (1 << 64) - 1, 2) == Errno.ENOSPC
    # Over the advertised maximum block size: EINVAL for the four commands it bounds.
    for command in (Command.READ, Command.WRITE, Command.WRITE_ZEROES, Command.CACHE):
        assert refusal(command, 0, (1 << 16) + 1) == Errno.EINVAL, command
        assert refusal(command, 0, 1 << 16) == 0, command
    assert refusal(Command.TRIM, 0, 1 << 20) == 0  # no maximum for trim
    assert refusal(Command.BLOCK_STATUS, 0, 1 << 20) == 0  # an answer may describe less
    # Length 0: a no-op everywhere but BLOCK_STATUS, which no descriptor can answer.
    for command in (Command.READ, Command.WRITE, Command.TRIM, Command.CACHE):
        assert refusal(command, 1 << 20, 0) == 0, command
        assert refusal(command, (1 << 20) + 1, 0) != 0, command  # but not past the end
    assert refusal(Command.WRITE_ZEROES, 0, 0) == 0
    assert refusal(Command.BLOCK_STATUS, 0, 0) == Errno.EINVAL
    # FLUSH's offset and length are reserved: zero, or EINVAL.
    assert refusal(Command.FLUSH, 0, 0) == 0
    assert refusal(Command.FLUSH, 1 << 40, 0) == Errno.EINVAL
    assert refusal(Command.FLUSH, 0, 1) == Errno.EINVAL


def test_request_checks_depend_on_negotiation() -> None:
    def check(command: int, shape: tx.ExportShape, flags: int = 0) -> int:
        result = tx.check_request(tx.Request(flags, command, 1, 0, 512), shape)
        return 0 if result is None else int(result.error)

    bare = tx.ExportShape(1 << 20, TransmissionFlag.HAS_FLAGS, False, 0, 1 << 16)
    for command in (Command.FLUSH, Command.TRIM, Command.CACHE, Command.WRITE_ZEROES):
        assert check(command, bare) == Errno.EINVAL, command
    assert check(Command.READ, bare, CommandFlag.FUA) == Errno.EINVAL
    assert check(Command.READ, bare, CommandFlag.DF) == Errno.EINVAL
    assert check(Command.BLOCK_STATUS, bare) == Errno.EINVAL
    no_contexts = tx.ExportShape(1 << 20, FULL, True, 0, 1 << 16)
    assert check(Command.BLOCK_STATUS, no_contexts) == Errno.EINVAL
    read_only = tx.ExportShape(1 << 20, TransmissionFlag.READ_ONLY | 1, True, 1, 1 << 16)
    for command in (Command.WRITE, Command.TRIM, Command.WRITE_ZEROES):
        assert check(command, read_only) == Errno.EPERM, command
    assert check(Command.READ, read_only) == 0


def test_context_selection() -> None:
    both = [BASE_ALLOCATION, CSNAP_EXCEPTIONS]
    assert select_contexts([], listing=True) == both
    assert select_contexts([], listing=False) == []
    assert select_contexts(["base:"], listing=True) == [BASE_ALLOCATION]
    assert select_contexts(["base:"], listing=False) == []  # SET ignores wildcards
    assert select_contexts(["csnap:exceptions", "base:allocation"], listing=False) == both
    assert select_contexts(["qemu:dirty-bitmap:a", "base:nope"], listing=True) == []
    diff = [MetaContext(16, "csnap:diff:2", 2), MetaContext(17, "csnap:diff:40", 40)]
    assert select_contexts(["csnap:diff:"], listing=True, bases=[40, 2]) == diff
    assert select_contexts(["csnap:diff:"], listing=False, bases=[40, 2]) == []
    assert select_contexts([], listing=True, bases=[2, 40]) == both + diff
    assert select_contexts(["csnap:"], listing=True, bases=[2]) == [CSNAP_EXCEPTIONS, diff[0]]
    # Ids depend on the selected bases, never on the order of the queries.
    queries = ["csnap:diff:40", "base:allocation", "csnap:diff:2"]
    assert select_contexts(queries, listing=False, bases=[2, 40]) == [BASE_ALLOCATION, *diff]
    for unknown in ("csnap:diff:3", "csnap:diff:02", "csnap:diff:-2", "csnap:diff:x"):
        assert select_contexts([unknown], listing=False, bases=[2, 40]) == [], unknown
    assert valid_query("base:") and valid_query("x-y:z")
    assert not valid_query("base") and not valid_query(":leaf")
