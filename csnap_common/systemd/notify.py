"""The sd_notify protocol: one datagram of "KEY=value" lines sent to the Unix
socket named by $NOTIFY_SOCKET (a path, or "@name" in the abstract
namespace). csnap services send READY=1 once they really serve, STATUS=
lines as their state changes, STOPPING=1 when asked to stop, and WATCHDOG=1
every half $WATCHDOG_USEC while their event loop runs. Without
$NOTIFY_SOCKET every call is a no-op; a manager that stopped listening never
stops the service. See "Running under systemd" in docs/operations.md.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Awaitable, Callable, Mapping

__all__ = [
    "notify",
    "notify_ready",
    "notify_status",
    "notify_stopping",
    "watchdog_period",
    "keep_watchdog_fed",
]

log = logging.getLogger("csnap.systemd")

#: Longest a notification may block on a manager that does not read: the
#: event loop is not held up for longer, and the message is dropped.
#: Watchdog pings never wait: a late one is worth nothing, the next comes soon.
SEND_TIMEOUT = 1.0


def _socket_address(target: str) -> str | None:
    """$NOTIFY_SOCKET -> the address to send to; None for a form we do not speak."""
    if target.startswith("@"):
        return "\0" + target[1:]
    if target.startswith("/"):
        return target
    return None  # vsock: and other transports csnap is never started with


def notify(*assignments: str, environ: Mapping[str, str] | None = None, wait: bool = True) -> bool:
    """Send "KEY=value" assignments to the service manager; whether it was sent.

    With `wait` false, a manager whose queue is full is not waited for.
    """
    env = os.environ if environ is None else environ
    target = env.get("NOTIFY_SOCKET")
    if not target:
        return False
    address = _socket_address(target)
    if address is None:
        log.debug("NOTIFY_SOCKET=%s: unsupported address form; not notifying", target)
        return False
    message = "\n".join(assignments).encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.settimeout(SEND_TIMEOUT if wait else 0.0)
        try:
            sock.sendto(message, address)
        except OSError as exc:
            # The manager went away or is stuck: the service keeps serving.
            log.debug("cannot notify %s: %s", target, exc)
            return False
    return True


def _status(text: str) -> str:
    """STATUS= takes one line."""
    return "STATUS=" + " ".join(text.split())


def notify_ready(status: str) -> bool:
    """The service serves from now on; `status` says how (one line)."""
    return notify("READY=1", _status(status))


def notify_status(status: str) -> bool:
    """A state change worth showing in `systemctl status`."""
    return notify(_status(status))


def notify_stopping(status: str = "stopping") -> bool:
    """The service is stopping: finishing work in flight, then exiting."""
    return notify("STOPPING=1", _status(status))


def watchdog_period(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings, or None when no watchdog is armed.

    The manager arms it with $WATCHDOG_USEC (its timeout) and, optionally,
    $WATCHDOG_PID (the process it is meant for). Pinging at half the
    timeout leaves a whole half for one late wake-up.
    """
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid is not None and pid != str(os.getpid()):
        return None
    return int(usec) / 2_000_000


async def keep_watchdog_fed(sleep: Callable[[float], Awaitable[object]]) -> None:
    """Ping the watchdog forever (returns at once when none is armed).

    Run it as a task of the service's event loop, with that loop's sleep: a
    loop that stops running stops the pings, and the manager restarts it.
    """
    period = watchdog_period()
    if period is None:
        return
    while True:
        notify("WATCHDOG=1", wait=False)
        await sleep(period)
