"""csnapd's memory stays bounded whatever its peers send (docs/protocol.md,
"Limits"): a real csnapd process, every table it keeps per connection or
per server driven to its limit at once, then the peers leave; three times.
Its resident memory (VmRSS in /proc/PID/status) must stay within
PEAK_BOUND of where it started while the tables are full, come back to
within SETTLED_BOUND once the peers have left, and not grow from one round
to the next (REPEAT_BOUND); csnapd must serve throughout.

The tables, and what bounds each (defaults, as csnapd runs by default):
  connections (Connections._links)     max_connections, 1024
  requests in flight (_Link.in_flight)  max_in_flight, 256 per connection
  parked origin writes (Dispatcher.parked)
                                        max_in_flight per origin connection
  read locks (Dispatcher.locks)         one count per origin chunk per
                                        snapshot connection: locks name
                                        only chunks inside the origin
  messages waiting for the engine (_Link.queued)
                                        QUEUED_LIMIT, 1024 per connection
  replies a peer does not read (_Link.outbox)
                                        OUTBOX_LIMIT, 4096; then csnapd
                                        closes that connection
  bytes of a frame not yet complete (the codec's buffer)
                                        max_frame, 1 MiB per connection
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from csnap_format.mkcsnap import format_store
from csnap_protocol import (
    BarrierDone,
    CreateSnapshot,
    Error,
    ErrorCode,
    GetServerInfo,
    GetStatus,
    Identify,
    Message,
    QuerySnapshotRead,
    QueryWrite,
    Role,
    ServerInfoReply,
    SnapshotReadOk,
    UploadLock,
)
from csnapd.connections import RELEASE_INTERVAL
from csnapd.server import OUTBOX_LIMIT, QUEUED_LIMIT, ServerConfig
from tests.server.support import CHUNK
from tests.torture.daemon import Csnapd, start_csnapd
from tests.torture.wire_peer import PeerClosed, SendStalled, WirePeer, get_status

pytestmark = pytest.mark.slow

DEFAULTS = ServerConfig(store="", origin="")
ORIGIN_CHUNKS = 4096
MAX_CHUNKS = DEFAULTS.max_chunks
#: How far above its starting RSS csnapd may stay once every peer has left:
#: the allocator keeps some of what the full tables used (freed, in pieces
#: the system cannot take back), not a table.
SETTLED_BOUND_KIB = 64 << 10
#: Filling the tables again and leaving again may add no more than this: a
#: table that keeps anything of a peer gone would grow with every round.
REPEAT_BOUND_KIB = 8 << 10
#: What the tables full at once (with the peers below) may cost above the start.
PEAK_BOUND_KIB = 256 << 10
CYCLES = 3
#: Seconds csnapd gets to let go of the peers (bounds a hang, measures nothing).
SETTLE_SECONDS = 30.0
REPLY_WAIT = 30.0
#: Seconds over which the settled RSS is the least one seen: csnapd hands
#: freed memory back every RELEASE_INTERVAL once connections have closed, and
#: on a loaded machine the last of them may close just after one of its looks.
SETTLE_RSS_SECONDS = 3 * RELEASE_INTERVAL
#: Upload requests of MAX_CHUNKS chunks each, every chunk a new one, mostly
#: outside the origin: a lock table keyed by whatever a peer names would grow
#: by hundreds of MiB.
UPLOADS = 600
#: Connections that each leave a frame of almost max_frame unfinished.
HALF_FRAMES = 32


def _reply(peer: WirePeer, request: int) -> Message:
    reply = peer.reply(request, REPLY_WAIT)
    assert reply is not None, f"no reply to request {request}"
    return reply


def _connect(
    csnapd: Csnapd, role: Role, *, receive_buffer: int | None = None, reads: bool = True
) -> WirePeer:
    peer = WirePeer(csnapd.address, role, csnapd.tls, receive_buffer=receive_buffer, reads=reads)
    assert peer.wait_open(REPLY_WAIT), f"no hello: {peer.connection_error!r}"
    return peer


def _identify(csnapd: Csnapd, snapshot: int | None, client: int) -> WirePeer:
    peer = _connect(csnapd, Role.CLIENT)
    request = peer.next_id()
    peer.send(Identify(request, client, snapshot))
    reply = _reply(peer, request)
    assert not isinstance(reply, Error), reply
    return peer


class Meter:
    """csnapd's RSS, sampled at each phase, for the failure message."""

    def __init__(self, csnapd: Csnapd):
        self.csnapd = csnapd
        self.samples: list[tuple[str, int]] = []
        self.started = time.monotonic()

    def sample(self, phase: str) -> int:
        rss = self.csnapd.rss_kib()
        self.samples.append((phase, rss))
        print(f"{time.monotonic() - self.started:6.1f}s {phase}: csnapd RSS {rss >> 10} MiB")
        return rss

    def peak(self) -> int:
        return max(rss for _, rss in self.samples)

    def report(self) -> str:
        return "; ".join(f"{phase} {rss >> 10} MiB" for phase, rss in self.samples)


