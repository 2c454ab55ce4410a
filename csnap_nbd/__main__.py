"""python -m csnap_nbd: the same as the csnap-nbd command."""

from __future__ import annotations

from csnap_nbd.cli import run

run()
