"""Hostile input on csnapd's TCP socket and the agent's Unix socket
(docs/rules.md, "bad input costs nothing").

Each service runs in its own thread and trio loop for the whole test; every
hypothesis example opens a connection, sends a hostile script (tests/
torture/hostile.py) and ends it the script's way. After each example:
  * a broken stream ended with an error, or a closed connection (a reset
    may swallow the error); a valid one got no connection error;
  * a slow sender that never finishes its frame holds no more memory than
    the bytes it sent, while well-behaved peers are served;
  * once the hostile peer is gone, well-behaved peers on other connections
    are served (an origin write too, so leaked read locks would show), and
    the service's connections and connection tasks are back to none.
CSNAP_FUZZ_EXAMPLES sets the number of examples per service (the long run
uses thousands).
"""

from __future__ import annotations

import os
import random
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.lowlevel
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from csnap_agent import peers as agent_peers
from csnap_agent.agent import MAX_FRAME as AGENT_MAX_FRAME
from csnap_client import (
    ServerError,
    agent_admin_connector,
    find_server,
    open_admin,
    open_agent_stream,
)
from csnap_protocol import (
    BarrierDone,
    Identify,
    ListSnapshots,
    QuerySnapshotRead,
    Role,
    UploadLock,
    encode_frame,
)
from csnapd.server import QUEUED_LIMIT, RECEIVE_SIZE
from tests.credentials import secure, tls_stream
from tests.server.support import label, pwrite
from tests.torture.hostile import Expected, Script, expect, hello_frame, scripts
from tests.torture.support import (
    AgentService,
    Heard,
    InThread,
    RawPeer,
    Served,
    agent_service,
    make_files,
    open_store,
    serving,
)

pytestmark = pytest.mark.slow

EXAMPLES = int(os.environ.get("CSNAP_FUZZ_EXAMPLES", "200"))
#: Seconds a closing service gets to close (a bound on a hang, not a measure).
LISTEN = 10.0
ORIGIN_CHUNKS = 256

_fuzz = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# -- the services ---------------------------------------------------------------------


@dataclass
class Tally:
    """How the examples against one service went, for the test output."""

    examples: int = 0
    #: Streams the service had to end (broken, or a refused hello).
    broken: int = 0
    #: Slow senders left unfinished while others were served.
    lingering: int = 0
    bytes_sent: int = 0

    def count(self, script: Script, expected: Expected) -> None:
        self.examples += 1
        self.broken += expected.ends
        self.lingering += script.ending == "linger" and not expected.ends
        self.bytes_sent += len(script.data)

    def report(self, service: str) -> None:
        print(
            f"\n{service}: {self.examples} hostile connections ({self.broken} broken or"
            f" refused, {self.lingering} slow senders left unfinished), {self.bytes_sent} bytes"
        )


@dataclass
class Csnapd:
    thread: InThread[Served]
    served: Served
    max_frame: int
    tally: Tally

    def links(self) -> int:
        return self.thread.call(lambda: len(self.served.server.connections._links))

    def connection_tasks(self) -> int:
        return self.thread.call(lambda: _connection_tasks(self.served.server._nursery))

    def buffered(self) -> list[int]:
        """Bytes each connection past its hello holds undecoded."""
        links = self.served.server.connections._links
        return self.thread.call(lambda: [len(link.codec._buffer) for link in links.values()])


@dataclass
class AgentUnderTest:
    thread: InThread[AgentService]
    service: AgentService
    tally: Tally
    #: A csnapd is registered and active: administration is relayed to it.
    relaying: bool

    def servers(self) -> int:
        return self.thread.call(lambda: len(self.service.agent.servers))

    def connection_tasks(self) -> int:
        return self.thread.call(lambda: _connection_tasks(self.service.nursery))


def _connection_tasks(nursery: trio.Nursery) -> int:
    return sum(1 for task in nursery.child_tasks if task.name.endswith("._connection"))


@pytest.fixture(scope="module")
def csnapd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Csnapd]:
    config = make_files(
        tmp_path_factory.mktemp("csnapd"), store_size=32 << 20, origin_size=ORIGIN_CHUNKS * 4096
    )
    for chunk in range(ORIGIN_CHUNKS):
        pwrite(Path(config.origin), chunk, label(chunk, 1))
    opened = open_store(config)
    for tag in range(4):  # snapshots for the hostile peers to find
        opened.engine.create_snapshot(tag)
    opened.engine.commit()
    thread = InThread(lambda: serving(config, opened.engine))
    with thread as served:
        service = Csnapd(thread, served, config.max_frame, Tally())
        yield service
    service.tally.report("csnapd")
    assert not served.server.failed


