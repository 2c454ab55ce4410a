"""A model-checked fuzzer of the NBD gateway: real csnapd and csnap-nbd
processes (a writable gateway and a read-only one) over one store, and
hypothesis generating sessions of requests at every length, offset and
flag, pipelined, on the origin and on snapshots taken along the way, with
and without structured replies and metadata contexts, mixed with broken
framing that must close only that connection.

Every reply is checked against the specification's answer (tests/nbd/
spec.py) and every successful read against a model of each export (a
bytearray per export, updated by the writes the gateway acknowledged).
After every step a good request on another connection must be answered
correctly. At the end every export is read whole and compared with its
model, both gateways and csnapd stop cleanly, and csnap-check finds the
store consistent.

CSNAP_NBD_FUZZ_EXAMPLES (default 40) sets the number of sessions and
CSNAP_NBD_FUZZ_STEPS (default 20) the most steps of each; scripts/torture
runs thousands.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from csnap_client import open_admin
from csnap_format.mkcsnap import format_store
from csnap_nbd.wire import transmission as tx
from csnap_nbd.wire.constants import ChunkType, Command, CommandFlag
from tests.compare import assert_same_bytes
from tests.credentials import connector
from tests.e2e.processes import ROOT
from tests.nbd.rawclient import Answer, RawClient
from tests.nbd.spec import FLAGS, MAX_BLOCK, Session, expected_error

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

EXAMPLES = int(os.environ.get("CSNAP_NBD_FUZZ_EXAMPLES", "40"))
STEPS = int(os.environ.get("CSNAP_NBD_FUZZ_STEPS", "20"))
CHUNK = 4096
SIZE = 4 << 20
#: Snapshots taken at most over a run (each may hold a copy of every chunk).
MAX_SNAPSHOTS = 6
CONTEXTS = ("base:allocation", "csnap:exceptions")
MUTATING = (Command.WRITE, Command.WRITE_ZEROES)

EDGE_OFFSETS = (0, 1, CHUNK - 1, CHUNK, SIZE - CHUNK - 1, SIZE - 1, SIZE, SIZE + 1, 1 << 63)
EDGE_LENGTHS = (0, 1, 511, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 3, MAX_BLOCK, MAX_BLOCK + 1)
#: Commands, weighted towards the served ones; RESIZE and unknown numbers too.
COMMANDS = (0, 0, 1, 1, 1, 3, 4, 5, 6, 6, 7, 7, 8, 42, 0xFFFF)
BREAKS = ("bad magic", "header cut", "payload cut", "huge write", "disconnect")


@dataclass
class System:
    """The processes, the model of every export, and what the run did."""

    directory: Path
    store: Path
    csnapd_port: int
    sockets: dict[bool, Path]  # read-only -> the gateway's Unix socket
    processes: list[subprocess.Popen[bytes]]
    models: dict[str, bytearray]
    tags: list[int] = field(default_factory=list)
    examples: int = 0
    requests: int = 0
    breaks: int = 0
    writes: int = 0


def _start(argv: list[str], log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """Start `python -m argv`; its first stdout line (killed if none comes in 30 s)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    with log.open("ab") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", *argv], stdout=subprocess.PIPE, stderr=err, env=env
        )
    timer = threading.Timer(30, process.kill)
    timer.start()
    try:
        assert process.stdout is not None
        line = process.stdout.readline().decode().strip()
    finally:
        timer.cancel()
    if not line:
        process.kill()
        process.wait()
        raise RuntimeError(f"{argv[0]} did not start: {log.read_text()[-2000:]}")
    return process, line


def _stop(process: subprocess.Popen[bytes]) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.wait()


@contextmanager
def system(directory: Path) -> Iterator[System]:
    store, origin = directory / "store.img", directory / "origin.img"
    format_store(str(store), str(origin), store_size=64 << 20, origin_size=SIZE, progress=False)
    image = random.Random(7).randbytes(SIZE)
    origin.write_bytes(image)
    processes: list[subprocess.Popen[bytes]] = []
    try:
        csnapd, line = _start(["csnapd", str(store), str(origin)], directory / "csnapd.log")
        processes.append(csnapd)
        port = int(line.rpartition(":")[2])
        sockets = {}
        for read_only in (False, True):
            sock = directory / f"nbd-{'ro' if read_only else 'rw'}.sock"
            argv = ["csnap_nbd", "--server", f"127.0.0.1:{port}", "--unix", str(sock)]
            argv += ["--origin", str(origin), "--store", str(store)]
            argv += ["--read-only"] if read_only else []
            gateway, _ = _start(argv, directory / f"nbd-{'ro' if read_only else 'rw'}.log")
            processes.append(gateway)
            sockets[read_only] = sock
        yield System(directory, store, port, sockets, processes, {"origin": bytearray(image)})
    finally:
        for process in reversed(processes):
            if process.poll() is None:
                process.kill()
                process.wait()
            assert process.stdout is not None
            process.stdout.close()


# -- one session -----------------------------------------------------------------------


@dataclass(frozen=True)
class Mode:
    export: str
    structured: bool
    contexts: tuple[str, ...]
    read_only: bool

    @property
    def session(self) -> Session:
        return Session(SIZE, self.structured, len(self.contexts), self.read_only)


