"""Socket activation: listening sockets the service manager opened and passed
as descriptors 3, 4, ... with $LISTEN_FDS (how many) and $LISTEN_PID (for
which process). Taking them removes the variables, so a child never takes
them again. See "Running under systemd" in docs/operations.md.
"""

from __future__ import annotations

import os
import socket
from collections.abc import MutableMapping

__all__ = ["ActivationError", "listen_sockets", "LISTEN_FDS_START"]

#: The first descriptor the manager passes.
LISTEN_FDS_START = 3


class ActivationError(Exception):
    """$LISTEN_FDS names descriptors that are not usable sockets."""


def listen_sockets(environ: MutableMapping[str, str] | None = None) -> list[socket.socket]:
    """The sockets passed to this process; empty when it was not socket-activated."""
    env = os.environ if environ is None else environ
    count = env.get("LISTEN_FDS")
    pid = env.get("LISTEN_PID")
    if count is None or pid is None or pid != str(os.getpid()):
        return []
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(name, None)
    if not count.isdigit():
        raise ActivationError(f"LISTEN_FDS={count!r} is not a number of descriptors")
    sockets: list[socket.socket] = []
    for fd in range(LISTEN_FDS_START, LISTEN_FDS_START + int(count)):
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            for opened in sockets:
                opened.detach()
            raise ActivationError(f"descriptor {fd} is not a socket: {exc.strerror}") from exc
        sock.set_inheritable(False)
        sockets.append(sock)
    return sockets
