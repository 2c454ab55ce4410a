"""Read the Markdown tables of docs/*.md that follow a `<!-- NAME: KEY -->` or
`<!-- NAME -->` marker.
"""

from __future__ import annotations

import re
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs"

_MARKER = re.compile(r"<!--\s*(\w+)(?::\s*([\w.:-]+))?\s*-->")


def doc_lines(doc: str) -> list[str]:
    """The lines of docs/`doc`."""
    return (DOCS / doc).read_text().splitlines()


def marker_of(line: str) -> tuple[str, str | None] | None:
    """(NAME, KEY or None) if `line` is a table marker, else None."""
    match = _MARKER.fullmatch(line.strip())
    if not match:
        return None
    return match.group(1), match.group(2)


def _table_after(lines: list[str], number: int) -> list[list[str]]:
    rows = []
    for body in lines[number + 1 :]:
        if not body.startswith("|"):
            break
        rows.append([cell.strip() for cell in body.strip().strip("|").split("|")])
    return rows[2:]


def marked_table_list(doc: str, marker: str) -> list[tuple[str | None, list[list[str]]]]:
    """Every table of `doc` after a `marker` marker, in order, with its KEY (None if unkeyed).

    Each table is a list of rows (header and separator removed), each row a
    list of stripped cell texts.
    """
    lines = doc_lines(doc)
    out = []
    for number, line in enumerate(lines):
        found = marker_of(line)
        if found is not None and found[0] == marker:
            out.append((found[1], _table_after(lines, number)))
    return out


def marked_tables(doc: str, marker: str) -> dict[str, list[list[str]]]:
    """Tables of `doc` that follow `<!-- marker: KEY -->`, by KEY.

    Each table is a list of rows (header and separator removed), each row a
    list of stripped cell texts.
    """
    return {key: rows for key, rows in marked_table_list(doc, marker) if key is not None}


def marked_table(doc: str, marker: str) -> list[list[str]]:
    """The one table of `doc` that follows `<!-- marker -->` (no KEY)."""
    tables = [rows for key, rows in marked_table_list(doc, marker) if key is None]
    if len(tables) != 1:
        raise LookupError(f"{doc}: {len(tables)} tables marked <!-- {marker} -->, expected 1")
    return tables[0]