@pytest.fixture(scope="module", params=["alone", "with csnapd"])
def agent(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AgentUnderTest]:
    """The agent on its own, and with a csnapd registered to relay to."""
    directory = tmp_path_factory.mktemp("agent")
    path = str(directory / "agent.sock")
    server = None
    if request.param == "with csnapd":
        server = make_files(directory, origin_size=ORIGIN_CHUNKS * 4096)
    thread = InThread(lambda: agent_service(path, server))
    with thread as service:
        under_test = AgentUnderTest(thread, service, Tally(), relaying=server is not None)
        yield under_test
    under_test.tally.report(f"csnap-agent ({request.param})")


# -- one hostile connection ------------------------------------------------------------


async def _play(
    connect: Callable[[], Awaitable[trio.abc.Stream]],
    script: Script,
    expected: Expected,
    while_open: Callable[[RawPeer], Awaitable[None]],
) -> None:
    stream = await connect()
    peer = RawPeer(stream)
    try:
        for piece in script.pieces():
            if not await peer.send(piece):
                break
            await trio.lowlevel.checkpoint()  # let the pieces arrive apart
        if script.ending == "close":
            return
        if script.ending == "eof":
            await peer.send_eof()
        if script.ending == "linger" and not expected.ends:
            # A slow sender: the service keeps the connection and holds only
            # what it was sent, and serves the others meanwhile.
            await while_open(peer)
            return
        heard = await peer.listen(LISTEN)
        _judge(heard, expected, script)
    finally:
        await peer.aclose()


def _judge(heard: Heard, expected: Expected, script: Script) -> None:
    what = f"{expected.why}; ending {script.ending}, mutation {script.mutation}"
    error = heard.connection_error()
    if expected.ends:
        assert heard.end != "open", f"the service kept a broken connection open ({what})"
        if heard.end == "eof":
            assert error is not None, f"closed without an error ({what})"
    else:
        assert error is None, f"a connection error for a valid stream: {error} ({what})"
        assert heard.end != "open", f"the service did not close after our end ({what})"


def _settle(probe: Callable[[], int], wanted: int, what: str) -> None:
    """Wait (bounded) until `probe()` comes down to `wanted`."""
    for _ in range(500):
        value = probe()
        if value <= wanted:
            return
        time.sleep(0.01)
    raise AssertionError(f"{what}: {value}, expected at most {wanted}")


# -- csnapd ----------------------------------------------------------------------------


async def _tcp(served: Served) -> trio.abc.Stream:
    return await tls_stream(served.host, served.port, served.server.config.store)


async def _csnapd_serves(service: Csnapd, *, locks_free: bool) -> None:
    """A well-behaved origin client and admin are served on other connections."""
    served = service.served
    with trio.fail_after(LISTEN):
        async with served.client() as client:
            copied = await client.copied_ranges([(0, ORIGIN_CHUNKS)])
            assert all(0 <= start < ORIGIN_CHUNKS for start, _ in copied)
            if locks_free:
                # Any read lock left behind by a hostile peer would hold this.
                chunk = random.randrange(64)
                async with client.origin_write([(chunk, 1)]):
                    pass
        async with served.admin() as admin:
            await admin.list_snapshots()


@_fuzz
@given(scripts(roles=["client", "client", "client", "admin", "admin", "server", "agent"]))
def test_csnapd_survives_hostile_peers(csnapd: Csnapd, script: Script) -> None:
    expected = expect(
        script, receiver=Role.SERVER, max_frame=csnapd.max_frame, refused={"server", "agent"}
    )
    csnapd.tally.count(script, expected)
    served = csnapd.served

    async def while_open(peer: RawPeer) -> None:
        bound = csnapd.max_frame + 4 + RECEIVE_SIZE
        buffered = await trio.to_thread.run_sync(csnapd.buffered)
        assert all(size <= min(peer.sent, bound) for size in buffered), buffered
        await _csnapd_serves(csnapd, locks_free=False)

    async def example() -> None:
        await _play(partial(_tcp, served), script, expected, while_open)

    trio.run(example)
    _settle(csnapd.links, 0, "connections left")
    _settle(csnapd.connection_tasks, 0, "connection tasks left")
    trio.run(partial(_csnapd_serves, csnapd, locks_free=True))
    _settle(csnapd.connection_tasks, 0, "connection tasks left")


