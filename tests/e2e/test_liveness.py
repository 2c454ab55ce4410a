"""Liveness against a real csnapd process (docs/protocol.md, "Liveness"): a
data-path node that stops (SIGSTOP) while holding read locks and owing
barriers loses them after the lease, and once continued it never returns
origin data that an origin write replaced meanwhile. And peers that do not
read their replies cost only their own connections.
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path

import pytest
import trio

from csnap_client import DataClient, open_admin, open_client
from csnap_format.mkcsnap import format_store
from csnap_nbd.backing import Backing
from csnap_nbd.datapath import SnapshotPath
from csnap_protocol import (
    Connection,
    ConnectionClosed,
    CreateSnapshot,
    GetStatus,
    Hello,
    Identified,
    Identify,
    Keepalive,
    Ok,
    QueryWrite,
    Role,
    SnapshotReply,
    WriteOk,
)
from csnapd.engine import FileDevice
from csnapd.engine.check import check_store
from tests.credentials import connector, secure, tls
from tests.e2e.processes import ROOT, poll, start_csnapd, tail
from tests.server.support import CHUNK, label, pread, pwrite

pytestmark = pytest.mark.e2e

LEASE = 2.0
#: Beyond the lease: how long the test waits for a release (a bound on a
#: hang, not a measure; the barrier timeout is far longer).
SLACK = 15.0


def make(tmp_path: Path) -> tuple[Path, Path]:
    store, origin = tmp_path / "store", tmp_path / "origin"
    format_store(str(store), str(origin), store_size=64 << 20, origin_size=16 << 20)
    return store, origin


async def test_a_stopped_node_loses_its_locks_and_never_reads_stale_data(
    tmp_path: Path,
) -> None:
    store, origin = make(tmp_path)
    chunk = 42
    pwrite(origin, chunk, label(chunk, 1))
    log = tmp_path / "csnapd.log"
    daemon, host, port = await start_csnapd(
        store, origin, log, "--lease", str(LEASE), "--barrier-timeout", "300"
    )
    connect = connector(host, port, store)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    try:
        async with open_admin(connect) as admin:
            await admin.create_snapshot(1)
            node = await trio.lowlevel.open_process(
                [
                    sys.executable,
                    "-m",
                    "tests.e2e.stopped_reader",
                    host,
                    str(port),
                    "1",
                    str(chunk),
                    str(origin),
                    str(store),
                ],
                stdout=subprocess.PIPE,
                env=env,
            )
            assert node.stdout is not None
            output = b""
            try:
                with trio.fail_after(60):
                    while b"locked\n" not in output:
                        data = await node.stdout.receive_some(4096)
                        assert data, f"the node exited early: {output!r}"
                        output += data
                    # It stops itself holding the lock; wait until it has.
                    await poll(_stopped(node.pid), interval=0.01)
                async with open_client(connect) as writer:
                    # The stopped node's lock parks this write until its
                    # lease runs out; then csnapd drops it and grants.
                    with trio.fail_after(LEASE + SLACK):
                        async with writer.origin_write([(chunk, 1)]) as grant:
                            pwrite(origin, chunk, label(chunk, 2))
                    assert grant.copied == 1  # the snapshot's data went to the store
                    # Its origin client owes this create's barrier no more.
                    with trio.fail_after(LEASE + SLACK):
                        created = await admin.create_snapshot(2)
                    assert created["tag"] == 2
                assert _state(node.pid) == "T", "the node ran while it should be stopped"
                node.send_signal(signal.SIGCONT)
                with trio.fail_after(60):
                    while not output.endswith(b"\n") or b"read " not in output:
                        data = await node.stdout.receive_some(4096)
                        if not data:
                            break
                        output += data
                    await node.wait()
            finally:
                if node.returncode is None:
                    node.kill()
                    await node.wait()
            lines = output.decode().split()
            # Its first origin read came after the lease: it asked again, and
            # read the snapshot's copy, not the origin write's data.
            assert "requeried" in lines, output
            assert f"read {label(chunk, 1)[:16].hex()}" in output.decode(), output
            assert node.returncode == 0, output
        assert daemon.process.returncode is None, tail(log)
        assert "silent for more than its lease" in log.read_text()
    finally:
        status = await daemon.stop()
    assert status == 0, tail(log)
    assert pread(origin, chunk) == label(chunk, 2)
    _assert_store_checks(store)


def _assert_store_checks(store: Path) -> None:
    device = FileDevice(store, writable=False)
    try:
        report = check_store(device)
    finally:
        device.close()
    assert report.exit_code == 0, report.problems[:3]


def _stopped(pid: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return _state(pid) == "T"

    return check


def _state(pid: int) -> str:
    """The process's state letter in /proc (T: stopped)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rpartition(")")[2].split()[0]


#: get_status requests the peer that never reads pipelines.
PIPELINED = 60_000
#: ... and the slow reader.
SLOW_PIPELINED = 20_000


