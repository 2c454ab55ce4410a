"""The gateway's shared fdatasyncs (csnap_nbd.backing): callers that come
while a sync runs wait for the next round, one of them starts it, the
others share it, and every caller returns.
"""

from __future__ import annotations

from pathlib import Path

import trio
import trio.lowlevel

from csnap_nbd.backing import Backing

#: Concurrent callers: the first starts a round, the others wait and share the next.
CALLERS = 8


async def test_callers_arriving_during_a_sync_share_the_next_and_all_return(
    tmp_path: Path,
) -> None:
    origin, store = tmp_path / "origin.img", tmp_path / "store.img"
    for path in (origin, store):
        path.write_bytes(bytes(1 << 16))
    backing = Backing(str(origin), str(store), read_only=False)
    returned: list[int] = []

    async def sync(number: int) -> None:
        await backing.sync()
        returned.append(number)

    try:
        with trio.fail_after(60):
            for _ in range(3):
                returned.clear()
                async with trio.open_nursery() as nursery:
                    for number in range(CALLERS):
                        nursery.start_soon(sync, number)
                        # The first caller's sync is running in its thread
                        # when the others come.
                        await trio.lowlevel.checkpoint()
                assert sorted(returned) == list(range(CALLERS))
    finally:
        backing.close()
