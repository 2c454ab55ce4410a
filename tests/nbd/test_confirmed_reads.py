"""Snapshot reads of chunks still shared with the origin, read by the
gateway without read locks and confirmed with csnapd after the read (docs/
rules.md, "verified origin reads"): a client that keeps a queue of reads in
flight, sending the next as it reads each reply (as nbdcopy does in a
backup), has each refill of its queue confirmed with one query_map, not
one per few reads; and every read is the snapshot's.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from csnap_nbd.wire.constants import Command
from tests.nbd.rawclient import RawClient
from tests.nbd.support import CHUNK, csnap_check, gateway, origin_image, stop

pytestmark = [pytest.mark.e2e]

#: Chunks per read: every other one copied, so half of each is on the origin.
READ_CHUNKS = 4
DEPTH = 16
READS = 512


async def _requests(gw: object) -> int:
    info = await gw.server_info()  # type: ignore[attr-defined]
    return int(str(info["requests"]))


async def test_a_queue_of_half_shared_reads_is_confirmed_a_refill_at_a_time(
    tmp_path: Path,
) -> None:
    image = origin_image()
    span = READS * READ_CHUNKS
    async with gateway(tmp_path, image=image) as gw:
        await gw.create(1)
        origin = await RawClient.unix(gw.socket)
        await origin.go("origin")
        # Every other chunk written through the origin: copied for snapshot 1.
        for first in range(0, span, 2 * DEPTH):
            chunks = range(first, min(span, first + 2 * DEPTH), 2)
            for chunk in chunks:
                await origin.request(
                    Command.WRITE, chunk * CHUNK, CHUNK, cookie=chunk, payload=b"\x5a" * CHUNK
                )
            for _ in chunks:
                assert (await origin.answer()).error == 0
        reader = await RawClient.unix(gw.socket)
        await reader.go("snap-1", structured=False)
        length = READ_CHUNKS * CHUNK

        async def send(number: int) -> None:
            await reader.request(Command.READ, number * length, length, cookie=number)

        with trio.fail_after(120):
            # The first reads learn the owned map and reach the queue's depth.
            for number in range(DEPTH):
                await send(number)
            before = 0
            for answered in range(READS):
                if answered == DEPTH:
                    before = await _requests(gw)
                answer = await reader.answer(length)
                assert answer.error == 0, answer
                offset = answer.cookie * length
                assert answer.data == image[offset : offset + length], answer.cookie
                if answered + DEPTH < READS:
                    await send(answered + DEPTH)
            asked = await _requests(gw) - before - 1  # less the second server_info
        confirmed = READS - DEPTH
        # A confirmation per refill asks about 12 to 16 reads at a time; one
        # asked as soon as a read is in, 2 to 4 (a query_map for every 2 to 4 reads).
        assert 1 <= asked <= confirmed // 8, asked
        for conn in (origin, reader):
            await conn.request(Command.DISC)
            assert await conn.closed()
        await stop(gw.nbd)
        await stop(gw.csnapd)
    await csnap_check(gw.store)
