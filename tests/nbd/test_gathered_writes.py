"""First writes in flight on one connection share csnapd's grant
(csnap_nbd.gathered): one query_write copies out for them all before any
of them reaches the origin (and with FUA, one sync makes them durable). A
shared grant csnapd refuses is asked again write by write, so that each
write gets its own answer."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import trio

from csnap_nbd.gathered import REFILL_GAP
from csnap_nbd.wire import transmission as tx
from csnap_nbd.wire.constants import Command, CommandFlag, Errno
from tests.nbd.rawclient import Answer, RawClient
from tests.nbd.support import CHUNK, ORIGIN_SIZE, Gateway, csnap_check, gateway, origin_image, stop

pytestmark = [pytest.mark.e2e]

IMAGE = origin_image(seed=11)
WRITES = 64


def _offset(n: int) -> int:
    """The n-th write's offset: every third chunk, so that none neighbours another."""
    return (3 * n * CHUNK) % ORIGIN_SIZE


def _data(n: int) -> bytes:
    return bytes([n % 251 + 1]) * CHUNK


async def _write_all(gw: Gateway, count: int, flags: int = 0) -> dict[int, Answer]:
    """`count` first writes sent back to back on one connection, then their answers."""
    client = await RawClient.unix(gw.socket)
    await client.go("origin")
    await client.send(b"".join(_request(n, flags) for n in range(count)))
    answers = {}
    for _ in range(count):
        answer = await client.answer()
        assert answer.cookie not in answers
        answers[answer.cookie] = answer
    await client.request(Command.DISC)
    assert await client.closed()
    return answers


def _request(n: int, flags: int = 0) -> bytes:
    return tx.request(Command.WRITE, n, _offset(n), CHUNK, flags) + _data(n)


async def _read(gw: Gateway, export: str, offset: int) -> bytes:
    client = await RawClient.unix(gw.socket)
    await client.go(export)
    await client.request(Command.READ, offset, CHUNK, cookie=1)
    answer = await client.answer()
    assert not answer.errors, answer.errors
    await client.request(Command.DISC)
    assert await client.closed()
    return answer.data


