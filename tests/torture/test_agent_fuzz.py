"""A model-checked fuzzer for csnap-agent: hypothesis draws sequences of
well-typed but adversarial steps from several peers connected at once to a
real csnap-agent process, with a real csnapd process registered and active:
registrations with bad fields, duplicate and contradicting registrations,
floods of need_server (past the in-flight limit, with repeated ids),
relayed administration, peers that stop reading, garbage frames, closes
and half-closes.

The oracle:
  * after every step a well-behaved client is told csnapd's address, and a
    well-behaved admin gets a relayed status;
  * every server_ready from a peer that reads gets the answer the model of
    docs/protocol.md ("server_ready") predicts;
  * every request of a peer that reads is answered exactly once: need_server
    with csnapd's address (or too_many_requests / duplicate_request), a
    relayed request with csnapd's reply or one of its errors, never
    no_server (csnapd is active all along);
  * garbage closes only its own connection;
  * at the end, once the peers are gone, the agent holds no connection but
    its own (listener, csnapd's registration, the relay), and no
    registration outlives its connection: every address may be registered
    again; when csnapd stops, the store is clean.
CSNAP_AGENT_FUZZ_EXAMPLES sets the number of sequences (scripts/torture's
long run uses thousands).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from csnap_client import agent_admin_connector, find_server, open_admin, open_agent_stream
from csnap_protocol import (
    ChangeUseCount,
    CreateSnapshot,
    DeleteSnapshot,
    GetServerInfo,
    GetStatus,
    ListSnapshots,
    Message,
    NeedServer,
    Role,
    ServerReady,
    SetPriority,
    encode_frame,
)
from csnapd.engine import FileDevice
from csnapd.engine.check import check_store
from tests.torture.hostile import hello_frame
from tests.torture.support import make_files, parse_frames

pytestmark = pytest.mark.slow

EXAMPLES = int(os.environ.get("CSNAP_AGENT_FUZZ_EXAMPLES", "60"))
#: Steps in one sequence at most.
STEPS = 14
#: Peers connected at once at most.
PEERS = 4
#: Seconds any one answer may take (a bound on a hang, not a measure).
ANSWER = 5.0
ROOT = Path(__file__).resolve().parents[2]

# No shrinking: every example runs against the same agent, so once a bug has
# broken its state a "smaller" sequence fails for the earlier one's sake, and
# each failing try waits out its timeouts. The sequence that failed first is
# the one reported.
_fuzz = settings(
    max_examples=EXAMPLES,
    deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

#: Snapshots the fixture creates; steps create, delete and change a few more.
BIG_TAGS = range(100, 160)

# Stand-ins the steps use for what only the running cluster knows.
SERVER_ADDRESS = "<csnapd's address>"
SERVER_STORE = "<csnapd's store>"


# -- the cluster under test --------------------------------------------------------------


@dataclass
class Cluster:
    """A csnap-agent process and a csnapd process registered with it."""

    directory: Path
    sock: str
    agent: subprocess.Popen[bytes]
    server: subprocess.Popen[bytes]
    address: str
    store: str
    #: The agent's sockets with no peer connected: its listener, csnapd's
    #: registration, the relay connection to csnapd and trio's own.
    baseline: int = 0
    examples: int = 0
    steps: int = 0
    #: Answers to checked registrations: "ok" or the error's name, counted.
    registrations: dict[str, int] = field(default_factory=dict)

    def agent_sockets(self) -> int:
        """Sockets the agent process holds open."""
        fds = Path("/proc") / str(self.agent.pid) / "fd"
        count = 0
        for fd in fds.iterdir():
            try:
                count += os.readlink(fd).startswith("socket:")
            except OSError:
                continue  # closed meanwhile
        return count


def _first_line(process: subprocess.Popen[bytes], log: Path) -> str:
    assert process.stdout is not None
    line = process.stdout.readline().decode().strip()
    assert line, f"exited before it was ready: {log.read_text()[-2000:]}"
    return line


def _start(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    with log.open("ab") as err:
        return subprocess.Popen(
            [sys.executable, "-m", *argv], stdout=subprocess.PIPE, stderr=err, env=env
        )


def _stop(process: subprocess.Popen[bytes]) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.wait()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    directory = tmp_path_factory.mktemp("agent-fuzz")
    config = make_files(directory, origin_size=4 << 20)
    sock = str(directory / "agent.sock")
    agent = _start(["csnap_agent", "--socket", sock], directory / "agent.log")
    server: subprocess.Popen[bytes] | None = None
    try:
        assert _first_line(agent, directory / "agent.log") == f"listening unix:{sock}"
        server = _start(
            ["csnapd", config.store, config.origin, "--agent", sock], directory / "csnapd.log"
        )
        address = _first_line(server, directory / "csnapd.log").partition(" ")[2]
        built = Cluster(directory, sock, agent, server, address, config.store)

        async def settle() -> None:
            with trio.fail_after(30):
                await find_server(sock, wait=True)
            # Snapshots enough that a status does not fit in a 4096-byte frame.
            async with open_admin(agent_admin_connector(sock)) as admin:
                for tag in BIG_TAGS:
                    await admin.create_snapshot(tag)
            await _good_client(built)  # opens the relay connection

        trio.run(settle)
        built.baseline = _steady(built.agent_sockets)
        yield built
        print(
            f"\ncsnap-agent fuzz: {built.examples} sequences, {built.steps} steps"
            f" from up to {PEERS} peers at once; registrations answered {built.registrations}"
        )
        assert _stop(server) == 0, (directory / "csnapd.log").read_text()[-3000:]
        assert _stop(agent) == 0, (directory / "agent.log").read_text()[-3000:]
    finally:
        for process in (server, agent):
            if process is not None:
                if process.poll() is None:
                    process.kill()
                    process.wait()
                if process.stdout is not None:
                    process.stdout.close()
    device = FileDevice(config.store, writable=False)
    try:
        assert check_store(device).exit_code == 0
    finally:
        device.close()


def _steady(probe: Callable[[], int]) -> int:
    """`probe()` once it has not changed for a while (connections closing settle)."""
    deadline = time.monotonic() + ANSWER
    value = probe()
    while time.monotonic() < deadline:
        time.sleep(0.3)
        again = probe()
        if again == value:
            return value
        value = again
    raise AssertionError(f"still changing after {ANSWER} s: {value}")


async def _good_client(cluster: Cluster) -> None:
    """A well-behaved client and admin of the agent get their answers."""
    with trio.fail_after(ANSWER):
        where = await find_server(cluster.sock, wait=False)
        assert where.address == cluster.address, where
        async with open_admin(agent_admin_connector(cluster.sock)) as admin:
            status = await admin.status()
        assert status.store.chunk_size == 4096


# -- steps -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Open:
    """(Re)connect this peer in a role, announcing a frame limit."""

    role: str
    max_frame: int


@dataclass(frozen=True)
class Register:
    address: str
    store: str
    pid: int
    active: bool
    #: Whether the fields are sensible on their own (the model's word).
    sensible: bool
    #: Sent on a new connection: the peer's old one is closed first.
    reconnect: bool = False


@dataclass(frozen=True)
class Flood:
    """need_server requests, back to back; some ids repeated."""

    count: int
    wait: bool
    repeat_ids: bool


@dataclass(frozen=True)
class Relay:
    request: Message


@dataclass(frozen=True)
class Garbage:
    data: bytes


@dataclass(frozen=True)
class StopReading:
    pass


@dataclass(frozen=True)
class Close:
    half: bool


#: Addresses that make no sense, and sensible ones (few, so that peers
#: collide on them).
_BAD_ADDRESSES = [":70", "127.0.0.1:0", "127.0.0.1:65536", "127.0.0.1: 7", "127.0.0.1:0x10"]
_BAD_ADDRESSES += ["::1:70", "", "[localhost]:7", "host_name:7", "127.0.0.1:-7"]
_GOOD_ADDRESSES = ["[::1]:7001", "localhost:7002", "127.0.0.1:7003", "127.0.0.1:7004"]
_BAD_STORES = ["", "store.img", "/srv/../store", "/srv/store\0", "/srv/store/"]


@st.composite
def _registrations(draw: st.DrawFn) -> Register:
    """Mostly sensible registrations; some with one field that makes no sense,
    some contradicting csnapd's (its address, another store)."""
    address = draw(st.sampled_from(_GOOD_ADDRESSES))
    store, pid, sensible = SERVER_STORE, draw(st.sampled_from([1, 4242, 0xFFFF_FFFF])), True
    flaw = draw(st.sampled_from(["none", "none", "none", "address", "store", "pid", "other"]))
    if flaw == "address":
        address, sensible = draw(st.sampled_from(_BAD_ADDRESSES)), False
    elif flaw == "store":
        store, sensible = draw(st.sampled_from(_BAD_STORES)), False
    elif flaw == "pid":
        pid, sensible = 0, False
    elif flaw == "other":
        address, store = draw(
            st.sampled_from([(SERVER_ADDRESS, SERVER_STORE), (address, "/elsewhere/store")])
        )
    active, reconnect = draw(st.booleans()), draw(st.booleans())
    return Register(address, store, pid, active, sensible, reconnect)