async def connect(system: System, mode: Mode) -> RawClient:
    client = await RawClient.unix(system.sockets[mode.read_only])
    await client.go(mode.export, structured=mode.structured, contexts=mode.contexts)
    return client


def _payload(seed: int, length: int) -> bytes:
    return random.Random(seed).randbytes(length)


def _overlaps(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[0] + b[1] and b[0] < a[0] + a[1]


class Session_:
    """One connection's requests against the model of its export."""

    def __init__(self, system: System, mode: Mode, client: RawClient):
        self.system = system
        self.mode = mode
        self.client = client
        self.cookie = 0

    @property
    def model(self) -> bytearray:
        return self.system.models[self.mode.export]

    async def batch(self, requests: list[tuple[int, int, int, int, int]]) -> None:
        """Send (command, flags, offset, length, seed) requests at once (at most
        one that changes data), then check every reply."""
        out = bytearray()
        expect: dict[int, tuple[int, int, int, int, int, int]] = {}
        lengths: dict[int, int] = {}
        mutation: tuple[int, int] | None = None
        for command, flags, offset, length, seed in requests:
            self.cookie += 1
            error = expected_error(command, flags, offset, length, self.mode.session)
            expect[self.cookie] = (command, flags, offset, length, seed, error)
            out += tx.request(command, self.cookie, offset, length, flags)
            if command == Command.WRITE:
                out += _payload(seed, length)
            if command == Command.READ and error == 0:
                lengths[self.cookie] = length
            if command in MUTATING and error == 0:
                assert mutation is None, "one change per batch"
                mutation = (offset, length)
        await self.client.send(bytes(out))
        self.system.requests += len(requests)
        answered: dict[int, Answer] = {}
        for _ in requests:
            answer = await self.client.answer(lengths)
            assert answer.cookie in expect and answer.cookie not in answered, answer
            answered[answer.cookie] = answer
        for cookie, (command, flags, offset, length, seed, error) in expect.items():
            answer = answered[cookie]
            what = f"{command=} {flags=:#x} {offset=} {length=} on {self.mode}"
            assert answer.errors == ([error] if error else []), (what, answer)
            if error == 0:
                raced = mutation is not None and _overlaps(mutation, (offset, length))
                self._succeeded(answer, command, flags, offset, length, seed, raced, what)

    def _succeeded(
        self,
        answer: Answer,
        command: int,
        flags: int,
        offset: int,
        length: int,
        seed: int,
        raced: bool,
        what: str,
    ) -> None:
        """Check a successful reply; apply an acknowledged change to the model.

        `raced`: a change in the same batch overlaps this request, so a read
        may see either contents."""
        if command == Command.READ and not raced:
            assert_same_bytes(answer.data, self.model[offset : offset + length], what)
        if command == Command.READ and self.mode.structured and length == 0:
            assert [c.type for c in answer.chunks] == [ChunkType.NONE], what
        if command == Command.BLOCK_STATUS:
            assert len(answer.chunks) == len(self.mode.contexts), what
            for chunk in answer.chunks:
                _, extents = tx.parse_block_status_payload(chunk.payload)
                assert extents and all(size > 0 for size, _ in extents), what
                assert sum(size for size, _ in extents) <= length, what
                assert len(extents) == 1 or not flags & CommandFlag.REQ_ONE, what
        if command == Command.WRITE:
            self.model[offset : offset + length] = _payload(seed, length)
            self.system.writes += 1
        if command == Command.WRITE_ZEROES:
            self.model[offset : offset + length] = bytes(length)
            self.system.writes += 1

    async def brk(self, kind: str, seed: int) -> None:
        """Break the framing the `kind` way: the gateway must close this connection
        (after answering what was in flight) and nothing else."""
        self.cookie += 1
        read = tx.request(Command.READ, self.cookie, 0, 100)
        if kind == "bad magic":
            data = b"\xde\xad\xbe\xef" + tx.request(Command.READ, 1, 0, 1)[4:]
        elif kind == "header cut":
            data = tx.request(Command.READ, 1, 0, 512)[: seed % 27 + 1]
        elif kind == "payload cut":
            data = tx.request(Command.WRITE, 1, 0, 4096) + bytes(seed % 4096)
        elif kind == "huge write":
            data = tx.request(Command.WRITE, 1, 0, (1 << 32) - 1)
        else:
            data = tx.request(Command.DISC, 1, seed, seed % 1000, seed & 0xFFFF)
        await self.client.send(read + data)
        if kind in ("header cut", "payload cut"):
            await self.client.stream.send_eof()
        answer = await self.client.answer(100)
        assert answer.cookie == self.cookie and answer.data == self.model[:100], (kind, answer)
        assert await self.client.closed(), kind
        self.system.breaks += 1


@st.composite
def requests(draw: st.DrawFn) -> tuple[int, int, int, int, int]:
    command = draw(st.sampled_from(COMMANDS))
    # Each strategy of one_of is drawn as often: no flags, and lengths and
    # offsets inside the export, come up often enough for data to change.
    flags = draw(st.one_of(st.just(0), st.sampled_from(FLAGS), st.integers(0, 0xFFFF)))
    offset = draw(
        st.one_of(st.sampled_from(EDGE_OFFSETS), st.integers(0, SIZE), st.integers(0, SIZE))
    )
    length = draw(
        st.one_of(
            st.sampled_from(EDGE_LENGTHS), st.integers(0, 4 * CHUNK), st.integers(1, 64 * CHUNK)
        )
    )
    if command == Command.WRITE and length > 64 * CHUNK and draw(st.integers(0, 9)):
        length %= 64 * CHUNK  # a 32 MiB payload now and then, not every time
    if command == Command.FLUSH and draw(st.booleans()):
        offset = length = 0  # a valid flush, half the time
    return command, flags, offset, length, draw(st.integers(0, 1 << 30))


async def session(system: System, data: st.DataObject) -> None:
    exports = ["origin", *(f"snap-{t}" for t in system.tags)]
    structured = data.draw(st.booleans(), "structured")
    contexts: tuple[str, ...] = ()
    if structured:
        contexts = tuple(c for c in CONTEXTS if data.draw(st.booleans(), c))
    read_only = data.draw(st.integers(0, 4), "read-only") == 0
    # Drawn whatever exists (hypothesis replays need the same draws): the
    # number picks among the exports there are.
    export = exports[data.draw(st.integers(0, MAX_SNAPSHOTS), "export") % len(exports)]
    mode = Mode(export, structured, contexts, read_only)
    # Closed whatever happens: hypothesis may end an example at any draw.
    opened: list[RawClient] = []
    try:
        await _steps(system, data, mode, opened)
    finally:
        for client in opened:
            await trio.aclose_forcefully(client.stream)
    system.examples += 1


async def _steps(system: System, data: st.DataObject, mode: Mode, opened: list[RawClient]) -> None:
    witness = await RawClient.unix(system.sockets[False])
    opened.append(witness)
    await witness.go("origin")
    tested = Session_(system, mode, await connect(system, mode))
    opened.append(tested.client)
    for _ in range(data.draw(st.integers(1, STEPS), "steps")):
        step = data.draw(st.sampled_from(["batch"] * 8 + ["break", "snapshot"]), "step")
        if step == "batch":
            batch = data.draw(st.lists(requests(), min_size=1, max_size=8), "requests")
            # At most one change per batch: the rest wait for the next one.
            while batch:
                changes = [
                    i
                    for i, (c, f, o, n, _) in enumerate(batch)
                    if c in MUTATING and expected_error(c, f, o, n, mode.session) == 0
                ]
                cut = changes[1] if len(changes) > 1 else len(batch)
                await tested.batch(batch[:cut])
                batch = batch[cut:]
        elif step == "break":
            kind = data.draw(st.sampled_from(BREAKS), "break")
            await tested.brk(kind, data.draw(st.integers(0, 1 << 30)))
            tested.client = await connect(system, mode)
            opened.append(tested.client)
        elif len(system.tags) < MAX_SNAPSHOTS:
            tag = len(system.tags) + 1
            async with open_admin(
                connector("127.0.0.1", system.csnapd_port, system.store)
            ) as admin:
                await admin.create_snapshot(tag)
            system.tags.append(tag)
            system.models[f"snap-{tag}"] = bytearray(system.models["origin"])
        # Another connection is served, and correctly.
        offset = data.draw(st.integers(0, SIZE - 1), "witness")
        length = min(8192, SIZE - offset)
        await witness.request(Command.READ, offset, length, cookie=7)
        answer = await witness.answer(length)
        assert not answer.errors, answer
        assert_same_bytes(answer.data, system.models["origin"][offset : offset + length])


async def final_check(system: System) -> None:
    """Every export holds exactly its model, on both gateways."""
    for read_only, sock in system.sockets.items():
        for export, model in system.models.items():
            client = await RawClient.unix(sock)
            await client.go(export)
            step = 1 << 20
            for offset in range(0, SIZE, step):
                await client.request(Command.READ, offset, step, cookie=offset + 1)
                answer = await client.answer(step)
                assert not answer.errors, answer
                where = f"{export} at {offset} ({'read-only' if read_only else 'writable'})"
                assert_same_bytes(answer.data, model[offset : offset + step], where)
            await client.aclose()


def test_fuzz_the_gateway_and_every_acknowledged_write_is_in_place(tmp_path: Path) -> None:
    with system(tmp_path) as running:

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(st.data())
        def example(data: st.DataObject) -> None:
            trio.run(session, running, data)

        example()
        trio.run(final_check, running)
        for process in reversed(running.processes):
            assert _stop(process) == 0
        result = subprocess.run(
            [sys.executable, "-m", "csnapd.check_cli", str(running.store)],
            capture_output=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, result.stdout.decode()[-3000:]
        print(
            f"nbd fuzz: {running.examples} sessions, {running.requests} requests"
            f" ({running.writes} writes acknowledged), {running.breaks} connections broken,"
            f" {len(running.tags)} snapshots; every export matches its model, csnap-check clean"
        )