@pytest.mark.parametrize("flags", [0, int(CommandFlag.FUA)], ids=["plain", "fua"])
async def test_first_writes_in_flight_share_grants_and_copy_out_first(
    tmp_path: Path, flags: int
) -> None:
    # With FUA too: the writes share the grant and then one sync.
    async with gateway(tmp_path, image=IMAGE) as gw:
        await gw.create(1)
        before = await gw.server_info()
        answers = await _write_all(gw, WRITES, flags)
        after = await gw.server_info()
        assert all(not a.errors for a in answers.values())
        # Far fewer csnapd requests than writes (the two server_info calls
        # count one each): the writes shared their grants.
        asked = int(str(after["requests"])) - int(str(before["requests"])) - 1
        assert 1 <= asked <= WRITES // 4, asked
        assert await gw.copied(1) == {_offset(n) // CHUNK for n in range(WRITES)}
        for n in range(0, WRITES, 7):
            assert await _read(gw, "origin", _offset(n)) == _data(n)
            assert await _read(gw, "snap-1", _offset(n)) == IMAGE[_offset(n) : _offset(n) + CHUNK]
        await stop(gw.nbd)
        await stop(gw.csnapd)
    await csnap_check(gw.store)


async def test_a_refill_after_a_batch_is_waited_for_and_asked_for_whole(
    tmp_path: Path,
) -> None:
    """After a batch of 16 is answered, the client's next write comes alone
    and the other 15 a moment later, as a VM's block layer refills its
    queue: the ask waits for them (csnap_nbd.gathered) instead of going with
    the first alone, so one csnapd request serves each 16, not two. (A
    round whose 15 come later than REFILL_GAP, on a busy host, splits: the
    bound allows half of them to.) Every write is a first write: offsets
    do not wrap."""
    depth, rounds = 16, 16
    async with gateway(tmp_path, image=IMAGE) as gw:
        await gw.create(1)
        client = await RawClient.unix(gw.socket)
        await client.go("origin")

        async def round_of(first: int, gap: float) -> None:
            await client.send(_request(first))
            # Not trio.sleep: its timers round up to a millisecond.
            time.sleep(gap)  # noqa: ASYNC251
            await client.send(b"".join(_request(n) for n in range(first + 1, first + depth)))
            answers = [await client.answer() for _ in range(depth)]
            assert sorted(a.cookie for a in answers) == list(range(first, first + depth))
            assert not any(a.errors for a in answers)

        with trio.fail_after(60):
            await round_of(0, 0)
            counts: list[int] = []
            # A busy host can hold either process past a gap in many rounds
            # running: up to three tries of 16 rounds, and one must do.
            for attempt in range(3):
                start = depth * (1 + attempt * rounds)
                before = await gw.server_info()
                for first in range(start, start + depth * rounds, depth):
                    await round_of(first, REFILL_GAP / 5)
                after = await gw.server_info()
                counts.append(int(str(after["requests"])) - int(str(before["requests"])) - 1)
                if counts[-1] <= rounds * 3 // 2:
                    break
        # One per round when the refill is waited for, two when not.
        assert rounds <= counts[-1] <= rounds * 3 // 2, counts
        await client.request(Command.DISC)
        assert await client.closed()
        written = range(start + depth * rounds)
        assert await gw.copied(1) == {_offset(n) // CHUNK for n in written}
        await stop(gw.nbd)
        await stop(gw.csnapd)
    await csnap_check(gw.store)


async def test_a_shared_grant_refused_for_space_is_asked_again_write_by_write(
    tmp_path: Path,
) -> None:
    async with gateway(tmp_path, image=IMAGE, store_size=2 << 20) as gw:
        async with gw.admin() as admin:
            await admin.create_snapshot(1, 0)
            await admin.change_use_count(1, 1)  # in use: never squashed for room
            free = (await admin.status()).store.data_free
        # More first writes than the store has room for: the last grants
        # asked for together cannot be given.
        assert 0 < free < ORIGIN_SIZE // CHUNK // 4, free
        answers = await _write_all(gw, free + 16)
        done = sorted(n for n, a in answers.items() if not a.errors)
        refused = sorted(n for n, a in answers.items() if a.errors)
        # Each write that found room was served alone; every other one was
        # refused for space, and none of them reached the origin.
        assert len(done) == free, (len(done), free)
        assert all(answers[n].errors == [Errno.ENOSPC] for n in refused)
        for n in done[:4] + refused[:4]:
            expected = _data(n) if n in done else IMAGE[_offset(n) : _offset(n) + CHUNK]
            assert await _read(gw, "origin", _offset(n)) == expected
            assert await _read(gw, "snap-1", _offset(n)) == IMAGE[_offset(n) : _offset(n) + CHUNK]
        await stop(gw.nbd)
        await stop(gw.csnapd)
    await csnap_check(gw.store)


async def test_a_write_parked_by_a_read_lock_holds_up_no_other(tmp_path: Path) -> None:
    async with gateway(tmp_path, image=IMAGE) as gw:
        await gw.create(1)
        async with gw.client(snapshot=1) as reader:
            client = await RawClient.unix(gw.socket)
            await client.go("origin")
            # A snapshot reader holds a read lock on write 0's chunk: csnapd
            # parks every grant that names it.
            async with reader.snapshot_read([(_offset(0) // CHUNK, 1)]) as plan:
                assert plan.origin
                read = tx.request(Command.READ, 99, _offset(40), CHUNK)
                await client.send(b"".join(_request(n) for n in range(16)) + read)
                answers: dict[int, Answer] = {}
                with trio.fail_after(5):
                    while len(answers) < 16:
                        answer = await client.answer()
                        answers[answer.cookie] = answer
                # Every other write, and the read, while the lock is held.
                assert set(answers) == {*range(1, 16), 99}
                assert not any(a.errors for a in answers.values())
            with trio.fail_after(5):
                parked = await client.answer()
            assert parked.cookie == 0 and not parked.errors
            await client.request(Command.DISC)
            assert await client.closed()
        assert await _read(gw, "origin", _offset(0)) == _data(0)
        assert await _read(gw, "snap-1", _offset(0)) == IMAGE[_offset(0) : _offset(0) + CHUNK]


async def test_replies_the_reader_queued_leave_when_it_stops(tmp_path: Path) -> None:
    async with gateway(tmp_path, image=IMAGE) as gw:
        await gw.create(1)
        async with gw.client(snapshot=1) as reader:
            client = await RawClient.unix(gw.socket)
            await client.go("origin")
            async with reader.snapshot_read([(_offset(0) // CHUNK, 1)]):
                # A write csnapd parks, a read the reader answers itself, and
                # the end of the connection, at once: the read's reply does
                # not wait for the parked write.
                read = tx.request(Command.READ, 99, _offset(40), CHUNK)
                await client.send(_request(0) + read + tx.request(Command.DISC, 7, 0, 0))
                with trio.fail_after(3):
                    answer = await client.answer()
                assert answer.cookie == 99 and not answer.errors
                assert answer.data == IMAGE[_offset(40) : _offset(40) + CHUNK]
            with trio.fail_after(5):
                parked = await client.answer()
            assert parked.cookie == 0 and not parked.errors
            assert await client.closed()
