"""--metrics on every service while it does real work: csnapd serving an
NBD gateway's writes and reads and an administrator's snapshot create, the
gateway serving NBD clients, an agent starting csnapd and relaying an
administrator's requests, then losing it. Each /metrics is scraped over
HTTP and parsed with prometheus_client's parser; the counters move by what
the workload implies, and each service exposes exactly the families
docs/operations.md ("Monitoring") lists for it.
"""

from __future__ import annotations

import signal
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import trio

from csnap_client import (
    ServerError,
    find_server,
    open_admin,
    open_client,
    open_session,
)
from csnap_common.credentials import ROLE_CLIENT
from csnap_nbd.wire.constants import Command, Errno
from csnap_protocol import Identify, Role
from tests.credentials import connector
from tests.e2e.processes import csnap
from tests.nbd.rawclient import RawClient
from tests.ops.metrics_support import (
    Scrape,
    assert_documented,
    metrics_url,
    read_lines,
    scrape,
    scrape_until,
)
from tests.ops.support import LIMIT, make_store, running

pytestmark = pytest.mark.e2e

KIB = 1024


async def _nbd_workload(port: int, chunk: int) -> None:
    """On the origin: 4 writes of 64 KiB, 2 reads of 8 KiB, 1 read past the
    end (EINVAL); on snap-1: 1 read of 32 KiB. Each waited for in turn."""
    origin = await RawClient.tcp(port)
    try:
        await origin.go("origin")
        for n in range(4):
            await origin.request(
                Command.WRITE, n * 64 * KIB, 64 * KIB, cookie=n, payload=bytes([n + 1]) * 64 * KIB
            )
            assert (await origin.answer()).errors == []
        for n in range(2):
            await origin.request(Command.READ, n * 8 * KIB, 8 * KIB, cookie=10 + n)
            answer = await origin.answer()
            assert answer.errors == [] and len(answer.data) == 8 * KIB
        await origin.request(Command.READ, 1 << 40, chunk, cookie=20)
        assert (await origin.answer()).errors == [Errno.EINVAL]
    finally:
        await origin.aclose()
    snapshot = await RawClient.tcp(port)
    try:
        await snapshot.go("snap-1")
        await snapshot.request(Command.READ, 0, 32 * KIB, cookie=1)
        assert len((await snapshot.answer()).data) == 32 * KIB
    finally:
        await snapshot.aclose()


