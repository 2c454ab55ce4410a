"""A data-path client closed while it is reconnecting ends: the session it
was setting up is closed as soon as it is up, not waited on for ever.
"""

from __future__ import annotations

from pathlib import Path

import trio

from csnap_client import open_client
from tests.server.support import make_store, running


async def test_a_client_closed_while_it_reconnects_ends(tmp_path: Path) -> None:
    for name in ("first", "second"):
        (tmp_path / name).mkdir()
    first_config = make_store(tmp_path / "first")
    second_config = make_store(tmp_path / "second")
    reconnecting, proceed = trio.Event(), trio.Event()
    calls = 0
    async with running(first_config) as first, running(second_config) as second:

        async def connect() -> trio.abc.Stream:
            """The first server; then, held back until `proceed`, the second."""
            nonlocal calls
            calls += 1
            if calls == 1:
                return await first.connector()()
            reconnecting.set()
            await proceed.wait()
            return await second.connector()()

        async def proceed_later() -> None:
            await trio.sleep(0.2)  # the client's block has ended by then
            proceed.set()

        # The client's block ends while its reconnection is under way: it
        # must end anyway.
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery, open_client(connect) as client:
                assert client.info is not None
                first.stop.set()  # the first server shuts down: the session ends
                await reconnecting.wait()
                nursery.start_soon(proceed_later)
        assert calls == 2