async def test_peers_that_do_not_read_their_replies_lose_only_their_connections(
    tmp_path: Path,
) -> None:
    store, origin = make(tmp_path)
    log = tmp_path / "csnapd.log"
    daemon, host, port = await start_csnapd(store, origin, log)
    connect = connector(host, port, store)
    try:
        async with open_admin(connect) as admin, open_client(connect) as good:
            await admin.create_snapshot(1)
            served = 0
            version = 0

            async def serve_good_client() -> None:
                nonlocal served, version
                version += 1
                async with good.origin_write([(7, 1)]):
                    pwrite(origin, 7, label(7, version))
                assert (await admin.status()).store.chunk_size == CHUNK
                served += 1

            await serve_good_client()
            ends: dict[str, str] = {}
            with trio.fail_after(180):
                async with trio.open_nursery() as nursery:
                    flood = partial(_flood, host, port, store)
                    nursery.start_soon(flood, PIPELINED, None, ends, "deaf")
                    nursery.start_soon(flood, SLOW_PIPELINED, 0.01, ends, "slow")
                    before = served
                    while len(ends) < 2 or served == before:
                        assert daemon.process.returncode is None, tail(log)
                        with trio.fail_after(30):
                            await serve_good_client()
                        await trio.sleep(0.01)
            # Each lost its connection (or, reading slowly, got all its replies).
            assert ends["deaf"] == "closed by csnapd", ends
            assert ends["slow"] in ("closed by csnapd", "all replies read"), ends
            assert daemon.process.returncode is None, tail(log)
            assert "does not read its replies; closing it" in log.read_text()
            # csnapd serves on, after them.
            await serve_good_client()
            assert await admin.list_snapshots()
    finally:
        status = await daemon.stop()
    assert status == 0, tail(log)
    assert pread(origin, 7) == label(7, version)
    _assert_store_checks(store)


async def _flood(
    host: str,
    port: int,
    store: Path,
    requests: int,
    read_every: float | None,
    ends: dict[str, str],
    name: str,
) -> None:
    """An admin pipelining `requests` get_status; it never reads its replies
    (`read_every` None) or reads a little every `read_every` seconds."""
    raw = await trio.open_tcp_stream(host, port)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stream = await secure(raw, store)
    codec = Connection(Role.ADMIN)
    replies = 0

    async def read_some() -> bool:
        nonlocal replies
        data = await stream.receive_some(4096)
        codec.receive_data(data)
        while (message := codec.next_message()) is not None:
            replies += not isinstance(message, Hello | ConnectionClosed)
        return bool(data)

    async with stream:
        try:
            await stream.send_all(codec.hello())
            for first in range(1, requests + 1, 1000):
                last = min(first + 1000, requests + 1)
                await stream.send_all(
                    b"".join(codec.send(GetStatus(i)) for i in range(first, last))
                )
                if read_every is not None:
                    await read_some()
                    await trio.sleep(read_every)
            if read_every is None:
                # Never read: wait for csnapd to close it.
                while await stream.receive_some(1 << 16):
                    pass
            else:
                while replies < requests:
                    await trio.sleep(read_every)
                    if not await read_some():
                        break
                else:
                    ends[name] = "all replies read"
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
    ends[name] = "closed by csnapd"


async def test_the_gateway_reads_again_when_its_read_locks_lease_ran_out(
    tmp_path: Path,
) -> None:
    """csnap-nbd's snapshot read path, stalled between its read lock and its
    origin read for longer than the lease while another node overwrites the
    chunk: it must answer with the snapshot's data, not the new origin data."""
    store, origin = make(tmp_path)
    chunk = 42
    pwrite(origin, chunk, label(chunk, 1))
    log = tmp_path / "csnapd.log"
    daemon, host, port = await start_csnapd(store, origin, log, "--lease", str(LEASE))
    connect = connector(host, port, store)
    try:
        async with open_admin(connect) as admin:
            await admin.create_snapshot(1)
        # Without the owned map, so that the read takes a read lock (reads
        # placed by the map are tests/nbd/test_owned_map.py's).
        async with open_client(connect, snapshot=1, owned_map=False) as client:
            backing = Backing(str(origin), str(store), read_only=True)
            path = SnapshotPath(client, backing)
            reading = trio.lowlevel.current_task()
            stall = _StallHoldingLock(reading, client, (host, port, tls(store)), origin, chunk)
            trio.lowlevel.add_instrument(stall)
            try:
                with trio.fail_after(60):
                    data = await path.read(chunk * CHUNK, CHUNK)
            finally:
                trio.lowlevel.remove_instrument(stall)
                backing.close()
            assert stall.granted is not None, "the read never held a lock"
            assert stall.granted.copied == 1
            assert pread(origin, chunk) == label(chunk, 2)
            # The chunk's label says which version was read.
            assert bytes(data[:16]) == label(chunk, 1)[:16], "read the origin write's data"
            assert bytes(data) == label(chunk, 1)
        assert "silent for more than its lease" in log.read_text()
    finally:
        status = await daemon.stop()
    assert status == 0, tail(log)