_tags = st.integers(0, 5) | st.sampled_from([100, 159, 0xFFFF_FFFF, 1 << 20])
_relayed = st.one_of(
    st.builds(ListSnapshots, st.just(0)),
    st.builds(GetStatus, st.just(0)),
    st.builds(GetServerInfo, st.just(0)),
    st.builds(CreateSnapshot, st.just(0), _tags, st.integers(-128, 127)),
    st.builds(DeleteSnapshot, st.just(0), _tags),
    st.builds(SetPriority, st.just(0), _tags, st.integers(-128, 127)),
    st.builds(ChangeUseCount, st.just(0), _tags, st.integers(-3, 3)),
)
_garbage = st.sampled_from(
    [
        b"\xff\xff\xff\xff",  # a frame far past the limit
        b"\x00\x00\x00\x02\xc1\xc1",  # not msgpack
        b"\x00\x00\x00\x01\x07",  # not a map
        b"\x00\x00\x00\x00",  # an empty frame
        b"GET / HTTP/1.0\r\n\r\n",
    ]
)
_actions = st.one_of(
    st.builds(
        Open,
        st.sampled_from(["server", "server", "client", "admin", "admin"]),
        st.sampled_from([4096, 65536, 1 << 20]),
    ),
    # Registrations and relays weigh more: they are where the model has most to say.
    _registrations(),
    _registrations(),
    _registrations(),
    st.builds(Flood, st.integers(1, 100), st.booleans(), st.booleans()),
    st.builds(Relay, _relayed),
    st.builds(Relay, _relayed),
    st.builds(Garbage, _garbage),
    st.just(StopReading()),
    st.builds(Close, st.booleans()),
)
_sequences = st.lists(st.tuples(st.integers(0, PEERS - 1), _actions), min_size=2, max_size=STEPS)


