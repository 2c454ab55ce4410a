"""csnap_common.systemd: what every csnap service tells, and takes from, the
service manager: readiness, status, stopping and watchdog pings over
$NOTIFY_SOCKET (notify), and listening sockets handed over by socket
activation (activation). Without systemd every call here does nothing.
See "Running under systemd" in docs/operations.md.
"""

from __future__ import annotations

from csnap_common.systemd.activation import ActivationError, listen_sockets
from csnap_common.systemd.notify import (
    keep_watchdog_fed,
    notify,
    notify_ready,
    notify_status,
    notify_stopping,
    watchdog_period,
)

__all__ = [
    "ActivationError",
    "listen_sockets",
    "keep_watchdog_fed",
    "notify",
    "notify_ready",
    "notify_status",
    "notify_stopping",
    "watchdog_period",
]
