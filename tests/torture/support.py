"""In-process csnapd and csnap-agent for the torture tests.

`serving()` runs the real csnapd Server class over an engine the test
opened itself, so the store's devices can be FaultyDevices and the test can
look at the server's connections and queues; otherwise it is what `serve()`
runs. `InThread` runs such a service in its own thread and trio loop, so a
hypothesis test (synchronous, one trio run per example) can hit the same
service example after example. `RawPeer` is a peer that speaks bytes, not
the protocol: whatever the test makes it send.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Generic, TypeVar

import msgpack
import trio
import trio.lowlevel

from csnap_agent.agent import Agent
from csnap_agent.cli import open_agent_listener
from csnap_client import AdminClient, Connector, DataClient, open_admin, open_client
from csnap_format.mkcsnap import format_store
from csnap_transport import DirectStream
from csnapd.credentials import server_tls
from csnapd.engine import Engine, FileDevice
from csnapd.server import Server, ServerConfig, serve
from tests.credentials import connector
from tests.torture.faulty import FaultyDevice

__all__ = [
    "Served",
    "serving",
    "Opened",
    "open_store",
    "make_files",
    "InThread",
    "AgentService",
    "agent_service",
    "RawPeer",
    "Heard",
    "parse_frames",
]

_T = TypeVar("_T")
_R = TypeVar("_R")


def make_files(
    directory: Path,
    *,
    store_size: int = 64 << 20,
    origin_size: int = 16 << 20,
    journal_size: int | None = None,
) -> ServerConfig:
    """A formatted store and origin in `directory`, and a config naming them."""
    store, origin = directory / "store", directory / "origin"
    format_store(
        str(store),
        str(origin),
        store_size=store_size,
        origin_size=origin_size,
        journal_size=journal_size,
    )
    return ServerConfig(store=str(store), origin=str(origin))


@dataclass
class Opened:
    """An engine over real files, with a FaultyDevice in front of each."""

    engine: Engine
    store: FaultyDevice
    origin: FaultyDevice


def open_store(config: ServerConfig, *, seed: int = 0) -> Opened:
    """Open the store as csnapd does (exclusive lock, journal replay), faults possible."""
    store = FaultyDevice(FileDevice(config.store, lock=True), seed=seed)
    # Writable, as csnapd opens it: a revert writes the origin.
    origin = FaultyDevice(FileDevice(config.origin, writable=True), seed=seed)
    try:
        engine = Engine.open(store, origin, cache_bytes=config.cache_bytes, owns_devices=True)
    except BaseException:
        store.close()
        origin.close()
        raise
    return Opened(engine, store, origin)


@dataclass
class Served:
    """A csnapd serving for a test."""

    server: Server
    host: str
    port: int

    def connector(self) -> Connector:
        return connector(self.host, self.port, self.server.config.store)

    def client(
        self, snapshot: int | None = None, *, reconnect: bool = False
    ) -> AbstractAsyncContextManager[DataClient]:
        return open_client(self.connector(), snapshot=snapshot, reconnect=reconnect)

    def admin(self) -> AbstractAsyncContextManager[AdminClient]:
        return open_admin(self.connector())


@asynccontextmanager
async def serving(config: ServerConfig, engine: Engine) -> AsyncIterator[Served]:
    """Serve `engine` on a free loopback port until the block ends.

    The engine is closed at the end, cleanly if the server stopped cleanly
    (the server does that), without committing anything if it failed.
    """
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    host, port = listeners[0].socket.getsockname()[:2]
    server = Server(config, engine, f"{host}:{port}", server_tls(config))
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(server.run, listeners))
            try:
                yield Served(server, host, port)
            finally:
                server.request_shutdown()
    finally:
        if server.failed:
            engine.close()  # commits nothing: the engine refuses all work


class InThread(Generic[_T]):
    """An async service running in its own thread and trio loop.

    `with InThread(factory) as value:` enters the async context manager the
    factory makes, in the thread, and hands back what it yields; `call(fn)`
    runs `fn` in that loop (to look at the service's state safely).
    """

    def __init__(self, factory: Callable[[], AbstractAsyncContextManager[_T]]):
        self._factory = factory
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._error: BaseException | None = None
        self._value: _T | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None

    def __enter__(self) -> _T:
        self._thread.start()
        if not self._ready.wait(60):
            raise TimeoutError("the service did not start")
        if self._error is not None:
            raise self._error
        assert self._value is not None
        return self._value

    def __exit__(self, *exc_info: object) -> None:
        if self._token is not None and self._stop is not None:
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self._thread.join(60)
        if self._thread.is_alive():
            raise TimeoutError("the service did not stop")
        if self._error is not None:
            raise self._error

    def call(self, fn: Callable[[], _R]) -> _R:
        assert self._token is not None
        return trio.from_thread.run_sync(fn, trio_token=self._token)

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        async with self._factory() as value:
            self._value = value
            self._ready.set()
            await self._stop.wait()


@dataclass
class AgentService:
    """A csnap-agent serving on a Unix socket."""

    agent: Agent
    path: str
    nursery: trio.Nursery


@asynccontextmanager
async def agent_service(
    path: str, server: ServerConfig | None = None
) -> AsyncIterator[AgentService]:
    """The real Agent class on a Unix socket at `path`, until the block ends.

    With `server`, a csnapd for that store registers with the agent (as
    `csnapd --agent` does) and is active before the block starts, so that
    administration is relayed to it.
    """
    sock = open_agent_listener(path)
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        agent = Agent()
        await nursery.start(agent.serve, listener)
        if server is not None:
            await nursery.start(partial(serve, replace(server, agent=path), stop=stop))
            for _ in range(1000):
                if agent.active is not None:
                    break
                await trio.sleep(0.01)
            else:
                raise TimeoutError("the server never became active")
        try:
            yield AgentService(agent, path, agent._nursery)
        finally:
            stop.set()
            if server is not None:
                for _ in range(3000):  # let csnapd close its store cleanly
                    if agent.active is None:
                        break
                    await trio.sleep(0.01)
            await listener.aclose()
            nursery.cancel_scope.cancel()


# -- a peer that sends whatever bytes it is given ---------------------------------


@dataclass
class Heard:
    """What a raw peer got back: decoded frames, and how the stream ended."""

    frames: list[dict[str, Any]]
    #: "eof" (closed cleanly), "reset", or "open" (still open when we stopped).
    end: str
    #: Bytes after the last whole frame (a frame cut short by the close).
    rest: bytes = b""

    def errors(self) -> list[dict[str, Any]]:
        return [f for f in self.frames if f.get("type") == "error"]

    def connection_error(self) -> dict[str, Any] | None:
        """The error with no id (a protocol error or refusal), if one came."""
        for frame in self.errors():
            if frame.get("id") is None:
                return frame
        return None


def parse_frames(data: bytes) -> tuple[list[dict[str, Any]], bytes]:
    """Frames a csnap peer sent, decoded without any protocol checks."""
    frames: list[dict[str, Any]] = []
    at = 0
    while len(data) - at >= 4:
        length = int.from_bytes(data[at : at + 4], "big")
        if len(data) - at - 4 < length:
            break
        body = msgpack.unpackb(data[at + 4 : at + 4 + length], raw=False)
        frames.append(body if isinstance(body, dict) else {"type": repr(body)})
        at += 4 + length
    return frames, data[at:]


class RawPeer:
    """A stream to a csnap service that sends raw bytes and records the answers."""

    def __init__(self, stream: trio.abc.Stream):
        self.stream = stream
        self.sent = 0
        self._received = bytearray()
        self._end = "open"

    async def send(self, data: bytes) -> bool:
        """Send bytes; False if the service already closed the connection."""
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        self.sent += len(data)
        return True

    async def send_eof(self) -> None:
        # TLS has no half-close: the end of the TCP stream under it is the
        # nearest thing (the service sees a TLS stream cut short).
        stream = self.stream
        if isinstance(stream, trio.SSLStream | DirectStream):
            stream = stream.transport_stream
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await stream.send_eof()  # type: ignore[attr-defined]

    async def listen(self, seconds: float) -> Heard:
        """Read what comes until the service closes, or for at most `seconds`."""
        with trio.move_on_after(seconds):
            while self._end == "open":
                try:
                    data = await self.stream.receive_some(1 << 16)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    self._end = "reset"  # the service closed with our bytes unread
                    break
                if not data:
                    self._end = "eof"
                    break
                self._received += data
        frames, rest = parse_frames(bytes(self._received))
        return Heard(frames, self._end, rest)

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)
