"""docs/format.md's field tables say what the construct layouts say."""

from __future__ import annotations

import pytest

from csnap_format import layouts
from tests.docs_tables import marked_tables

FORMAT_TABLES = marked_tables("format.md", "layout")


def test_every_layout_is_documented() -> None:
    declared = {name for name in layouts.__all__ if name.isupper()}
    assert declared == set(FORMAT_TABLES)


@pytest.mark.parametrize("name", sorted(FORMAT_TABLES))
def test_format_table_matches_layout(name: str) -> None:
    documented = [(int(r[0]), int(r[1]), r[2], r[3]) for r in FORMAT_TABLES[name]]
    declared = [
        (row.offset, row.size, row.type, row.name)
        for row in layouts.field_rows(getattr(layouts, name))
    ]
    assert documented == declared
    assert all(r[4] for r in FORMAT_TABLES[name]), f"{name}: a field has no meaning written"
