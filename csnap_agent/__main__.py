"""python -m csnap_agent: the node agent (see csnap_agent.cli)."""

from __future__ import annotations

from csnap_agent.cli import run

run()
