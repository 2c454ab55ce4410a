"""The sans-IO codec: every message survives a round trip; any bytes in any
chunking give messages or RemoteProtocolError and nothing else; whole and
byte-at-a-time decoding agree; the handshake and role rules hold.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from csnap_protocol import (
    MESSAGES,
    PROTOCOL_VERSION,
    Connection,
    ConnectionClosed,
    ConnectionState,
    CreateSnapshot,
    Error,
    ErrorCode,
    Hello,
    LocalProtocolError,
    Message,
    QueryWrite,
    RemoteProtocolError,
    Role,
    SnapshotList,
    SnapshotReply,
    WriteOk,
    encode_frame,
)
from tests.protocol.strategies import any_message

SENDER = {Role.CLIENT: Role.SERVER, Role.SERVER: Role.CLIENT, Role.ADMIN: Role.SERVER}


def pair(a: Role, b: Role) -> tuple[Connection, Connection]:
    """Two connected codecs, handshake done."""
    left, right = Connection(a), Connection(b)
    right.receive_data(left.hello())
    assert isinstance(right.next_message(), Hello)
    left.receive_data(right.hello())
    assert isinstance(left.next_message(), Hello)
    assert left.state is right.state is ConnectionState.OPEN
    return left, right


def drain(conn: Connection) -> list[Message | ConnectionClosed]:
    out: list[Message | ConnectionClosed] = []
    while (message := conn.next_message()) is not None:
        out.append(message)
        if isinstance(message, ConnectionClosed):
            break
    return out


def feed(conn: Connection, data: bytes, sizes: list[int]) -> list[Message | ConnectionClosed]:
    """Feed `data` in pieces of the given sizes (then the rest), collecting messages."""
    out: list[Message | ConnectionClosed] = []
    at = 0
    for size in [*sizes, len(data)]:
        if at >= len(data):
            break
        conn.receive_data(data[at : at + size])  # never b"": that would mean EOF
        at += size
        out += drain(conn)
    return out


@given(any_message())
def test_every_message_round_trips(message: Message) -> None:
    sender_role = next(iter(sorted(message.SENDERS, key=lambda r: r.value)))
    receiver_role = Role.SERVER if sender_role is not Role.SERVER else Role.CLIENT
    if frozenset({Role.ADMIN}) == message.SENDERS:
        sender_role = Role.ADMIN
    sender, receiver = pair(sender_role, receiver_role)
    receiver.receive_data(sender.send(message))
    assert receiver.next_message() == message


@given(st.lists(any_message(), max_size=5), st.lists(st.integers(1, 40), max_size=30))
def test_whole_and_piecewise_decoding_agree(messages: list[Message], sizes: list[int]) -> None:
    sent = [m for m in messages if Role.CLIENT in m.SENDERS]
    client, server = pair(Role.CLIENT, Role.SERVER)
    data = b"".join(client.send(m) for m in sent)
    whole = feed(pair(Role.CLIENT, Role.SERVER)[1], data, [])
    piecewise = feed(server, data, sizes)
    bytewise = feed(pair(Role.CLIENT, Role.SERVER)[1], data, [1] * len(data))
    assert whole == piecewise == bytewise == sent


@given(st.binary(max_size=600), st.lists(st.integers(1, 64), max_size=20), st.booleans())
def test_arbitrary_bytes_yield_messages_or_protocol_errors(
    data: bytes, sizes: list[int], close: bool
) -> None:
    for conn in (Connection(Role.SERVER), pair(Role.CLIENT, Role.SERVER)[1]):
        try:
            feed(conn, data, sizes)
            if close:
                conn.receive_data(b"")
                drain(conn)
        except RemoteProtocolError:
            assert conn.state is ConnectionState.ERROR
            with pytest.raises(RemoteProtocolError):
                conn.next_message()


@given(any_message(), st.integers(0, 200), st.integers(0, 255))
def test_mutated_frames_yield_messages_or_protocol_errors(
    message: Message, position: int, value: int
) -> None:
    frame = bytearray(encode_frame(message))
    frame[position % len(frame)] = value
    conn = pair(Role.CLIENT, Role.SERVER)[1]
    try:
        conn.receive_data(bytes(frame))
        drain(conn)
    except RemoteProtocolError:
        assert conn.state is ConnectionState.ERROR


def frame_of(body: Any) -> bytes:
    payload = msgpack.packb(body, use_bin_type=True)
    return struct.pack(">I", len(payload)) + payload


def open_server() -> Connection:
    return pair(Role.CLIENT, Role.SERVER)[1]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (struct.pack(">I", 0), "empty frame"),
        (struct.pack(">I", (1 << 20) + 1), "exceeds the limit"),
        (frame_of([1, 2]), "must be a map"),
        (frame_of({"id": 1}), "needs a string 'type'"),
        (frame_of({"type": "launch_missiles"}), "unknown message type"),
        (frame_of({"type": "query_write", "id": 1, "ranges": [], "x": 1}), "unknown fields"),
        (frame_of({"type": "query_write", "id": True, "ranges": []}), "expected an integer"),
        (frame_of({"type": "query_write", "id": -1, "ranges": []}), "not in 0..4294967295"),
        (frame_of({"type": "query_write", "id": 1, "ranges": [[0, 0]]}), "count: 0 is not in"),
        (frame_of({"type": "query_write", "id": 1, "ranges": [[0]]}), "expected [chunk, count]"),
        (frame_of({"type": "query_write", "id": 1, "ranges": [[0, 1]] * 9000}), "exceed the limit"),
        (frame_of({"type": "query_write", "id": 1}), "expected an array"),
        (b"\x00\x00\x00\x05\xc1\xc1\xc1\xc1\xc1", "not valid msgpack"),
    ],
)
def test_malformed_frames_are_refused(data: bytes, message: str) -> None:
    conn = open_server()
    conn.receive_data(data)
    with pytest.raises(RemoteProtocolError) as info:
        conn.next_message()
    assert message in str(info.value)
    assert info.value.code is ErrorCode.PROTOCOL_ERROR
    assert conn.state is ConnectionState.ERROR


def test_a_message_before_hello_is_refused() -> None:
    conn = Connection(Role.SERVER)
    conn.receive_data(encode_frame(QueryWrite(1, ())))
    with pytest.raises(RemoteProtocolError, match="expected hello"):
        conn.next_message()


def test_a_second_hello_is_refused() -> None:
    _client, server = pair(Role.CLIENT, Role.SERVER)
    server.receive_data(encode_frame(Hello("csnap", PROTOCOL_VERSION, "client", 4096, None)))
    with pytest.raises(RemoteProtocolError, match="second hello"):
        server.next_message()


@pytest.mark.parametrize("version", [PROTOCOL_VERSION - 1, PROTOCOL_VERSION + 1])
def test_another_version_gets_version_mismatch(version: int) -> None:
    conn = Connection(Role.SERVER)
    conn.receive_data(encode_frame(Hello("csnap", version, "client", 4096, None)))
    with pytest.raises(RemoteProtocolError, match=f"version {PROTOCOL_VERSION}") as info:
        conn.next_message()
    assert info.value.code is ErrorCode.VERSION_MISMATCH


def test_a_role_may_send_only_its_messages() -> None:
    _client, server = pair(Role.CLIENT, Role.SERVER)
    server.receive_data(encode_frame(CreateSnapshot(1, 5, 0)))
    with pytest.raises(RemoteProtocolError, match="client may not send create_snapshot") as info:
        server.next_message()
    assert info.value.code is ErrorCode.WRONG_ROLE


def test_eof_mid_frame_is_an_error_and_clean_eof_closes() -> None:
    client, server = pair(Role.CLIENT, Role.SERVER)
    server.receive_data(client.send(QueryWrite(1, ((0, 1),)))[:-1])
    server.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="middle of a frame"):
        server.next_message()
    client, server = pair(Role.CLIENT, Role.SERVER)
    server.receive_data(b"")
    assert isinstance(server.next_message(), ConnectionClosed)
    assert server.state is ConnectionState.CLOSED


def test_local_errors() -> None:
    client, _server = pair(Role.CLIENT, Role.SERVER)
    with pytest.raises(LocalProtocolError, match="may not send write_ok"):
        client.send(WriteOk(1, 0))
    with pytest.raises(LocalProtocolError, match="not in"):
        client.send(QueryWrite(1, ((0, 0),)))
    with pytest.raises(LocalProtocolError, match="first message"):
        Connection(Role.CLIENT).send(QueryWrite(1, ()))
    too_many = tuple((i, 1) for i in range(9000))
    with pytest.raises(LocalProtocolError, match="exceed the limit"):
        client.send(QueryWrite(1, too_many))


def test_frames_larger_than_the_peers_limit_are_not_sent() -> None:
    client = Connection(Role.CLIENT)
    server = Connection(Role.SERVER, max_frame=4096)
    server.receive_data(client.hello())
    server.next_message()
    client.receive_data(server.hello())
    client.next_message()
    with pytest.raises(LocalProtocolError, match="frame limit 4096"):
        client.send(QueryWrite(1, tuple((1 << 40, 1) for _ in range(600))))


def test_registry_names_match_classes() -> None:
    for name, cls in MESSAGES.items():
        assert name == cls.TYPE
        assert cls.SENDERS


def test_after_a_peers_error_we_may_still_explain() -> None:
    client, server = pair(Role.CLIENT, Role.SERVER)
    server.receive_data(b"\xff\xff\xff\xff")
    with pytest.raises(RemoteProtocolError):
        server.next_message()
    data = server.send(Error(None, 1, "protocol_error", "frame too large"))
    client.receive_data(data)
    assert isinstance(client.next_message(), Error)
    with pytest.raises(LocalProtocolError, match="ERROR state"):
        server.send(WriteOk(1, 0))


def test_a_record_field_holding_anything_else_is_refused_on_send_and_framed_as_it_is() -> None:
    server, client = pair(Role.SERVER, Role.CLIENT)
    wrong = SnapshotReply(1, 7)  # type: ignore[arg-type]  # a hostile peer's record
    with pytest.raises(LocalProtocolError, match=r"snapshot\.snapshot: expected a map"):
        server.send(wrong)
    not_a_list = SnapshotList(2, 7)  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError, match="expected an array"):
        server.send(not_a_list)
    # encode_frame checks nothing: the bytes carry the value as it is, and
    # the receiving codec refuses them.
    client.receive_data(encode_frame(wrong))
    with pytest.raises(RemoteProtocolError, match=r"snapshot\.snapshot: expected a map"):
        client.next_message()
