"""csnapd: the csnap metadata server.

csnapd.engine is the synchronous store engine (no trio, no sockets); the
server modules around it are the thin trio transport. Importing csnapd
starts nothing.
"""

from __future__ import annotations
