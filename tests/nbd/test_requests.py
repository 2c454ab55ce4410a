"""Every transmission request a well-framed client can send gets the reply
the NBD specification prescribes, and never a dropped connection: every
command number, every flag (documented, undocumented, not advertised), and
lengths and offsets at every edge (0, unaligned, past the end, past 2^64,
over the maximum block size), on the origin and a snapshot, with and
without structured replies, and read-only. Requests are pipelined behind a
read that must still be answered, and at the end every export holds
exactly what the successful writes put there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from csnap_nbd.wire import transmission as tx
from csnap_nbd.wire.constants import ChunkType, Command, CommandFlag
from tests.compare import assert_same_bytes
from tests.nbd.rawclient import Answer, RawClient
from tests.nbd.spec import COMMANDS, FLAGS, MAX_BLOCK, Session, expected_error
from tests.nbd.support import CHUNK, ORIGIN_SIZE, Gateway, gateway, origin_image

pytestmark = [pytest.mark.e2e]

IMAGE = origin_image()
CONTEXTS = ("base:allocation", "csnap:exceptions")
#: Lengths at every edge; WRITEs leave out those whose payload is not worth sending.
LENGTHS = (0, 1, 511, CHUNK + 1, MAX_BLOCK + 1, (1 << 32) - 1)
WRITE_LENGTHS = (0, 1, 511, CHUNK + 1)
OFFSETS = (0, 1, ORIGIN_SIZE - 1, ORIGIN_SIZE, ORIGIN_SIZE + 1, (1 << 64) - 1)
#: A region no request here writes: read alongside every batch.
CANARY = (ORIGIN_SIZE // 2, 3000)


@dataclass
class Case:
    export: str
    structured: bool
    read_only: bool = False


CASES = {
    "origin": Case("origin", structured=True),
    "snapshot": Case("snap-1", structured=True),
    "simple replies": Case("origin", structured=False),
    "read-only": Case("snap-1", structured=True, read_only=True),
}


class Checker:
    """One connection, the model of its export, and the checks of each reply."""

    def __init__(self, client: RawClient, session: Session, model: bytearray):
        self.client = client
        self.session = session
        self.model = model
        self.cookie = 1000
        self.sent = 0

    def _next(self) -> int:
        self.cookie += 1
        return self.cookie

    async def batch(self, requests: list[tuple[int, int, int, int]]) -> None:
        """Send (command, flags, offset, length) requests at once behind a canary
        READ; check every reply against the spec and the model."""
        expect: dict[int, tuple[int, int, int, int, int]] = {}
        lengths: dict[int, int] = {}
        out = bytearray()
        canary = self._next()
        out += tx.request(Command.READ, canary, CANARY[0], CANARY[1])
        lengths[canary] = CANARY[1]
        for command, flags, offset, length in requests:
            cookie = self._next()
            error = expected_error(command, flags, offset, length, self.session)
            expect[cookie] = (command, flags, offset, length, error)
            out += tx.request(command, cookie, offset, length, flags)
            if command == Command.WRITE:
                out += self._payload(cookie, length)
            if command == Command.READ and error == 0:
                lengths[cookie] = length
        await self.client.send(bytes(out))
        self.sent += len(requests) + 1
        answered: dict[int, Answer] = {}
        for _ in range(len(requests) + 1):
            answer = await self.client.answer(lengths)
            assert answer.cookie not in answered, answer
            answered[answer.cookie] = answer
        assert not answered[canary].errors
        assert answered[canary].data == self.model[CANARY[0] : sum(CANARY)]
        for cookie, (command, flags, offset, length, error) in expect.items():
            answer = answered[cookie]
            what = f"command {command} flags {flags:#x} offset {offset} length {length}"
            assert answer.errors == ([error] if error else []), (what, answer)
            if error == 0:
                self._apply(answer, command, flags, offset, length, cookie)

    @staticmethod
    def _payload(cookie: int, length: int) -> bytes:
        return bytes([cookie % 251 + 1]) * length

    def _apply(
        self, answer: Answer, command: int, flags: int, offset: int, length: int, cookie: int
    ) -> None:
        if command == Command.WRITE:
            self.model[offset : offset + length] = self._payload(cookie, length)
        elif command == Command.WRITE_ZEROES:
            self.model[offset : offset + length] = bytes(length)
        elif command == Command.READ:
            assert answer.data == self.model[offset : offset + length], (offset, length)
            if self.session.structured and length == 0:
                assert [c.type for c in answer.chunks] == [ChunkType.NONE]
        elif command == Command.BLOCK_STATUS:
            assert len(answer.chunks) == self.session.contexts
            for chunk in answer.chunks:
                _, extents = tx.parse_block_status_payload(chunk.payload)
                assert extents and all(size > 0 for size, _ in extents)
                assert sum(size for size, _ in extents) <= length
                if flags & CommandFlag.REQ_ONE:
                    assert len(extents) == 1


async def test_every_request_gets_the_reply_the_spec_prescribes(
    tmp_path: Path, case_name: str
) -> None:
    case = CASES[case_name]
    extra = ("--read-only",) if case.read_only else ()
    async with gateway(tmp_path, *extra, image=IMAGE) as gw:
        await gw.create(1)
        client = await RawClient.unix(gw.socket)
        contexts = CONTEXTS if case.structured else ()
        await client.go(case.export, structured=case.structured, contexts=contexts)
        session = Session(ORIGIN_SIZE, case.structured, len(contexts), case.read_only)
        checker = Checker(client, session, bytearray(IMAGE))
        for command in COMMANDS:
            if command == Command.DISC:
                continue
            for flags in FLAGS:
                if command in (Command.WRITE, Command.WRITE_ZEROES):
                    # One at a time: overlapping writes in flight together
                    # may land in any order.
                    lengths = WRITE_LENGTHS if command == Command.WRITE else LENGTHS
                    for offset in OFFSETS:
                        for length in lengths:
                            await checker.batch([(command, flags, offset, length)])
                else:
                    await checker.batch([(command, flags, o, n) for o in OFFSETS for n in LENGTHS])
        # A WRITE over the maximum is read, dropped and refused; the stream stays in step.
        await checker.batch([(Command.WRITE, 0, 0, MAX_BLOCK + 1)])
        # The largest request allowed, read and written whole.
        await checker.batch([(Command.WRITE, 0, ORIGIN_SIZE - MAX_BLOCK // 2, MAX_BLOCK // 2)])
        await checker.batch([(Command.READ, 0, 0, min(MAX_BLOCK, ORIGIN_SIZE))])
        await final_check(gw, client, checker, case)


async def final_check(gw: Gateway, client: RawClient, checker: Checker, case: Case) -> None:
    """The export holds exactly the model; DISC with any fields ends the connection
    after answering what is in flight; the origin file is as it should be."""
    step = 1 << 20
    for offset in range(0, ORIGIN_SIZE, step):
        await checker.batch([(Command.READ, 0, offset, step)])
    await client.send(
        tx.request(Command.READ, 1, 0, 4096) + tx.request(Command.DISC, 2, 5, 7, 0xFFFF)
    )
    answer = await client.answer(4096)
    assert answer.cookie == 1 and answer.data == checker.model[:4096]
    assert await client.closed()
    origin = gw.origin.read_bytes()
    if case.export == "origin" and not case.read_only:
        assert_same_bytes(origin, checker.model, "the origin file")
    else:
        assert_same_bytes(origin, IMAGE, "the origin file")
    assert checker.sent > 1000  # every combination above was sent


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "case_name" in metafunc.fixturenames:
        metafunc.parametrize("case_name", list(CASES))


async def test_block_status_of_length_zero_is_refused_and_requests_in_flight_are_answered(
    tmp_path: Path,
) -> None:
    async with gateway(tmp_path, image=IMAGE) as gw:
        await gw.create(1)
        client = await RawClient.unix(gw.socket)
        await client.go("snap-1", contexts=CONTEXTS)
        data = b"\x5c" * (1 << 20)
        await client.send(
            tx.request(Command.WRITE, 1, 3 * CHUNK, len(data))
            + data
            + tx.request(Command.BLOCK_STATUS, 2, 0, 0)
            + tx.request(Command.BLOCK_STATUS, 3, 0, 0, CommandFlag.REQ_ONE)
            + tx.request(Command.READ, 4, 0, CHUNK)
        )
        answers = {a.cookie: a for a in [await client.answer() for _ in range(4)]}
        assert answers[1].errors == [] and answers[4].errors == []
        assert answers[2].errors == answers[3].errors == [22]
        assert answers[4].data == IMAGE[:CHUNK]
        # The connection goes on.
        await client.request(Command.READ, 3 * CHUNK, 10, cookie=5)
        assert (await client.answer()).data == data[:10]
        await client.aclose()
