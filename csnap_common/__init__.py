"""csnap_common: small stdlib-only helpers shared by every layer's command-line
tools: human sizes ("64M"), addresses ("host:port", "@abstract") and a
progress bar for long work, and single_errors() to let one failure out of a
nursery as itself; log formats (logs) and the systemd interfaces (systemd).
Nothing here knows about the store, the protocol or trio.
"""

from __future__ import annotations

from csnap_common.addresses import AddressError, join_host_port, split_host_port, unix_address
from csnap_common.errors import single_errors
from csnap_common.progress import Progress
from csnap_common.sizes import SizeError, format_size, parse_size

__all__ = [
    "AddressError",
    "join_host_port",
    "split_host_port",
    "unix_address",
    "Progress",
    "single_errors",
    "SizeError",
    "format_size",
    "parse_size",
]
