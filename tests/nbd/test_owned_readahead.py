"""The owned map's read-ahead (csnap_client.owned): a reader going forward
through a snapshot finds each window of its owned map asked about before its
first read there, whether that read is served from a store chunk the
snapshot owns or from the origin; each window is asked about once, none past
the end; a reader that jumps asks only for what it reads; and every read is
the snapshot's.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from csnap_client.owned import WINDOW_CHUNKS
from csnap_nbd.wire.constants import Command
from tests.e2e.processes import next_line
from tests.nbd.rawclient import RawClient
from tests.nbd.support import CHUNK, ORIGIN_SIZE, csnap_check, gateway, origin_image, stop
from tests.ops.metrics_support import Scrape, metrics_url, scrape, scrape_until

pytestmark = [pytest.mark.e2e]

WINDOWS = ORIGIN_SIZE // CHUNK // WINDOW_CHUNKS
#: Within each window, the chunk copied for the snapshot before the reads.
COPIED = 5
#: How long the test waits to see that nothing more is asked.
SETTLE = 0.5


async def _asked(url: str) -> int:
    return int((await scrape(url)).total("csnapd_requests_total", type="query_owned"))


async def _asked_reaches(url: str, count: int) -> None:
    def reached(found: Scrape) -> bool:
        return found.total("csnapd_requests_total", type="query_owned") >= count

    await scrape_until(url, reached)


async def test_a_reader_going_forward_finds_each_window_asked_about_before_it_arrives(
    tmp_path: Path,
) -> None:
    assert WINDOWS >= 4, "the test needs windows to go forward through"
    image = origin_image()
    async with gateway(tmp_path, image=image, csnapd_args=("--metrics", "127.0.0.1:0")) as gw:
        url = metrics_url([await next_line(gw.csnapd)])
        await gw.create(1)
        origin = await RawClient.unix(gw.socket)
        await origin.go("origin")
        for window in range(WINDOWS):
            chunk = window * WINDOW_CHUNKS + COPIED
            await origin.request(
                Command.WRITE, chunk * CHUNK, CHUNK, cookie=chunk, payload=b"\x5a" * CHUNK
            )
            assert (await origin.answer()).error == 0
        reader = await RawClient.unix(gw.socket)
        await reader.go("snap-1", structured=False)

        async def read(chunk: int) -> None:
            await reader.request(Command.READ, chunk * CHUNK, CHUNK, cookie=chunk)
            answer = await reader.answer(CHUNK)
            assert answer.error == 0, answer
            assert answer.data == image[chunk * CHUNK : (chunk + 1) * CHUNK], chunk

        with trio.fail_after(120):
            before = await _asked(url)
            await read(0)
            for window in range(1, WINDOWS):
                # Asked for ahead, by the first read of the window before.
                await _asked_reaches(url, before + window + 1)
                first = window * WINDOW_CHUNKS
                # The first read of a window: a store chunk the snapshot owns
                # (read inline) in odd windows, an origin chunk in even ones.
                await read(first + COPIED if window % 2 else first)
                await read(first + WINDOW_CHUNKS - 1)
            await trio.sleep(SETTLE)
            assert await _asked(url) - before == WINDOWS  # each once, none past the end

            # Once the export has no connection left, the next learns its
            # map anew; one that jumps into a window whose predecessor it
            # does not know asks for no other.
            await reader.request(Command.DISC)
            assert await reader.closed()
            jumper = await RawClient.unix(gw.socket)
            await jumper.go("snap-1", structured=False)
            before = await _asked(url)
            chunk = 2 * WINDOW_CHUNKS + COPIED
            await jumper.request(Command.READ, chunk * CHUNK, CHUNK, cookie=chunk)
            answer = await jumper.answer(CHUNK)
            assert answer.error == 0 and answer.data == image[chunk * CHUNK : (chunk + 1) * CHUNK]
            await trio.sleep(SETTLE)
            assert await _asked(url) - before == 1

        for conn in (origin, jumper):
            await conn.request(Command.DISC)
            assert await conn.closed()
        await stop(gw.nbd)
        await stop(gw.csnapd)
    await csnap_check(gw.store)
