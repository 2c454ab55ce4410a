"""The two parts scripts/test runs the suite in: the in-process unit tests,
under branch coverage, then everything else.

CSNAP_TEST_PART=unit keeps only the unit part: the tests of csnap_format,
csnapd.engine and csnap_protocol (tests/format, tests/engine,
tests/protocol) not marked slow, which run in seconds on small stores.
CSNAP_TEST_PART=rest keeps everything else. Unset, every test runs, as
always. Measuring coverage slows the code it traces about threefold, so only
the fast unit part is traced; between them the two parts run every test once.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

#: The directories of the unit part.
UNIT_DIRECTORIES = ("format", "engine", "protocol")


def _in_unit_part(item: pytest.Item) -> bool:
    try:
        top = item.path.resolve().relative_to(TESTS).parts[0]
    except ValueError:
        return False
    return top in UNIT_DIRECTORIES and item.get_closest_marker("slow") is None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    part = os.environ.get("CSNAP_TEST_PART")
    if not part:
        return
    if part not in ("unit", "rest"):
        raise pytest.UsageError(f"CSNAP_TEST_PART is unit or rest, not {part!r}")
    wanted = part == "unit"
    kept = [item for item in items if _in_unit_part(item) == wanted]
    dropped = [item for item in items if _in_unit_part(item) != wanted]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    items[:] = kept
