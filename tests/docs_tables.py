# Read the Markdown tables of docs/*.md that follow a `<!-- NAME: KEY -->` marker.
from __future__ import annotations

import re
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs"

_MARKER = re.compile(r"<!--\s*(\w+):\s*([\w.:-]+)\s*-->")


def marked_tables(doc: str, marker: str) -> dict[str, list[list[str]]]:
    """Tables of `doc` that follow `<!-- marker: KEY -->`, by KEY.

    Each table is a list of rows (header and separator removed), each row a
    list of stripped cell texts.
    """
    lines = (DOCS / doc).read_text().splitlines()
    tables: dict[str, list[list[str]]] = {}
    for number, line in enumerate(lines):
        match = _MARKER.fullmatch(line.strip())
        if not match or match.group(1) != marker:
            continue
        rows = []
        for body in lines[number + 1 :]:
            if not body.startswith("|"):
                break
            rows.append([cell.strip() for cell in body.strip().strip("|").split("|")])
        tables[match.group(2)] = rows[2:]
    return tables
