"""csnap_nbd: the NBD gateway (csnap-nbd).

Exports the origin and every live snapshot over NBD for qemu, libnbd tools
and the Linux nbd driver. csnap_nbd.wire is the protocol as bytes (sans-IO);
the rest is the trio transport: the handshake (negotiation), the
transmission phase (commands), the data path of each export (datapath,
backing, geometry), the shared csnapd clients (exports) and the process
(server, cli). docs/nbd.md describes what it serves.
"""

from __future__ import annotations

from csnap_nbd.server import GatewayConfig, GatewayStartError, serve
from csnap_nbd.settings import Settings

__all__ = ["GatewayConfig", "GatewayStartError", "Settings", "serve"]