async def test_csnapd_and_gateway_count_their_work(tmp_path: Path) -> None:
    store, origin = make_store(tmp_path)
    async with running(
        ["csnapd", str(store), str(origin), "--metrics", "127.0.0.1:0"], tmp_path / "csnapd.log"
    ) as csnapd:
        lines = await read_lines(csnapd, 2)
        address = lines[0].removeprefix("listening ")
        host, _, port = address.rpartition(":")
        csnapd_metrics = metrics_url(lines)
        before = await scrape(csnapd_metrics)
        assert before.value("csnapd_server_state", state="active") == 1
        assert before.value("csnapd_snapshots", state="live") == 0
        assert before.value("csnapd_store_opened_clean") == 1  # as mkcsnap leaves it
        assert_documented(before, "csnapd")

        async with open_admin(connector(host, int(port), store)) as admin:
            await admin.create_snapshot(1)
            with pytest.raises(ServerError) as refused:
                await admin.delete_snapshot(99)
            chunk = (await admin.status()).store.chunk_size
        created = await scrape(csnapd_metrics)
        assert created.value("csnapd_requests_total", type="create_snapshot") == 1
        assert created.value("csnapd_snapshots", state="live") == 1
        assert (
            created.value("csnapd_errors_total", type="delete_snapshot", code=refused.value.name)
            == 1
        )
        assert created.value("csnapd_request_duration_seconds_count", type="create_snapshot") == 1
        assert created.value("csnapd_commits_total") > before.value("csnapd_commits_total")
        assert created.value("csnapd_fsyncs_total") >= created.value("csnapd_commits_total")
        assert created.value("csnapd_store_data_bytes", use="used") == 0

        argv = ["csnap_nbd", "--server", address, "--origin", str(origin), "--store", str(store)]
        argv += ["--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0"]
        async with running(argv, tmp_path / "nbd.log") as nbd:
            lines = await read_lines(nbd, 2)
            nbd_port = int(lines[0].rpartition(":")[2])
            gateway_metrics = metrics_url(lines)
            assert_documented(await scrape(gateway_metrics), "csnap-nbd")
            # csnapd is scraped all along: its commits run in a worker thread
            # while the metrics read the engine from the event loop.
            during: list[Scrape] = []
            async with trio.open_nursery() as nursery:

                async def scrape_csnapd() -> None:
                    while True:
                        during.append(await scrape(csnapd_metrics))

                nursery.start_soon(scrape_csnapd)
                await _nbd_workload(nbd_port, chunk)
                nursery.cancel_scope.cancel()
            assert during, "csnapd was not scraped during the workload"
            # A connection's end is counted after its last reply.
            found = await scrape_until(
                gateway_metrics, lambda s: s.value("csnap_nbd_connections") == 0
            )
            assert found.value("csnap_nbd_connections_accepted_total") == 2
            origin_requests = {"command": "write", "export": "origin"}
            assert found.value("csnap_nbd_requests_total", **origin_requests) == 4
            assert found.value("csnap_nbd_requests_total", export="origin", command="read") == 3
            assert found.value("csnap_nbd_requests_total", export="snap-1", command="read") == 1
            assert found.value("csnap_nbd_written_bytes_total", export="origin") == 256 * KIB
            assert found.value("csnap_nbd_read_bytes_total", export="origin") == 16 * KIB
            assert found.value("csnap_nbd_read_bytes_total", export="snap-1") == 32 * KIB
            assert found.value("csnap_nbd_errors_total", export="origin", errno="einval") == 1
            assert found.total("csnap_nbd_errors_total", export="snap-1") == 0
            assert found.value("csnap_nbd_export_connections", export="origin") == 0
            assert found.value("csnap_nbd_request_duration_seconds_count", **origin_requests) == 4
            assert_documented(found, "csnap-nbd")
            assert await nbd.terminate() == 0

        served = await scrape(csnapd_metrics)
        # The writes under snapshot 1 copied every chunk they touched out first.
        copied = 256 * KIB // chunk
        assert served.value("csnapd_copyout_chunks_total") == copied
        assert served.value("csnapd_store_data_bytes", use="used") == copied * chunk
        assert served.value("csnapd_store_exceptions") == copied
        assert served.total("csnapd_requests_total", type="query_write") >= 1
        assert served.value("csnapd_read_locks") == 0
        assert served.value("csnapd_parked_writes") == 0
        assert_documented(served, "csnapd")
        assert await csnapd.terminate() == 0


