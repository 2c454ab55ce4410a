"""The two parts scripts/test runs the suite in: the in-process unit tests,
under branch coverage, then everything else.

CSNAP_TEST_PART=unit keeps only the unit part: the tests of csnap_format,
csnapd.engine and csnap_protocol (tests/format, tests/engine,
tests/protocol) not marked slow, which run in seconds on small stores, and
the checker's in-process damage tests (UNIT_FILES), the only ones that
reach its salvage paths.
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
#: Files of other directories in the unit part: in process, on memory devices.
UNIT_FILES = (
    "crash/test_corruption.py",
    "crash/test_lost_marks.py",
    "crash/test_salvage_sources.py",
)


def _in_unit_part(item: pytest.Item) -> bool:
    try:
        parts = item.path.resolve().relative_to(TESTS).parts
    except ValueError:
        return False
    unit = parts[0] in UNIT_DIRECTORIES or "/".join(parts) in UNIT_FILES
    return unit and item.get_closest_marker("slow") is None


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
