"""A csnapd started in-process on a free loopback port, and data helpers that
do what a data-path client does with the answers.
"""

from __future__ import annotations

import os
import struct
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import trio

from csnap_client import AdminClient, Connector, DataClient, open_admin, open_client
from csnap_format.mkcsnap import format_store
from csnapd.server import Server, ServerConfig, serve
from tests.credentials import connector

CHUNK = 4096


@dataclass
class Running:
    """A server started for a test; `server` is the Server object serving."""

    config: ServerConfig
    host: str
    port: int
    stop: trio.Event
    server: Server

    @property
    def store(self) -> Path:
        return Path(self.config.store)

    @property
    def origin(self) -> Path:
        return Path(self.config.origin)

    def connector(self) -> Connector:
        return connector(self.host, self.port, self.config.store)

    def client(
        self, snapshot: int | None = None, *, reconnect: bool = True
    ) -> AbstractAsyncContextManager[DataClient]:
        return open_client(self.connector(), snapshot=snapshot, reconnect=reconnect)

    def admin(self) -> AbstractAsyncContextManager[AdminClient]:
        return open_admin(self.connector())


def make_store(
    directory: Path, *, store_size: int = 64 << 20, origin_size: int = 16 << 20
) -> ServerConfig:
    store, origin = directory / "store", directory / "origin"
    format_store(str(store), str(origin), store_size=store_size, origin_size=origin_size)
    return ServerConfig(store=str(store), origin=str(origin))


@asynccontextmanager
async def running(config: ServerConfig, **overrides: object) -> AsyncIterator[Running]:
    """Serve `config` until the block ends, then shut down cleanly."""
    config = replace(config, **overrides)  # type: ignore[arg-type]
    stop = trio.Event()
    started: list[Server] = []
    async with trio.open_nursery() as nursery:
        address = await nursery.start(partial(serve, config, stop=stop, on_start=started.append))
        host, _, port = address.rpartition(":")
        try:
            yield Running(config, host, int(port), stop, started[0])
        finally:
            stop.set()


def label(chunk: int, version: int) -> bytes:
    """Recognisable chunk contents."""
    return struct.pack("<QQ", chunk, version) * (CHUNK // 16)


def pwrite(path: Path, chunk: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, chunk * CHUNK)
    finally:
        os.close(fd)


def pread(path: Path, chunk: int, count: int = 1) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, count * CHUNK, chunk * CHUNK)
    finally:
        os.close(fd)


async def write_origin(client: DataClient, origin: Path, chunk: int, version: int) -> None:
    """An origin write as a client does it: ask, then write while granted."""
    async with client.origin_write([(chunk, 1)]):
        pwrite(origin, chunk, label(chunk, version))


async def read_snapshot(
    client: DataClient, server: Running, chunk: int, count: int = 1
) -> list[bytes]:
    """A snapshot read as a client does it: ask, read where told, release."""
    out: dict[int, bytes] = {}
    async with client.snapshot_read([(chunk, count)]) as plan:
        for first, n, store_chunk in plan.store:
            data = pread(server.store, store_chunk, n)
            for k in range(n):
                out[first + k] = data[k * CHUNK : (k + 1) * CHUNK]
        for first, n in plan.origin:
            data = pread(server.origin, first, n)
            for k in range(n):
                out[first + k] = data[k * CHUNK : (k + 1) * CHUNK]
    return [out[c] for c in range(chunk, chunk + count)]
