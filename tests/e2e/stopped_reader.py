"""A data-path node that stops itself (SIGSTOP) in the worst place: holding a
snapshot read lock on an origin chunk, its origin read not yet done, with
an origin client of the same node connected too (it owes barriers).

    python -m tests.e2e.stopped_reader HOST PORT SNAPSHOT CHUNK ORIGIN STORE

Prints "locked", stops itself; once continued, reads the chunk as a
gateway does (origin read, then DataClient.read_trusted), asking again
whenever the check says the locks' lease ran out. Prints "requeried" for
each such retry and finally "read <hex of the chunk's first 16 bytes>".
"""

from __future__ import annotations

import os
import signal
import sys

import trio

from csnap_client import open_client
from tests.credentials import connector
from tests.server.support import CHUNK

#: Plans one read may take before the node gives up (a bound on a loop).
ATTEMPTS = 4


async def main(host: str, port: int, snapshot: int, chunk: int, origin: str, store: str) -> None:
    connect = connector(host, port, store)
    async with (
        open_client(connect) as _origin_client,
        open_client(connect, snapshot=snapshot) as reader,
    ):
        stopped = False
        for _ in range(ATTEMPTS):
            async with reader.snapshot_read([(chunk, 1)]) as plan:
                if plan.store:
                    path, where = store, plan.store[0][2]
                else:
                    path, where = origin, chunk
                if not stopped:
                    assert plan.origin == ((chunk, 1),), plan
                    print("locked", flush=True)
                    stopped = True
                    os.kill(os.getpid(), signal.SIGSTOP)
                fd = os.open(path, os.O_RDONLY)
                try:
                    data = os.pread(fd, CHUNK, where * CHUNK)
                finally:
                    os.close(fd)
                if reader.read_trusted(plan):
                    print(f"read {data[:16].hex()}", flush=True)
                    return
            print("requeried", flush=True)
        print("gave up", flush=True)


if __name__ == "__main__":
    host, port, snapshot, chunk, origin, store = sys.argv[1:7]
    trio.run(main, host, int(port), int(snapshot), int(chunk), origin, store)
