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
from tests.nbd.support import CHUNK, Gateway, csnap_check, gateway, origin_image, stop

pytestmark = [pytest.mark.e2e]

#: Chunks per read: every other one copied, so half of each is on the origin.
READ_CHUNKS = 4
DEPTH = 16
READS = 512


async def _requests(gw: Gateway) -> int:
    info = await gw.server_info()
    return int(str(info["requests"]))


async def _copy_every_other_chunk(origin: RawClient, span: int) -> None:
    """Write every other of the first `span` chunks through the origin
    export: copied for the snapshot, the others still shared."""
    for first in range(0, span, 2 * DEPTH):
        chunks = range(first, min(span, first + 2 * DEPTH), 2)
        for chunk in chunks:
            await origin.request(
                Command.WRITE, chunk * CHUNK, CHUNK, cookie=chunk, payload=b"\x5a" * CHUNK
            )
        for _ in chunks:
            assert (await origin.answer()).error == 0


async def test_a_queue_of_half_shared_reads_is_confirmed_a_refill_at_a_time(
    tmp_path: Path,
) -> None:
    image = origin_image()
    async with gateway(tmp_path, image=image) as gw:
        await gw.create(1)
        origin = await RawClient.unix(gw.socket)
        await origin.go("origin")
        await _copy_every_other_chunk(origin, READS * READ_CHUNKS)
        reader = await RawClient.unix(gw.socket)
        await reader.go("snap-1", structured=False)
        length = READ_CHUNKS * CHUNK

        async def send(number: int) -> None:
            await reader.request(Command.READ, number * length, length, cookie=number)

        async def asked_in_a_pass() -> int:
            """csnapd requests while READS reads pass through a queue of DEPTH,
            less the first DEPTH reads (which may learn the owned map)."""
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
            return await _requests(gw) - before - 1  # less the second server_info

        # A confirmation per refill asks about 12 to 16 reads at a time; one
        # asked as soon as a read is in, 2 to 4. A busy host can hold either
        # process past a refill's gap: up to three passes, and one must do.
        bound = (READS - DEPTH) // 8
        counts: list[int] = []
        with trio.fail_after(180):
            for _ in range(3):
                counts.append(await asked_in_a_pass())
                if counts[-1] <= bound:
                    break
        assert 1 <= counts[-1] <= bound, counts
        for conn in (origin, reader):
            await conn.request(Command.DISC)
            assert await conn.closed()
        await stop(gw.nbd)
        await stop(gw.csnapd)
    await csnap_check(gw.store)