class _StallHoldingLock(trio.abc.Instrument):
    """Freezes this whole process (as SIGSTOP would) the moment the reading
    task holds a read lock and has not yet read the origin; while frozen,
    another node writes the chunk through csnapd, waiting for its grant."""

    def __init__(
        self,
        task: trio.lowlevel.Task,
        client: DataClient,
        where: Where,
        origin: Path,
        chunk: int,
    ) -> None:
        self.task, self.client = task, client
        self.where, self.origin, self.chunk = where, origin, chunk
        self.granted: WriteOk | None = None

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task is self.task and self.granted is None and self.client._held:
            self.granted = _write_origin_blocking(self.where, self.origin, self.chunk)


#: csnapd's host and port, and the credential to reach it with.
Where = tuple[str, int, ssl.SSLContext]


def _connect_blocking(where: Where, timeout: float) -> ssl.SSLSocket:
    host, port, context = where
    sock = socket.create_connection((host, port), timeout=timeout)
    return context.wrap_socket(sock, server_hostname=None)


def _write_origin_blocking(where: Where, origin: Path, chunk: int) -> WriteOk:
    """An origin write by another node, without the (frozen) event loop.

    It sends keepalives while it waits, as csnap_client would.
    """
    codec = Connection(Role.CLIENT)
    keepalives = itertools.count(100)
    give_up = time.monotonic() + LEASE + SLACK
    with _connect_blocking(where, LEASE / 3) as sock:

        def receive() -> object:
            while (message := codec.next_message()) is None or isinstance(message, Ok):
                assert time.monotonic() < give_up, "no answer from csnapd"
                try:
                    codec.receive_data(sock.recv(1 << 16))
                except TimeoutError:
                    sock.sendall(codec.send(Keepalive(next(keepalives))))
            return message

        sock.sendall(codec.hello())
        assert isinstance(receive(), Hello)
        sock.sendall(codec.send(Identify(1, 99, None)))
        assert isinstance(receive(), Identified)
        # Parked behind the frozen reader's lock until csnapd drops it.
        sock.sendall(codec.send(QueryWrite(2, ((chunk, 1),))))
        reply = receive()
        assert isinstance(reply, WriteOk), reply
        pwrite(origin, chunk, label(chunk, 2))
    return reply


async def test_an_origin_write_granted_before_a_stall_asks_again(tmp_path: Path) -> None:
    """An origin client frozen between its grant and its write, for longer
    than the lease, while a snapshot is created (its barrier stops waiting
    for the frozen client): once running it must not write under the old
    grant, which skipped the new snapshot's copy-out."""
    store, origin = make(tmp_path)
    chunk = 17
    pwrite(origin, chunk, label(chunk, 1))
    log = tmp_path / "csnapd.log"
    daemon, host, port = await start_csnapd(
        store, origin, log, "--lease", str(LEASE), "--barrier-timeout", "300"
    )
    connect = connector(host, port, store)
    try:
        async with open_client(connect) as writer:
            where = (host, port, tls(store))
            stall = _StallHoldingGrant(trio.lowlevel.current_task(), writer, where)
            trio.lowlevel.add_instrument(stall)
            try:
                with trio.fail_after(60):
                    async with writer.origin_write([(chunk, 1)]) as grant:
                        pwrite(origin, chunk, label(chunk, 2))
            finally:
                trio.lowlevel.remove_instrument(stall)
            assert stall.created, "the write never held a grant"
            # It asked again, after the create: the snapshot's data was copied.
            assert grant.copied == 1
            assert writer.reconnects >= 1
        async with open_client(connect, snapshot=2) as reader:
            async with reader.snapshot_read([(chunk, 1)]) as plan:
                assert not plan.origin, "the snapshot still shares the overwritten chunk"
                copy = pread(store, plan.store[0][2])
            assert copy[:16] == label(chunk, 1)[:16], "the snapshot holds the later write"
        assert "silent for more than its lease" in log.read_text()
    finally:
        status = await daemon.stop()
    assert status == 0, tail(log)
    _assert_store_checks(store)


class _StallHoldingGrant(trio.abc.Instrument):
    """Freezes this process the moment the writing task holds an origin write
    grant and has not yet written; while frozen, an administrator on another
    node creates snapshot 2."""

    def __init__(self, task: trio.lowlevel.Task, client: DataClient, where: Where):
        self.task, self.client, self.where = task, client, where
        self.created = False

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task is self.task and not self.created and self.client._grants:
            _create_snapshot_blocking(self.where, 2)
            self.created = True


def _create_snapshot_blocking(where: Where, tag: int) -> None:
    """create_snapshot from another node, without the (frozen) event loop."""
    codec = Connection(Role.ADMIN)
    with _connect_blocking(where, LEASE + SLACK) as sock:

        def receive() -> object:
            while (message := codec.next_message()) is None:
                codec.receive_data(sock.recv(1 << 16))
            return message

        sock.sendall(codec.hello())
        assert isinstance(receive(), Hello)
        # Its barrier waits for the frozen origin client until csnapd drops it.
        sock.sendall(codec.send(CreateSnapshot(1, tag, 0)))
        reply = receive()
        assert isinstance(reply, SnapshotReply), reply