@settings(_fuzz, max_examples=max(10, EXAMPLES // 10))
@given(
    st.one_of(
        st.binary(min_size=1, max_size=4096),
        # A TLS handshake record's header, then noise: garbage mid-handshake.
        st.binary(max_size=4096).map(lambda noise: b"\x16\x03\x01" + noise),
    ),
    st.sampled_from(["close", "eof", "listen"]),
)
def test_csnapd_answers_garbage_before_authentication_with_nothing_but_a_refusal(
    csnapd: Csnapd, garbage: bytes, ending: str
) -> None:
    """Bytes that are not a TLS handshake with a credential of the cluster get
    at most an authentication_failed frame (or a TLS alert), never a hello,
    and leave no connection and no task behind once the peer has gone."""
    served = csnapd.served

    async def example() -> None:
        peer = RawPeer(await trio.open_tcp_stream(served.host, served.port))
        try:
            await peer.send(garbage)
            if ending == "close":
                return
            if ending == "eof":
                await peer.send_eof()
            # A handshake cut short is held, silently, until hello_timeout:
            # a moment shows that nothing comes back.
            heard = await peer.listen(1.0 if garbage[0] == 0x16 else LISTEN)
        finally:
            await peer.aclose()
        names = [frame.get("name", frame.get("type")) for frame in heard.frames]
        if garbage[0] == 0x16:
            assert names == [], names  # the TLS handshake's own alert, if any
        else:
            assert heard.end != "open", "csnapd kept a plaintext connection open"
            assert names in ([], ["authentication_failed"]), names

    trio.run(example)
    _settle(csnapd.links, 0, "connections left")
    _settle(csnapd.connection_tasks, 0, "connection tasks left")
    trio.run(partial(_csnapd_serves, csnapd, locks_free=True))


def test_csnapd_does_not_allocate_an_announced_frame(csnapd: Csnapd) -> None:
    """A gigabyte length prefix is refused as soon as it arrives; a frame of
    exactly the limit, sent a little at a time and never finished, costs what
    was sent and nobody else notices."""
    served = csnapd.served

    async def run() -> None:
        huge = RawPeer(await _tcp(served))
        await huge.send(hello_frame("client") + (1 << 30).to_bytes(4, "big") + b"x" * 100)
        heard = await huge.listen(LISTEN)
        assert heard.end != "open"
        error = heard.connection_error()
        assert heard.end == "reset" or (error is not None and "exceeds" in error["message"])
        await huge.aclose()

        slow = RawPeer(await _tcp(served))
        await slow.send(hello_frame("client") + csnapd.max_frame.to_bytes(4, "big"))
        for _ in range(40):
            await slow.send(bytes(5000))
            await trio.lowlevel.checkpoint()
        sent = slow.sent
        for _ in range(100):  # the last bytes may still be on their way
            buffered = await trio.to_thread.run_sync(csnapd.buffered)
            if buffered and max(buffered) >= 200_000:
                break
            await trio.sleep(0.01)
        assert buffered and max(buffered) <= sent - len(hello_frame("client"))
        await _csnapd_serves(csnapd, locks_free=True)
        await slow.aclose()

    trio.run(run)
    _settle(csnapd.links, 0, "connections left")


async def test_requests_after_a_refused_hello_are_not_served(tmp_path: Path) -> None:
    """A peer refused at its hello may have sent requests right behind it;
    they are dropped with the connection, never applied: a refused peer
    holds no read locks and creates no snapshots."""
    config = make_files(tmp_path, origin_size=ORIGIN_CHUNKS * 4096)
    opened = open_store(config)
    opened.engine.create_snapshot(0)
    opened.engine.commit()
    with trio.fail_after(60):
        async with serving(replace(config, max_connections=1), opened.engine) as served:
            async with served.admin():  # the one connection allowed
                refused = RawPeer(await _tcp(served))
                pipelined = [
                    hello_frame("client"),
                    encode_frame(Identify(1, 7, 0)),
                    encode_frame(QuerySnapshotRead(2, ((10, 4),))),
                    encode_frame(UploadLock(3, ((20, 4),))),
                ]
                await refused.send(b"".join(pipelined))
                heard = await refused.listen(LISTEN)
                await refused.aclose()
                assert heard.end != "open"
                if heard.end == "eof":
                    error = heard.connection_error()
                    assert error is not None and error["name"] == "too_many_connections"
            # Room again: a writer of the chunks the refused peer asked to lock.
            for _ in range(500):
                if not served.server.connections._links:
                    break
                await trio.sleep(0.01)
            async with served.client() as client:
                for chunk in (11, 21):
                    with trio.fail_after(LISTEN):
                        async with client.origin_write([(chunk, 1)]):
                            pass  # no lock holds it
            assert not served.server.dispatcher.locks.locked(((10, 4), (20, 4)))


def test_a_flood_of_notices_stays_bounded(csnapd: Csnapd) -> None:
    """Notices have no id, so no in-flight limit counts them: a peer pouring
    them in must not grow the server's queue without bound."""
    served = csnapd.served
    notice = encode_frame(BarrierDone(12345))
    burst = notice * 4000
    most = [0]

    def queued() -> int:
        return served.server._receive.statistics().current_buffer_used

    async def run() -> None:
        flood = RawPeer(await _tcp(served))
        await flood.send(hello_frame("client"))
        for _ in range(50):
            if not await flood.send(burst):
                break
            most[0] = max(most[0], await trio.to_thread.run_sync(csnapd.thread.call, queued))
        await _csnapd_serves(csnapd, locks_free=True)
        await flood.aclose()

    trio.run(run)
    print(f"\nnotices sent: {50 * 4000}; most queued at the server at once: {most[0]}")
    assert most[0] <= QUEUED_LIMIT + 16
    _settle(csnapd.links, 0, "connections left")


# -- the agent -------------------------------------------------------------------------


async def _agent_serves(service: AgentUnderTest, *, alone: bool) -> None:
    """A well-behaved client and admin of the agent get their answers.

    With no server registered the answer is no_server, with one its address
    and the relayed list; while a hostile peer is connected it may have
    registered as a server too, so any answer will do.
    """
    path = service.service.path
    with trio.fail_after(LISTEN):
        try:
            await find_server(path, wait=False)
            answer = "server_at"
        except ServerError as exc:
            answer = exc.name
        async with open_admin(agent_admin_connector(path)) as admin:
            try:
                await admin.list_snapshots()
                relayed = "snapshot_list"
            except ServerError as exc:
                relayed = exc.name
    if alone and service.relaying:
        assert (answer, relayed) == ("server_at", "snapshot_list")
    elif alone:
        assert (answer, relayed) == ("no_server", "no_server")


_AGENT_CLOSES = {"agent", "notice:barrier", "notice:barrier_done", "notice:snapshot_deleted"}


@_fuzz
@given(scripts(roles=["client", "admin", "server", "server", "agent"]))
def test_the_agent_survives_hostile_peers(agent: AgentUnderTest, script: Script) -> None:
    expected = expect(
        script,
        receiver=Role.AGENT,
        max_frame=AGENT_MAX_FRAME,
        refused=_AGENT_CLOSES | {"notice:error"},
    )
    agent.tally.count(script, expected)
    path = agent.service.path

    async def while_open(peer: RawPeer) -> None:
        await _agent_serves(agent, alone=False)

    async def example() -> None:
        await _play(partial(open_agent_stream, path), script, expected, while_open)

    trio.run(example)
    # What remains is the registered csnapd's own connection, if there is one.
    baseline = int(agent.relaying)
    _settle(agent.connection_tasks, baseline, "agent connection tasks left")
    _settle(agent.servers, baseline, "registrations left")
    trio.run(partial(_agent_serves, agent, alone=True))
    _settle(agent.connection_tasks, baseline, "agent connection tasks left")


async def test_replies_queued_before_a_protocol_error_are_not_mislabelled(
    tmp_path: Path,
) -> None:
    """A peer that stops reading, then breaks the protocol, has replies still
    queued for it. After its protocol error only that error may be sent:
    never those replies turned into other errors."""
    config = make_files(tmp_path, origin_size=ORIGIN_CHUNKS * 4096)
    opened = open_store(config)
    for tag in range(60):  # big replies to list_snapshots
        opened.engine.create_snapshot(tag)
    opened.engine.commit()
    with trio.fail_after(60):
        async with serving(config, opened.engine) as served:
            raw = await trio.open_tcp_stream(served.host, served.port)
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            peer = RawPeer(await secure(raw, served.server.config.store))
            await peer.send(hello_frame("admin"))
            backlog = 0
            for request in range(1000):
                await peer.send(encode_frame(ListSnapshots(request)))
                links = list(served.server.connections._links.values())
                backlog = max(
                    (link.outbox.statistics().current_buffer_used for link in links), default=0
                )
                if backlog > 50:
                    break
            assert backlog > 50, "the replies never backed up"
            await peer.send(b"\x00\x00\x00\x02\xc1\xc1")  # not msgpack
            heard = await peer.listen(LISTEN)
            await peer.aclose()
    assert heard.end != "open"
    mislabelled = [f for f in heard.errors() if f.get("id") is not None]
    assert not mislabelled, mislabelled[:3]


async def test_the_agent_closes_a_connection_that_never_says_hello(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(agent_peers, "HELLO_TIMEOUT", 0.3)
    async with agent_service(str(tmp_path / "agent.sock")) as service:
        silent = await open_agent_stream(service.path)
        with trio.fail_after(10):
            assert await silent.receive_some(100) == b""  # closed by the agent
        await silent.aclose()
        with pytest.raises(ServerError) as refused:  # and it still answers others
            await find_server(service.path, wait=False)
        assert refused.value.name == "no_server"