async def test_agent_reports_election_and_failover(tmp_path: Path) -> None:
    store, origin = make_store(tmp_path)
    agent_socket = tmp_path / "agent.sock"
    async with running(
        ["csnap_agent", "--socket", str(agent_socket), "--metrics", "127.0.0.1:0"],
        tmp_path / "agent.log",
    ) as agent:
        agent_metrics = metrics_url(await read_lines(agent, 2))
        await _only_get_metrics_is_served(agent_metrics)
        alone = await scrape(agent_metrics)
        assert alone.value("csnap_agent_servers", state="active") == 0
        assert alone.value("csnap_agent_coordinator", kind="LocalCoordinator") == 1
        assert_documented(alone, "csnap-agent")

        argv = ["csnapd", str(store), str(origin), "--agent", str(agent_socket), "--lease", "60"]
        async with running([*argv, "--metrics", "127.0.0.1:0"], tmp_path / "csnapd.log") as csnapd:
            lines = await read_lines(csnapd, 2)
            address = lines[0].removeprefix("listening ")
            with trio.fail_after(LIMIT):
                await find_server(str(agent_socket), wait=True)
            assert (await scrape(metrics_url(lines))).value(
                "csnapd_server_state", state="active"
            ) == 1
            listed = await csnap(agent_socket, "list")  # one get_status
            assert listed.returncode == 0, listed.stderr
            active = await scrape(agent_metrics)
            assert active.value("csnap_agent_servers", state="active") == 1
            assert active.value("csnap_agent_active_server", address=address, store=str(store)) == 1
            assert active.value("csnap_agent_activations_total") == 1
            assert active.value("csnap_agent_relayed_requests_total", type="get_status") == 1
            assert active.value("csnap_agent_active_since_seconds") > 0
            assert_documented(active, "csnap-agent")

            await _sweep_waits_for_a_detaching_client(
                agent_socket, address, metrics_url(lines), store
            )

            csnapd.process.send_signal(signal.SIGKILL)
            await csnapd.process.wait()
            lost = await scrape_until(
                agent_metrics, lambda s: s.value("csnap_agent_active_lost_total") == 1
            )
            assert lost.value("csnap_agent_servers", state="active") == 0
            assert lost.total("csnap_agent_active_server") == 0
            assert lost.value("csnap_agent_active_since_seconds") == 0
        assert await agent.terminate() == 0

    # Killed, the store opens next time by recovering from the crash.
    restart = [*argv[:3], "--metrics", "127.0.0.1:0"]
    async with running(restart, tmp_path / "restart.log") as again:
        recovered = await scrape(metrics_url(await read_lines(again, 2)))
        assert recovered.value("csnapd_store_opened_clean") == 0
        assert recovered.value("csnapd_journal_replayed_transactions") >= 1
        assert await again.terminate() == 0


async def _sweep_waits_for_a_detaching_client(
    agent_socket: Path, address: str, csnapd_metrics: str, store: Path
) -> None:
    """A deleted snapshot's space is swept only once its clients are gone: while
    one stays, status and metrics show the sweep waiting at 0%; then it ends."""
    host, _, port = address.rpartition(":")
    connect = connector(host, int(port), store, ROLE_CLIENT)
    assert (await csnap(agent_socket, "create", "5")).returncode == 0
    async with open_client(connect) as writer, writer.origin_write([(0, 4)]) as granted:
        assert granted.copied == 4  # snapshot 5 holds 4 exceptions
    async with trio.open_nursery() as nursery:
        # A client of snapshot 5 that does not leave when told it was deleted.
        session = await open_session(nursery, connect, Role.CLIENT)
        await session.request(Identify(1, 0x5EED, 5))
        assert (await csnap(agent_socket, "delete", "5")).returncode == 0
        waiting = await scrape(csnapd_metrics)
        assert waiting.value("csnapd_snapshots", state="deleting") == 1
        assert waiting.value("csnapd_sweep_progress_ratio") == 0
        assert waiting.value("csnapd_store_exceptions") == 4
        status = await csnap(agent_socket, "status")
        assert "being deleted (space not yet reclaimed): 5" in status.stdout, status.stdout
        assert "the sweep has visited 0% of the origin's chunks" in status.stdout
        await trio.aclose_forcefully(session.stream)
        nursery.cancel_scope.cancel()
    swept = await scrape_until(
        csnapd_metrics, lambda s: s.value("csnapd_snapshots", state="deleting") == 0
    )
    assert swept.value("csnapd_sweep_progress_ratio") == 1
    assert swept.value("csnapd_store_exceptions") == 0


async def _only_get_metrics_is_served(url: str) -> None:
    """Another path is 404, another method 405, and the endpoint serves on."""

    def status(target: str, method: str) -> int:
        request = urllib.request.Request(
            target, method=method, data=b"" if method == "POST" else None
        )
        try:
            with urllib.request.urlopen(request, timeout=LIMIT) as response:
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return exc.code

    base = url.removesuffix("/metrics")
    assert await trio.to_thread.run_sync(status, f"{base}/", "GET") == 404
    assert await trio.to_thread.run_sync(status, url, "POST") == 405
    assert await trio.to_thread.run_sync(status, url, "HEAD") == 200
    assert await trio.to_thread.run_sync(status, url, "GET") == 200