@contextmanager
def csnapd_on_new_store(tmp_path: Path) -> Iterator[Csnapd]:
    store, origin = tmp_path / "store", tmp_path / "origin"
    format_store(str(store), str(origin), store_size=256 << 20, origin_size=ORIGIN_CHUNKS * CHUNK)
    csnapd = start_csnapd(store, origin, tmp_path / "csnapd.log", "--cache-size", "8M")
    try:
        yield csnapd
    finally:
        csnapd.kill()


def test_memory_returns_after_every_table_was_full(tmp_path: Path) -> None:
    with csnapd_on_new_store(tmp_path) as csnapd:
        meter = Meter(csnapd)
        admin = _connect(csnapd, Role.ADMIN)
        request = admin.next_id()
        admin.send(CreateSnapshot(request, 1, 0))
        assert not isinstance(_reply(admin, request), Error)
        admin.close()
        _warm_up(csnapd)
        start = meter.sample("start")
        after = [_fill_and_leave(csnapd, meter, cycle) for cycle in range(CYCLES)]
        assert meter.peak() - start <= PEAK_BOUND_KIB, (
            f"csnapd grew by {(meter.peak() - start) >> 10} MiB with its tables full"
            f" (bound {PEAK_BOUND_KIB >> 10} MiB): {meter.report()}"
        )
        assert after[0] - start <= SETTLED_BOUND_KIB, (
            f"csnapd kept {(after[0] - start) >> 10} MiB more than at the start once every"
            f" peer had left (bound {SETTLED_BOUND_KIB >> 10} MiB): {meter.report()}"
        )
        assert after[-1] - after[0] <= REPEAT_BOUND_KIB, (
            f"csnapd kept {(after[-1] - after[0]) >> 10} MiB more after filling its tables"
            f" {CYCLES} times than after once (bound {REPEAT_BOUND_KIB >> 10} MiB):"
            f" {meter.report()}"
        )


def _fill_and_leave(csnapd: Csnapd, meter: Meter, cycle: int) -> int:
    """Every table to its limit at once, then every peer leaves; the RSS after."""
    reader = _identify(csnapd, 1, client=10 * cycle + 1)
    notices = _identify(csnapd, None, client=10 * cycle + 3)
    peers = [reader, notices]
    # Messages waiting for the engine: notices as fast as TCP takes them.
    notices.send(*[BarrierDone(0)] * (50 * QUEUED_LIMIT))
    meter.sample(f"{cycle}: queued notices")
    # Read locks: the snapshot client reads the whole origin again and
    # again (one count per chunk), and uploads locks it never held.
    _read_locks(reader)
    _uploads(reader)
    meter.sample(f"{cycle}: read locks and uploads")
    # Parked writes and requests in flight: the origin is read-locked, so
    # every write parks until max_in_flight, then one more is refused.
    # Identified only now: a data-path client silent for longer than the
    # lease is dropped, and the phases above can take that long.
    writer = _identify(csnapd, None, client=10 * cycle + 2)
    peers.append(writer)
    _park_writes(writer)
    meter.sample(f"{cycle}: parked writes")
    # Frames left unfinished, just under max_frame each.
    peers += _half_frames(csnapd)
    meter.sample(f"{cycle}: unfinished frames")
    # The outbox of a peer that never reads: csnapd must close it, only it.
    _deaf_flood(csnapd)
    _still_serves(csnapd, "a peer that does not read its replies")
    meter.sample(f"{cycle}: a peer that does not read")
    # Connections: up to max_connections, and one more is refused.
    peers += _fill_connections(csnapd)
    meter.sample(f"{cycle}: max_connections")
    for peer in peers:
        peer.close()
    return _after_peers_leave(csnapd, meter, cycle)


def _warm_up(csnapd: Csnapd) -> None:
    """Ordinary traffic first, so that the starting RSS includes what serving costs."""
    reader = _identify(csnapd, 1, client=1)
    writer = _identify(csnapd, None, client=2)
    for chunk in range(0, 64, 4):
        request = writer.next_id()
        writer.send(QueryWrite(request, ((chunk, 4),)))
        _reply(writer, request)
        request = reader.next_id()
        reader.send(QuerySnapshotRead(request, ((chunk, 4),)))
        reply = _reply(reader, request)
        assert isinstance(reply, SnapshotReadOk), reply
    reader.close()
    writer.close()


