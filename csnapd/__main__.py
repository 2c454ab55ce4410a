"""python -m csnapd: the metadata server."""

from __future__ import annotations

from csnapd.cli import run

run()
