"""csnapd without authentication, for bench.tls_bench only: the same server
serving the same store, but plaintext with every peer an admin, so that the
cost of TLS can be measured against it. No command line of csnap can start
a server like this.

  python -m bench.plaintext_csnapd STORE ORIGIN

prints "listening HOST:PORT" (loopback, a free port) and serves until SIGTERM.
"""

from __future__ import annotations

import signal
import sys

import trio

from csnapd.server import ServerConfig, serve


async def _main(store: str, origin: str) -> None:
    stop = trio.Event()
    async with trio.open_nursery() as nursery:

        async def serve_then_stop(task_status: trio.TaskStatus[str]) -> None:
            config = ServerConfig(store=store, origin=origin, host="127.0.0.1")
            await serve(config, stop=stop, task_status=task_status, authenticate=False)
            nursery.cancel_scope.cancel()

        address = await nursery.start(serve_then_stop)
        print(f"listening {address}", flush=True)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                stop.set()
                return


if __name__ == "__main__":
    trio.run(_main, sys.argv[1], sys.argv[2])
