"""csnapd killed with SIGKILL around a gateway's first writes, which share
its grants (csnap_nbd.gathered), and started again on the same port:
before a round of them is sent, or as it is sent (the kill lands while the
writes are being received, asked for or answered: which of these is not
pinned down). The gateway asks again for what was in flight, every write
is answered, every
acknowledged write is in the origin, the snapshot still reads what it held
before any of them, and the store checks clean."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from csnap_nbd.wire import transmission as tx
from csnap_nbd.wire.constants import Command, CommandFlag
from tests.compare import assert_same_bytes
from tests.e2e.processes import kept_port, start_csnapd
from tests.nbd.rawclient import Answer, RawClient
from tests.nbd.support import CHUNK, ORIGIN_SIZE, Gateway, csnap_check, gateway, origin_image, stop

pytestmark = [pytest.mark.e2e]

IMAGE = origin_image(seed=23)
#: Writes in flight at once on the connection, as a VM's disk keeps them.
DEPTH = 16
#: Rounds of DEPTH first writes; csnapd is killed during each of the first KILLS.
ROUNDS = 8
KILLS = 4


def _offset(n: int) -> int:
    """Write n's offset: a chunk of its own, so that each write is a first write."""
    return (n * 5 * CHUNK) % ORIGIN_SIZE


def _data(n: int) -> bytes:
    return n.to_bytes(4, "little") * (CHUNK // 4)


async def _round(gw: Gateway, client: RawClient, first: int, flags: int) -> dict[int, Answer]:
    """DEPTH writes sent back to back, and their answers."""
    await client.send(
        b"".join(
            tx.request(Command.WRITE, n, _offset(n), CHUNK, flags) + _data(n)
            for n in range(first, first + DEPTH)
        )
    )
    answers: dict[int, Answer] = {}
    with trio.fail_after(60):
        while len(answers) < DEPTH:
            answer = await client.answer()
            answers[answer.cookie] = answer
    return answers


async def _read(gw: Gateway, export: str) -> bytes:
    client = await RawClient.unix(gw.socket)
    await client.go(export)
    data = bytearray()
    step = 256 * CHUNK
    for offset in range(0, ORIGIN_SIZE, step):
        await client.request(Command.READ, offset, step)
        answer = await client.answer()
        assert not answer.errors, (export, offset, answer.errors)
        data += answer.data
    await client.request(Command.DISC)
    assert await client.closed()
    return bytes(data)


async def restart(
    gw: Gateway, listen: tuple[str, ...], tmp_path: Path, number: int, killed: bool
) -> None:
    """Kill csnapd now (unless it was killed already), and start it again."""
    if killed:
        await trio.sleep(0.2)
    else:
        await trio.lowlevel.checkpoint()
        await gw.csnapd.kill()
    log = tmp_path / f"csnapd-{number}.log"
    gw.csnapd, _, _ = await start_csnapd(gw.store, gw.origin, log, *listen)


@pytest.mark.parametrize("flags", [0, int(CommandFlag.FUA)], ids=["plain", "fua"])
async def test_kill_9_of_csnapd_during_gathered_first_writes_loses_none(
    tmp_path: Path, flags: int
) -> None:
    listen = ("--listen", f"127.0.0.1:{kept_port()}", "--grace", "5")
    async with gateway(tmp_path, image=IMAGE, csnapd_args=listen) as gw:
        await gw.create(1)
        client = await RawClient.unix(gw.socket)
        await client.go("origin")
        acknowledged: list[int] = []
        for round_number in range(ROUNDS):
            first = round_number * DEPTH
            async with trio.open_nursery() as nursery:
                if round_number < KILLS:
                    # Killed as the round is sent, or before it, so that
                    # its grants are asked for while csnapd is down.
                    before = round_number % 2 == 0
                    if before:
                        await gw.csnapd.kill()
                    nursery.start_soon(restart, gw, listen, tmp_path, round_number, before)
                answers = await _round(gw, client, first, flags)
            # The gateway asks again once csnapd is back: nothing fails.
            assert sorted(answers) == list(range(first, first + DEPTH))
            assert all(not a.errors for a in answers.values()), answers
            acknowledged += sorted(answers)
        assert gw.log().count("lost the connection to csnapd") == KILLS, gw.log()
        await client.request(Command.DISC)
        assert await client.closed()

        origin = await _read(gw, "origin")
        expected = bytearray(IMAGE)
        for n in acknowledged:
            expected[_offset(n) : _offset(n) + CHUNK] = _data(n)
        assert_same_bytes(origin, bytes(expected), "origin")
        # Every write copied out first: the snapshot still reads the image.
        assert_same_bytes(await _read(gw, "snap-1"), IMAGE, "snap-1")
        assert await gw.copied(1) == {_offset(n) // CHUNK for n in acknowledged}
        await stop(gw.nbd)
        await stop(gw.csnapd)
    await csnap_check(gw.store)