def _read_locks(reader: WirePeer) -> None:
    for _ in range(64):
        request = reader.next_id()
        reader.send(QuerySnapshotRead(request, ((0, MAX_CHUNKS),)))
        reply = _reply(reader, request)
        assert isinstance(reply, SnapshotReadOk), reply


def _uploads(reader: WirePeer) -> None:
    """Lock uploads of chunks never read, most of them outside the origin."""
    for n in range(UPLOADS):
        first = n * MAX_CHUNKS
        request = reader.next_id()
        reader.send(UploadLock(request, ((first, MAX_CHUNKS),)))
        _reply(reader, request)  # accepted or refused: what it costs is the question


def _park_writes(writer: WirePeer) -> None:
    ids = [writer.next_id() for _ in range(DEFAULTS.max_in_flight + 1)]
    writer.send(*[QueryWrite(i, ((0, MAX_CHUNKS),)) for i in ids])
    refused = _reply(writer, ids[-1])
    assert isinstance(refused, Error), refused
    assert refused.code == ErrorCode.TOO_MANY_REQUESTS, refused


def _half_frames(csnapd: Csnapd) -> list[WirePeer]:
    peers: list[WirePeer] = []
    for _ in range(HALF_FRAMES):
        peer = _connect(csnapd, Role.ADMIN)
        size = DEFAULTS.max_frame
        peer.send_bytes(size.to_bytes(4, "big") + b"\x81" + b"\x00" * (size - 2))
        peers.append(peer)
    return peers


def _fill_connections(csnapd: Csnapd) -> list[WirePeer]:
    """Admin connections until csnapd has max_connections, then one it must refuse."""
    peers: list[WirePeer] = []
    for _ in range(DEFAULTS.max_connections):
        peer = WirePeer(csnapd.address, Role.ADMIN, csnapd.tls)
        if not peer.wait_open(REPLY_WAIT):
            refusal = peer.connection_error
            assert refusal is not None, "neither a hello nor a refusal"
            assert refusal.code == ErrorCode.TOO_MANY_CONNECTIONS, refusal
            peer.close()
            return peers
        peers.append(peer)
    raise AssertionError(f"{len(peers)} more connections and still no too_many_connections")


def _deaf_flood(csnapd: Csnapd) -> None:
    deaf = _connect(csnapd, Role.ADMIN, receive_buffer=4096, reads=False)
    try:
        for _ in range(10 * OUTBOX_LIMIT // 1000):
            deaf.send(*[GetStatus(deaf.next_id()) for _ in range(1000)])
    except (PeerClosed, SendStalled):
        pass  # closed by csnapd, or no longer read: either bounds what it holds
    finally:
        deaf.close()


def _still_serves(csnapd: Csnapd, after: str) -> None:
    try:
        get_status(csnapd.address, csnapd.tls)
    except (OSError, AssertionError, PeerClosed) as exc:
        raise AssertionError(
            f"after {after}, csnapd (exit status {csnapd.exit_status()}) does not serve:"
            f" {exc!r}\n{csnapd.log_tail()}"
        ) from exc


def _after_peers_leave(csnapd: Csnapd, meter: Meter, cycle: int) -> int:
    """RSS once csnapd has let go of every peer (it says it serves only the prober)."""
    deadline = time.monotonic() + SETTLE_SECONDS
    while True:
        prober = WirePeer(csnapd.address, Role.ADMIN, csnapd.tls)
        if not prober.wait_open(REPLY_WAIT):
            # Refused while csnapd still counts connections the peers closed
            # (it counts from accept): ask again once it has seen them go.
            refusal = prober.connection_error
            prober.close()
            assert refusal is not None and refusal.code == ErrorCode.TOO_MANY_CONNECTIONS, refusal
            assert time.monotonic() < deadline, "csnapd kept refusing connections"
            time.sleep(0.2)
            continue
        request = prober.next_id()
        prober.send(GetServerInfo(request))
        info = prober.reply(request, REPLY_WAIT)
        prober.close()
        assert isinstance(info, ServerInfoReply), f"csnapd stopped serving: {csnapd.log_tail()}"
        if info.server.clients <= 1 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert info.server.clients <= 1, f"csnapd still has {info.server.clients} clients"
    # Connection tasks finish (and drop their buffers) a moment after csnapd
    # forgets their peers: what it keeps is the least RSS over a short while.
    settled = csnapd.rss_kib()
    for _ in range(int(SETTLE_RSS_SECONDS / 0.2)):
        time.sleep(0.2)
        settled = min(settled, csnapd.rss_kib())
    meter.samples.append((f"{cycle}: after the peers left", settled))
    return settled
