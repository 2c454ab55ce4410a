"""The /metrics endpoint on real loopback sockets: what it answers to
anything but a scrape, its bound on connections and request heads, an
address in use refused at start, and its guard held while collecting.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from csnap_common.credentials import make_credentials, store_credentials
from csnap_common.metrics import (
    MetricsListenError,
    ScrapeCollector,
    gauge,
    serve_metrics,
    service_registry,
)
from csnap_common.metrics.endpoint import MAX_HEAD, MAX_SCRAPES, READ_TIMEOUT
from tests.e2e.processes import poll
from tests.ops.support import LIMIT, make_store, running


class Guarded(ScrapeCollector):
    """One gauge: 1 if collected while its guard is held."""

    def __init__(self) -> None:
        self.held = False
        self.registry = service_registry(self)

    @contextlib.asynccontextmanager
    async def guard(self) -> AsyncIterator[None]:
        self.held = True
        try:
            yield
        finally:
            self.held = False

    def families(self) -> Iterator[Metric]:
        yield gauge("probe_guarded", "1 if the guard was held", self.held)


async def _exchange(port: int, data: bytes) -> bytes:
    """Send `data`, then read until the endpoint closes (or resets: it closed
    with our data unread)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    answer = b""
    async with stream:
        with trio.fail_after(LIMIT), contextlib.suppress(trio.BrokenResourceError):
            await stream.send_all(data)
            while chunk := await stream.receive_some(65536):
                answer += chunk
    return answer


async def test_endpoint_answers_scrapes_and_refuses_the_rest() -> None:
    collector = Guarded()
    async with trio.open_nursery() as nursery:
        url = await nursery.start(
            lambda task_status: serve_metrics(
                "127.0.0.1", 0, collector.registry, guard=collector.guard, task_status=task_status
            )
        )
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        answer = await _exchange(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"Connection: close" in head
        families = {f.name: f for f in text_string_to_metric_families(body.decode())}
        assert families["probe_guarded"].samples[0].value == 1  # collected under the guard
        assert "process_resident_memory_bytes" in families

        assert (await _exchange(port, b"nonsense\r\n\r\n")).startswith(b"HTTP/1.1 400 ")
        assert (await _exchange(port, b"GET /x HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 404 ")
        not_allowed = await _exchange(port, b"DELETE /metrics HTTP/1.1\r\n\r\n")
        assert not_allowed.startswith(b"HTTP/1.1 405 ") and b"Allow: GET, HEAD" in not_allowed
        # A head that never ends is not read past its bound: closed unanswered.
        assert await _exchange(port, b"GET /metrics HTTP/1.1\r\n" + b"X" * 2 * MAX_HEAD) == b""

        # Connections beyond MAX_SCRAPES at once are closed unanswered; the
        # endpoint serves again once those end.
        idle = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(MAX_SCRAPES)]

        async def refused() -> bool:  # once it has accepted all the idle ones
            return await _exchange(port, b"GET /metrics HTTP/1.1\r\n\r\n") == b""

        with trio.fail_after(READ_TIMEOUT / 2):  # before it closes them as too slow
            await poll(refused)
        for stream in idle:
            await stream.aclose()

        async def answered() -> bool:  # once it has seen the idle ones close
            return bool(await _exchange(port, b"GET /metrics HTTP/1.1\r\n\r\n"))

        with trio.fail_after(LIMIT):
            await poll(answered)
        nursery.cancel_scope.cancel()


async def test_address_in_use_is_refused() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(MetricsListenError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            await serve_metrics("127.0.0.1", port, Guarded().registry)


@pytest.mark.e2e
@pytest.mark.parametrize("service", ["csnapd", "csnap_agent", "csnap_nbd"])
async def test_service_with_metrics_address_in_use_exits_3(tmp_path: Path, service: str) -> None:
    store, origin = make_store(tmp_path)
    argv = {
        "csnapd": ["csnapd", str(store), str(origin)],
        "csnap_agent": ["csnap_agent", "--socket", str(tmp_path / "agent.sock")],
        "csnap_nbd": ["csnap_nbd", "--server", "127.0.0.1:1", "--origin", str(origin)],
    }[service]
    if service == "csnap_nbd":
        argv += ["--store", str(store), "--listen", "127.0.0.1:0"]
        # Its credential loads first; only the metrics address may be wrong.
        make_credentials(store_credentials(store))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        log = tmp_path / "service.log"
        async with running([*argv, "--metrics", f"127.0.0.1:{port}"], log) as started:
            with trio.fail_after(LIMIT):
                assert await started.process.wait() == 3
    assert f"cannot serve metrics on 127.0.0.1:{port}" in log.read_text(), log.read_text()