# -- peers and the model ---------------------------------------------------------------


@dataclass(eq=False)
class Peer:
    """A hostile connection to the agent, and what the model expects of it."""

    role: str
    max_frame: int
    stream: trio.SocketStream
    reading: bool = True
    #: The agent ended the connection (we sent garbage); nothing more is sent.
    broken: bool = False
    #: Requests sent, by id, with the reply types acceptable for each.
    sent: list[tuple[int, set[str]]] = field(default_factory=list)
    frames: list[dict[str, Any]] = field(default_factory=list)
    received: bytearray = field(default_factory=bytearray)
    ended: bool = False
    #: Registered with certainty (a reading peer's ok), or perhaps (unread).
    registered: str | None = None
    maybe_registered: set[str] = field(default_factory=set)
    ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    stop: trio.CancelScope = field(default_factory=trio.CancelScope)
    #: Set (and replaced) whenever the reader learns something.
    changed: trio.Event = field(default_factory=trio.Event)

    async def until(self, done: Callable[[], bool]) -> None:
        """Wait (bounded) until `done()`, re-checked as replies arrive."""
        with trio.fail_after(ANSWER):
            while not done():
                await self.changed.wait()

    def _learned(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    def replies(self) -> list[dict[str, Any]]:
        return [f for f in self.frames if f.get("id") is not None and f.get("type") != "hello"]

    async def read(self) -> None:
        with self.stop:
            while True:
                try:
                    data = await self.stream.receive_some(1 << 16)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    data = b""
                if not data:
                    self.ended = True
                    self._learned()
                    return
                self.received += data
                frames, rest = parse_frames(bytes(self.received))
                self.frames.extend(frames)
                self.received = bytearray(rest)
                self._learned()

    async def send(self, data: bytes) -> bool:
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.broken = True
            return False
        return True


class Sequence:
    """One example: the peers of a sequence of steps, against the cluster."""

    def __init__(self, cluster: Cluster, nursery: trio.Nursery):
        self.cluster = cluster
        self.nursery = nursery
        self.peers: dict[int, Peer] = {}
        #: Addresses whose registration may still be live at the agent.
        self.maybe: set[str] = set()

    def registered_elsewhere(self, peer: Peer) -> tuple[set[str], set[str]]:
        """Addresses surely, and perhaps, registered by other peers."""
        sure = {p.registered for p in self.peers.values() if p is not peer and p.registered}
        perhaps = set(self.maybe)
        for other in self.peers.values():
            if other is not peer:
                perhaps |= other.maybe_registered
        return sure, perhaps

    async def _peer_for(self, index: int, action: object) -> Peer | None:
        """The peer a step acts on, connected first if the step needs it."""
        peer = self.peers.get(index)
        if isinstance(action, Open) or (isinstance(action, Register) and action.reconnect):
            if peer is not None:
                await self.close(index, half=False)
            peer = None
        if isinstance(action, Open):
            await self.open(index, action)
            return None
        if peer is None:
            # A step for a peer not connected connects one in the role the
            # step fits, with the smallest frame limit one time in two.
            role = {Register: "server", Flood: "client", Relay: "admin"}.get(type(action))
            if role is None:
                return None
            await self.open(index, Open(role, 4096 if index % 2 else 1 << 20))
            peer = self.peers[index]
        return None if peer.broken else peer

    async def step(self, index: int, action: object) -> None:
        peer = await self._peer_for(index, action)
        if peer is None:
            return
        if isinstance(action, Register):
            await self.register(peer, action)
        elif isinstance(action, Flood):
            await self.flood(peer, action)
        elif isinstance(action, Relay):
            await self.relay(peer, action.request)
        elif isinstance(action, Garbage):
            await peer.send(action.data)
            await self.broken(peer)
        elif isinstance(action, StopReading):
            peer.reading = False
            peer.stop.cancel()
        elif isinstance(action, Close):
            await self.close(index, half=action.half)

    async def open(self, index: int, action: Open) -> None:
        stream = await open_agent_stream(self.cluster.sock)
        # A small receive buffer: a peer that stops reading fills it soon.
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        peer = Peer(action.role, action.max_frame, stream)
        self.peers[index] = peer
        self.nursery.start_soon(peer.read)
        await peer.send(hello_frame(action.role, max_frame=action.max_frame))

    async def close(self, index: int, *, half: bool) -> None:
        peer = self.peers.pop(index)
        if peer.reading and not peer.broken:
            await self.all_answered(peer)
        # Its registration ends when the agent notices; until then, perhaps live.
        self.maybe |= peer.maybe_registered | ({peer.registered} if peer.registered else set())
        if half and not peer.broken:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                await peer.stream.send_eof()
            await self.wait_closed(peer)
        peer.stop.cancel()
        await trio.aclose_forcefully(peer.stream)

    async def broken(self, peer: Peer) -> None:
        """The peer broke the protocol: the agent closes its connection, and
        with it forgets its registration (before closing, so a peer that
        reads knows it is gone once it sees the end)."""
        peer.broken = True
        if peer.registered is not None:
            peer.maybe_registered.add(peer.registered)
            peer.registered = None
        if peer.reading:
            await self.wait_closed(peer)
            peer.maybe_registered.clear()

    async def wait_closed(self, peer: Peer) -> None:
        if peer.reading:
            await peer.until(lambda: peer.ended)

    async def wrong_role(self, peer: Peer, message: Message) -> bool:
        """Send a message the peer's role may not send, if it is one: the
        agent answers `wrong_role` for the connection and closes it."""
        if Role(peer.role) in type(message).SENDERS:
            return False
        if peer.reading:
            await self.all_answered(peer)
        await peer.send(encode_frame(message))
        await self.broken(peer)
        if peer.reading:
            ends = [f for f in peer.frames if f.get("type") == "error" and f.get("id") is None]
            assert ends and ends[-1]["name"] == "wrong_role", peer.frames[-3:]
        return True

    async def register(self, peer: Peer, action: Register) -> None:
        address = self.cluster.address if action.address == SERVER_ADDRESS else action.address
        store = self.cluster.store if action.store == SERVER_STORE else action.store
        request = next(peer.ids)
        message = ServerReady(request, address, store, action.pid, action.active)
        if await self.wrong_role(peer, message):
            return
        if peer.reading:
            await self.all_answered(peer)  # so that nothing else is in flight
        if not await peer.send(encode_frame(message)):
            return
        if not peer.reading:
            peer.sent.append((request, set()))
            if peer.role == "server" and peer.registered is None:
                peer.maybe_registered.add(address)
            return
        sure, perhaps = self.registered_elsewhere(peer)
        refused = (
            peer.registered is not None  # one registration per connection
            or not action.sensible  # a field makes no sense
            or store != self.cluster.store  # one store per agent
            or address == self.cluster.address  # csnapd's own address
            or address in sure  # another peer's
            or action.active  # csnapd is active
        )
        expected: set[str]
        if refused:
            expected = {"invalid_request"}
        elif address in perhaps:
            expected = {"invalid_request", "ok"}
        else:
            expected = {"ok"}
        peer.sent.append((request, expected))
        reply = await self.answer(peer, request)
        if reply is None:
            return
        outcome = reply["type"] if reply["type"] == "ok" else reply.get("name")
        assert outcome in expected, (action, address, store, reply)
        tally = self.cluster.registrations
        tally[outcome] = tally.get(outcome, 0) + 1
        if outcome == "ok":
            peer.registered = address

    async def flood(self, peer: Peer, action: Flood) -> None:
        if await self.wrong_role(peer, NeedServer(next(peer.ids), action.wait)):
            return
        frames = []
        request = 0
        for number in range(action.count):
            if not (action.repeat_ids and number % 7 == 3 and request):
                request = next(peer.ids)  # else the previous id again
            frames.append(encode_frame(NeedServer(request, action.wait)))
            acceptable = {"server_at", "too_many_requests", "duplicate_request"}
            peer.sent.append((request, acceptable))
        await peer.send(b"".join(frames))

    async def relay(self, peer: Peer, request: Message) -> None:
        number = next(peer.ids)
        message = dataclasses.replace(request, id=number)  # type: ignore[call-arg]
        if await self.wrong_role(peer, message):
            return
        # csnapd's reply or one of its refusals; never no_server.
        acceptable = {
            "snapshot",
            "snapshot_list",
            "status",
            "server_info",
            "ok",
            "no_such_snapshot",
            "snapshot_exists",
            "too_many_snapshots",
            "snapshot_busy",
            "invalid_request",
            "too_many_requests",
            "duplicate_request",
            "request_too_large",
        }
        peer.sent.append((number, acceptable))
        await peer.send(encode_frame(message))

    async def answer(self, peer: Peer, request: int) -> dict[str, Any] | None:
        """The reply to `request`, waited for; None if the agent ended the connection."""

        def found() -> dict[str, Any] | None:
            return next((f for f in peer.replies() if f.get("id") == request), None)

        await peer.until(lambda: peer.ended or found() is not None)
        return found()

    async def all_answered(self, peer: Peer) -> None:
        """Every request of a reading peer gets exactly one acceptable reply."""
        if not peer.sent or peer.ended:
            return
        await peer.until(lambda: peer.ended or len(peer.replies()) >= len(peer.sent))
        if peer.ended:
            return  # a protocol error (an unannounced frame limit, say) ended it
        replies = peer.replies()
        assert len(replies) == len(peer.sent), (len(replies), len(peer.sent), replies[-3:])
        for (request, acceptable), reply in zip(
            sorted(peer.sent, key=lambda s: s[0]),
            sorted(replies, key=lambda r: r["id"]),
            strict=True,
        ):
            outcome = reply["type"] if reply["type"] != "error" else reply.get("name")
            if acceptable:
                assert outcome in acceptable, (request, acceptable, reply)
            if outcome == "server_at":
                assert reply["address"] == self.cluster.address, reply


@_fuzz
@given(_sequences)
def test_the_agent_answers_a_good_client_whatever_its_peers_send(
    cluster: Cluster, sequence: list[tuple[int, object]]
) -> None:
    cluster.examples += 1

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            peers = Sequence(cluster, nursery)
            try:
                for index, action in sequence:
                    cluster.steps += 1
                    await peers.step(index, action)
                    await _good_client(cluster)
                for index in list(peers.peers):
                    await peers.close(index, half=False)
            finally:
                # Also when a check failed: the next example starts afresh.
                for peer in peers.peers.values():
                    await trio.aclose_forcefully(peer.stream)
                nursery.cancel_scope.cancel()
        await _good_client(cluster)

    trio.run(run)
    _back_to_baseline(cluster)
    # The agent forgot every registration with its connection: each address
    # may be registered again (the agent closes a socket only after that).
    trio.run(_register_every_address, cluster)
    _back_to_baseline(cluster)


def _back_to_baseline(cluster: Cluster) -> None:
    """Every hostile connection is gone at the agent: back to its own sockets."""
    deadline = time.monotonic() + ANSWER
    while (sockets := cluster.agent_sockets()) > cluster.baseline:
        assert time.monotonic() < deadline, f"{sockets} sockets, {cluster.baseline} expected"
        time.sleep(0.01)
    assert sockets == cluster.baseline


async def _register_every_address(cluster: Cluster) -> None:
    async with trio.open_nursery() as nursery:
        peers = Sequence(cluster, nursery)
        sensible = _GOOD_ADDRESSES
        try:
            for index, address in enumerate(sensible):
                await peers.open(index, Open("server", 65536))
                registration = Register(address, SERVER_STORE, 4242, False, True)
                await peers.register(peers.peers[index], registration)
                assert peers.peers[index].registered == address
        finally:
            for peer in peers.peers.values():
                await trio.aclose_forcefully(peer.stream)
            nursery.cancel_scope.cancel()
