"""Requests of one size at a fixed queue depth through libnbd, plaintext or
TLS: the client of the TLS table's 4 KiB phases (bench/nbd_bench.py).

  /usr/bin/python3 bench/nbd_load.py URI COUNT SIZE DEPTH read|write

Runs under the system's Python with its libnbd binding (Debian's
python3-libnbd), not the project's virtualenv. COUNT requests of SIZE
bytes, in order from offset 0, DEPTH in flight, over one connection to URI
(an nbd+unix or nbds+unix URI; TLS as the URI says). Prints the seconds
from the start of the connection (the TLS handshake included) to the last
reply; exits 1 if any request failed.

nbdcopy cannot be this client: it raises its request size to the export's
preferred block size, which csnap-nbd advertises as its chunk size.
"""

from __future__ import annotations

import sys
import time

import nbd  # type: ignore[import-not-found]


def main(argv: list[str]) -> int:
    if len(argv) != 5 or argv[4] not in ("read", "write"):
        print(__doc__, file=sys.stderr)
        return 2
    uri, count, size, depth, kind = argv[0], int(argv[1]), int(argv[2]), int(argv[3]), argv[4]
    failed: list[int] = []

    def completed(error: object) -> int:
        # libnbd passes the command's errno in a one-element holder.
        value = getattr(error, "value", error)
        if value:
            failed.append(int(value))  # type: ignore[call-overload]
        return 1  # retire the command at once

    buffer = nbd.Buffer.from_bytearray(bytearray(b"\x5a" * size))  # what writes write
    started = time.perf_counter()
    handle = nbd.NBD()
    # The URI names the client's certificate directory (tls-certificates=),
    # which libnbd reads only when allowed, as nbdcopy allows it.
    handle.set_uri_allow_local_file(True)
    handle.connect_uri(uri)
    issued = 0
    while issued < count or handle.aio_in_flight() > 0:
        while issued < count and handle.aio_in_flight() < depth:
            if kind == "write":
                handle.aio_pwrite(buffer, issued * size, completion=completed)
            else:
                handle.aio_pread(buffer, issued * size, completion=completed)
            issued += 1
        handle.poll(-1)
    seconds = time.perf_counter() - started
    handle.shutdown()
    if failed:
        print(f"{len(failed)} of {count} requests failed (errno {failed[0]})", file=sys.stderr)
        return 1
    print(f"{seconds:.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
