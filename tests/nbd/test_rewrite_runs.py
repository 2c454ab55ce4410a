"""Origin rewrites answered in a run straight from the receive buffer
(csnap_nbd.runs): a run answers only plain WRITEs of chunks known unique and
hands everything else, from its header, to the usual path, which answers it
as before; a snapshot taken between two runs is never written through.

Requests are sent many to a packet, so that the gateway finds several in
one receive, which is what a run takes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from csnap_nbd.wire import transmission as tx
from csnap_nbd.wire.constants import Command, CommandFlag
from tests.compare import assert_same_bytes
from tests.nbd.rawclient import Answer, RawClient
from tests.nbd.support import CHUNK, ORIGIN_SIZE, Gateway, csnap_check, gateway, origin_image
from tests.ops.metrics_support import Scrape, scrape

pytestmark = [pytest.mark.e2e]

IMAGE = origin_image(seed=7)
_EINVAL, _ENOSPC = 22, 28


def _payload(cookie: int, length: int) -> bytes:
    return bytes([cookie % 251 + 1]) * length


class Writer:
    """One connection to an export, with the model of what it holds."""

    def __init__(self, client: RawClient, model: bytearray):
        self.client = client
        self.model = model
        self.cookie = 0

    async def packet(self, requests: list[tuple[int, int, int, int]]) -> dict[int, Answer]:
        """Send (command, flags, offset, length) requests in one packet; every
        answer by cookie. A WRITE answered without error goes into the model."""
        out = bytearray()
        sent: dict[int, tuple[int, int, int]] = {}
        lengths: dict[int, int] = {}
        for command, flags, offset, length in requests:
            self.cookie += 1
            sent[self.cookie] = (command, offset, length)
            out += tx.request(command, self.cookie, offset, length, flags)
            if command == Command.WRITE:
                out += _payload(self.cookie, length)
            else:
                lengths[self.cookie] = length
        await self.client.send(bytes(out))
        answers: dict[int, Answer] = {}
        for _ in requests:
            answer = await self.client.answer(lengths)
            assert answer.cookie in sent and answer.cookie not in answers, answer
            answers[answer.cookie] = answer
        for cookie, (command, offset, length) in sent.items():
            if command == Command.WRITE and not answers[cookie].errors:
                self.model[offset : offset + length] = _payload(cookie, length)
        return answers

    async def read_all(self) -> bytes:
        step = 256 << 10
        out = bytearray()
        for offset in range(0, ORIGIN_SIZE, step):
            answers = await self.packet([(Command.READ, 0, offset, step)])
            (answer,) = answers.values()
            assert not answer.errors, answer
            out += answer.data
        return bytes(out)


def _rewrite(chunk: int, within: int = 0, length: int = 1024) -> tuple[int, int, int, int]:
    return (Command.WRITE, 0, chunk * CHUNK + within, length)


async def _metrics(gw: Gateway) -> Scrape:
    assert gw.metrics is not None
    return await scrape(gw.metrics)


async def _origin(gw: Gateway) -> Writer:
    client = await RawClient.unix(gw.socket)
    await client.go("origin", structured=False)
    return Writer(client, bytearray(IMAGE))


async def test_a_run_answers_rewrites_and_leaves_every_other_request_to_the_usual_path(
    tmp_path: Path,
) -> None:
    async with gateway(tmp_path, "--metrics", "127.0.0.1:0", image=IMAGE) as gw:
        await gw.create(1)
        origin = await _origin(gw)
        # The first write of each chunk copies it out for snapshot 1; then
        # the gateway knows it unique.
        first = await origin.packet([_rewrite(chunk) for chunk in range(32)])
        assert all(not answer.errors for answer in first.values())
        before = await _metrics(gw)

        plain = [_rewrite(chunk, within=1024 + 16 * chunk) for chunk in range(1, 4)]
        plain += [_rewrite(chunk, within=2048, length=2048) for chunk in range(8, 12)]
        mixed = [
            *plain[:3],
            # Across two chunks: not a run's.
            (Command.WRITE, 0, 4 * CHUNK + 3072, 2048),
            # FUA: durable before its reply, the usual path's.
            (Command.WRITE, CommandFlag.FUA, 7 * CHUNK, 512),
            plain[3],
            # A chunk never written since snapshot 1: copied out first.
            _rewrite(40, within=100),
            plain[4],
            # Past the end: ENOSPC, and nothing written.
            (Command.WRITE, 0, ORIGIN_SIZE - 512, 1024),
            plain[5],
            # A flag nobody negotiated: EINVAL.
            (Command.WRITE, 0x8000, 12 * CHUNK, 512),
            # A read between rewrites, of a chunk none of them writes.
            (Command.READ, 0, 20 * CHUNK, 3000),
            plain[6],
            # Length 0 is answered, and writes nothing.
            (Command.WRITE, 0, 13 * CHUNK, 0),
            _rewrite(14, within=4095, length=1),
        ]
        expected_model = bytearray(origin.model)
        answers = await origin.packet(mixed)
        errors = [answers[cookie].errors for cookie in sorted(answers)]
        assert errors == [[]] * 8 + [[_ENOSPC]] + [[]] + [[_EINVAL]] + [[]] * 4
        read = answers[sorted(answers)[11]]
        assert read.data == origin.model[20 * CHUNK : 20 * CHUNK + 3000]
        # Nothing a refused write carried reached the model, nor the export.
        assert expected_model[ORIGIN_SIZE - 512 :] == origin.model[ORIGIN_SIZE - 512 :]
        assert origin.model[12 * CHUNK : 13 * CHUNK] == expected_model[12 * CHUNK : 13 * CHUNK]

        after = await _metrics(gw)
        writes = {"export": "origin", "command": "write"}
        assert after.value("csnap_nbd_requests_total", **writes) - before.value(
            "csnap_nbd_requests_total", **writes
        ) == sum(1 for request in mixed if request[0] == Command.WRITE)
        ran = after.value("csnap_nbd_run_writes_total", export="origin") - before.value(
            "csnap_nbd_run_writes_total", export="origin"
        )
        # Only plain rewrites of chunks known unique may go in a run, and
        # they came in one packet: the gateway took some of them in runs.
        assert 0 < ran <= len(plain) + 1

        assert await origin.read_all() == bytes(origin.model)
        snapshot = await RawClient.unix(gw.socket)
        await snapshot.go("snap-1", structured=False)
        assert await Writer(snapshot, bytearray()).read_all() == IMAGE
        await origin.client.aclose()
        await snapshot.aclose()
    assert_same_bytes(gw.origin.read_bytes(), bytes(origin.model), "the origin file")
    await csnap_check(gw.store)


async def test_a_snapshot_taken_between_runs_keeps_what_the_runs_wrote_before_it(
    tmp_path: Path,
) -> None:
    chunks = 64
    async with gateway(tmp_path, "--metrics", "127.0.0.1:0", image=IMAGE) as gw:
        origin = await _origin(gw)
        # No snapshot: every chunk is unique from the start once csnapd says so.
        await origin.packet([_rewrite(chunk) for chunk in range(chunks)])
        for round_ in range(3):
            await origin.packet([_rewrite(c, within=64 * round_ + 8) for c in range(chunks)])
        ran_before = (await _metrics(gw)).value("csnap_nbd_run_writes_total", export="origin")
        assert ran_before > 0
        taken = bytes(origin.model)
        await gw.create(2)
        # The same chunks again, as fast as they go: none may be written in
        # place before its copy-out for snapshot 2.
        for round_ in range(3):
            answers = await origin.packet(
                [_rewrite(c, within=2048 + 64 * round_) for c in range(chunks)]
            )
            assert all(not answer.errors for answer in answers.values())
        with trio.fail_after(30):
            snapshot = await RawClient.unix(gw.socket)
            await snapshot.go("snap-2", structured=False)
            assert await Writer(snapshot, bytearray()).read_all() == taken
        assert await origin.read_all() == bytes(origin.model)
        assert await gw.copied(2) == set(range(chunks))
        await origin.client.aclose()
        await snapshot.aclose()
    await csnap_check(gw.store)


async def test_broken_framing_after_a_run_ends_the_connection_after_its_answers(
    tmp_path: Path,
) -> None:
    async with gateway(tmp_path, image=IMAGE) as gw:
        origin = await _origin(gw)
        await origin.packet([_rewrite(chunk) for chunk in range(8)])
        out = bytearray()
        for chunk in range(8):
            cookie = 100 + chunk
            out += tx.request(Command.WRITE, cookie, chunk * CHUNK + 512, 256)
            out += _payload(cookie, 256)
            origin.model[chunk * CHUNK + 512 : chunk * CHUNK + 768] = _payload(cookie, 256)
        # A request header with a bad magic: the framing is lost.
        out += b"\x00" * tx.REQUEST.size
        await origin.client.send(bytes(out))
        answered = {(await origin.client.answer()).cookie for _ in range(8)}
        assert answered == set(range(100, 108))
        assert await origin.client.closed()
        # Everyone else, this client's next connection included, goes on.
        again = await _origin(gw)
        again.model = origin.model
        assert await again.read_all() == bytes(origin.model)
        await again.client.aclose()
    await csnap_check(gw.store)
