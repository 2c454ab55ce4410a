"""The /metrics endpoint: a small HTTP/1.1 responder in the service's trio loop.

It answers `GET /metrics` (and HEAD) with prometheus_client's exposition of
one registry, in whichever format the scraper's Accept header asks for, and
closes the connection after each answer. Anything else gets 404 or 405. It
runs in the service's own event loop, so collectors read the service's
state between its steps, never while it is halfway through one; a service
whose work also runs in worker threads passes `guard`, held while
collecting.

Bounded like every other listener: at most MAX_SCRAPES connections at once
(others are closed at once), a request head of at most MAX_HEAD bytes, and
READ_TIMEOUT seconds to send it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

import trio
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import CollectorRegistry

from csnap_common.addresses import join_host_port

__all__ = ["serve_metrics", "MetricsListenError", "MAX_SCRAPES", "MAX_HEAD", "READ_TIMEOUT"]

log = logging.getLogger("csnap.metrics")

#: Scrape connections served at once; more are closed without an answer.
MAX_SCRAPES = 8
#: Largest request head (request line and headers) read, in bytes.
MAX_HEAD = 8192
#: Seconds a scraper has to send its request head.
READ_TIMEOUT = 5.0
#: Seconds a scraper has to take the answer.
WRITE_TIMEOUT = 10.0
PATH = "/metrics"

Guard = Callable[[], AbstractAsyncContextManager[object]]


class MetricsListenError(Exception):
    """The metrics address cannot be listened on."""


async def serve_metrics(
    host: str,
    port: int,
    registry: CollectorRegistry,
    *,
    guard: Guard | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `registry` at http://HOST:PORT/metrics until cancelled.

    Reports the URL through task_status once listening (port 0 picks one).

    Raises:
        MetricsListenError: the address cannot be listened on.
    """
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise MetricsListenError(
            f"cannot serve metrics on {join_host_port(host, port)}: {exc.strerror or exc}"
        ) from exc
    bound_host, bound_port = listeners[0].socket.getsockname()[:2]
    url = f"http://{join_host_port(bound_host, bound_port)}{PATH}"
    log.info("metrics on %s", url, extra={"event": "metrics.listening", "address": url})
    scrapes = trio.Semaphore(MAX_SCRAPES)
    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(_accept, listener, registry, guard, scrapes)
        task_status.started(url)


async def _accept(
    listener: trio.SocketListener,
    registry: CollectorRegistry,
    guard: Guard | None,
    scrapes: trio.Semaphore,
) -> None:
    async with listener, trio.open_nursery() as nursery:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:  # out of descriptors: wait instead of spinning
                log.warning("metrics: accept failed: %s", exc.strerror or exc)
                await trio.sleep(0.1)
                continue
            try:
                scrapes.acquire_nowait()
            except trio.WouldBlock:
                nursery.start_soon(trio.aclose_forcefully, stream)
                continue
            nursery.start_soon(_answer, stream, registry, guard, scrapes)


async def _answer(
    stream: trio.SocketStream,
    registry: CollectorRegistry,
    guard: Guard | None,
    scrapes: trio.Semaphore,
) -> None:
    try:
        async with stream:
            with trio.move_on_after(READ_TIMEOUT):
                head = await _read_head(stream)
            if head is None:
                return
            response = await _response(head, registry, guard)
            with (
                trio.move_on_after(WRITE_TIMEOUT),
                contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError),
            ):
                await stream.send_all(response)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        scrapes.release()


async def _read_head(stream: trio.SocketStream) -> bytes | None:
    """The request head, or None if the peer closed or sent too much."""
    data = bytearray()
    while b"\r\n\r\n" not in data and b"\n\n" not in data:
        if len(data) > MAX_HEAD:
            return None
        chunk = await stream.receive_some(MAX_HEAD)
        if not chunk:
            return None
        data += chunk
    return bytes(data)


async def _response(head: bytes, registry: CollectorRegistry, guard: Guard | None) -> bytes:
    lines = head.decode("latin-1").splitlines()
    parts = lines[0].split() if lines else []
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        return _plain(400, "Bad Request", "not an HTTP request\n")
    method, target = parts[0], parts[1]
    if target.split("?", 1)[0] != PATH:
        return _plain(404, "Not Found", f"only {PATH} is served here\n")
    if method not in ("GET", "HEAD"):
        return _plain(405, "Method Not Allowed", f"{PATH} answers GET\n", allow=True)
    accept = ""
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "accept":
            accept = value.strip()
    encoder, content_type = choose_encoder(accept)
    if guard is None:
        body = encoder(registry)
    else:
        async with guard():
            body = encoder(registry)
    return _head(200, "OK", content_type, len(body)) + (b"" if method == "HEAD" else body)


def _head(
    status: int, reason: str, content_type: str, length: int, *, allow: bool = False
) -> bytes:
    lines = [
        f"HTTP/1.1 {status} {reason}",
        f"Content-Type: {content_type}",
        f"Content-Length: {length}",
        "Connection: close",
    ]
    if allow:
        lines.append("Allow: GET, HEAD")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _plain(status: int, reason: str, text: str, *, allow: bool = False) -> bytes:
    body = text.encode()
    return _head(status, reason, "text/plain; charset=utf-8", len(body), allow=allow) + body
