"""A stand-in for csnapd, or for the csnap-agent relaying to it, that answers
the gateway's start-up questions (get_server_info, get_status) with
whatever file paths it is told to report: what a process squatting on
csnapd's port or the agent's socket could do. Refuses every other request.

Run in-process (serve_fake) or as a process, possibly as another user:
  python -m tests.nbd.fakeserver [--unix PATH [--uid UID]]
      --origin PATH --store PATH
which prints "listening ADDRESS" once it accepts connections.
"""

from __future__ import annotations

import argparse
import os
import socket
import ssl
from functools import partial

import trio

from csnap_common import unix_address
from csnap_protocol import (
    Connection,
    ConnectionClosed,
    Error,
    ErrorCode,
    GetServerInfo,
    GetStatus,
    Message,
    Request,
    Role,
    ServerInfoReply,
    ServerRecord,
    StatusReply,
    StoreRecord,
)

CHUNK = 4096


def _answers(origin: str, store: str, origin_chunks: int) -> tuple[ServerRecord, StoreRecord]:
    info = ServerRecord(
        address="127.0.0.1:1",
        store=store,
        origin=origin,
        started_ns=1,
        epoch=1,
        state="active",
        clients=0,
        origin_clients=0,
        snapshot_clients=0,
        commits=0,
        requests=0,
    )
    status = StoreRecord(
        uuid=bytes(16),
        created_ns=1,
        chunk_size=CHUNK,
        block_size=4096,
        store_chunks=1024,
        origin_chunks=origin_chunks,
        data_chunks=1000,
        data_free=1000,
        meta_blocks=10,
        meta_free=10,
        exceptions=0,
        sequence=1,
        sweep_cursor=0,
        warn_at=80,
        keep_free=0,
        space_warning=False,
    )
    return info, status


async def _serve_one(
    socket_stream: trio.SocketStream,
    role: Role,
    origin: str,
    store: str,
    origin_chunks: int,
    tls: ssl.SSLContext | None,
) -> None:
    info, status = _answers(origin, store, origin_chunks)
    codec = Connection(role)
    stream: trio.abc.Stream = socket_stream
    if tls is not None:
        stream = trio.SSLStream(socket_stream, tls, server_side=True)
    async with stream:
        try:
            await stream.send_all(codec.hello())
            while True:
                data = await stream.receive_some(1 << 16)
                codec.receive_data(data)
                while (message := codec.next_message()) is not None:
                    if isinstance(message, ConnectionClosed):
                        return
                    reply: Message
                    if isinstance(message, GetServerInfo):
                        reply = ServerInfoReply(message.id, info)
                    elif isinstance(message, GetStatus):
                        reply = StatusReply(message.id, status, (), ())
                    elif isinstance(message, Request):
                        code = ErrorCode.INVALID_REQUEST
                        reply = Error(message.id, int(code), code.symbol, "a fake server")
                    else:
                        continue
                    await stream.send_all(codec.send(reply))
        except Exception:
            return  # the gateway went away or sent nonsense: this connection ends


async def serve_fake(
    listener: trio.SocketListener,
    *,
    origin: str,
    store: str,
    role: Role = Role.SERVER,
    origin_chunks: int = 256,
    tls: ssl.SSLContext | None = None,
) -> None:
    """Answer every connection to `listener` until cancelled; over TLS with
    `tls` (a server credential's context), in the clear without."""
    serve_one = partial(
        _serve_one, role=role, origin=origin, store=store, origin_chunks=origin_chunks, tls=tls
    )
    await trio.serve_listeners(serve_one, [listener])


async def tcp_listener() -> trio.SocketListener:
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    return listener


async def unix_listener(path: str, *, uid: int | None = None) -> trio.SocketListener:
    """A Unix listener; with `uid`, the process becomes that user before it
    listens (the socket's peer credentials are taken at listen())."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(unix_address(path))
    if uid is not None:
        os.setgid(uid)
        os.setuid(uid)
    sock.listen(16)
    return trio.SocketListener(sock)


async def _main(args: argparse.Namespace) -> None:
    if args.unix:
        listener = await unix_listener(args.unix, uid=args.uid)
        where, role = f"unix:{args.unix}", Role.AGENT
    else:
        listener = await tcp_listener()
        host, port = listener.socket.getsockname()[:2]
        where, role = f"{host}:{port}", Role.SERVER
    print(f"listening {where}", flush=True)
    await serve_fake(listener, origin=args.origin, store=args.store, role=role)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--unix")
    parser.add_argument("--origin", required=True)
    parser.add_argument("--store", required=True)
    parser.add_argument("--uid", type=int)
    trio.run(_main, parser.parse_args())


if __name__ == "__main__":
    main()
