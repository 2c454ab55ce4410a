"""A client that sends requests without reading its replies: csnap-nbd stops
reading it once its replies hold the connection's budget, serves the other
connections meanwhile, and, once the client reads, answers every request
with the right data (replies sent part-way by the reader are finished by
the writer, in order)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from csnap_nbd.settings import Settings
from csnap_nbd.wire.constants import Command
from tests.nbd.rawclient import RawClient
from tests.nbd.support import ORIGIN_SIZE, Gateway, gateway, origin_image

pytestmark = [pytest.mark.e2e]

IMAGE = origin_image(seed=7)
SMALL = 4096
#: Small reads, each answered by the reader itself (no task: only the
#: reader's own sends carry their replies): together more reply data than
#: one connection may hold.
READS = [(SMALL, (n * 7919 * SMALL) % ORIGIN_SIZE) for n in range(16384)]


def test_the_reads_hold_more_than_the_budget() -> None:
    held = sum(length + 1024 for length, _ in READS)
    assert held > Settings().connection_budget


@pytest.fixture
async def gw(tmp_path: Path) -> AsyncIterator[Gateway]:
    async with gateway(tmp_path, image=IMAGE) as running:
        yield running


async def _others_served(gw: Gateway) -> None:
    """Another connection reads and writes while the flood waits."""
    other = await RawClient.tcp(gw.port)
    await other.go("origin")
    for n in range(50):
        offset = (n * 13 * SMALL) % ORIGIN_SIZE
        await other.request(Command.READ, offset, SMALL, cookie=n)
        answer = await other.answer()
        assert answer.cookie == n and not answer.errors
        assert answer.data == IMAGE[offset : offset + SMALL]
    await other.request(Command.DISC)
    assert await other.closed()


async def test_a_client_that_does_not_read_stops_being_read_and_loses_nothing(
    gw: Gateway,
) -> None:
    flood = await RawClient.unix(gw.socket)
    await flood.go("origin")
    lengths = {cookie: length for cookie, (length, _) in enumerate(READS)}
    async with trio.open_nursery() as nursery:

        async def send_all() -> None:
            for cookie, (length, offset) in enumerate(READS):
                await flood.request(Command.READ, offset, length, cookie=cookie)

        nursery.start_soon(send_all)
        with trio.fail_after(30):
            await _others_served(gw)
        # Now read everything: each request answered once, with its data.
        answered: set[int] = set()
        with trio.fail_after(120):
            for _ in READS:
                answer = await flood.answer(lengths)
                assert not answer.errors, answer.errors
                assert answer.cookie not in answered
                answered.add(answer.cookie)
                length, offset = READS[answer.cookie]
                assert answer.data == IMAGE[offset : offset + length]
    assert answered == set(range(len(READS)))
    await flood.request(Command.DISC)
    assert await flood.closed()
