# csnap_common: small stdlib-only helpers shared by every layer's command-line
# tools: human sizes ("64M") and a progress bar for long work. Nothing here
# knows about the store, the protocol or trio.
from __future__ import annotations

from csnap_common.progress import Progress
from csnap_common.sizes import SizeError, format_size, parse_size

__all__ = ["Progress", "SizeError", "format_size", "parse_size"]
