"""docs/rules.md names real modules, real tests and real sections of the docs."""

from __future__ import annotations

import re

from tests.docs_tables import DOCS, marked_table

ROOT = DOCS.parent
_CODE = re.compile(r"`([^`]+)`")
_SECTION = re.compile(r'(docs/\w+\.md), "([^"]+)"')


def _rows() -> list[list[str]]:
    return marked_table("rules.md", "rules")


def _headings(doc: str) -> set[str]:
    lines = (ROOT / doc).read_text().splitlines()
    return {line.lstrip("#").strip() for line in lines if line.startswith("#")}


def test_rules_have_distinct_names() -> None:
    names = [row[0] for row in _rows()]
    assert len(names) == len(set(names)) and len(names) >= 10


def test_every_keeper_module_exists() -> None:
    for name, _what, kept_by, _proved, _details in _rows():
        modules = _CODE.findall(kept_by)
        assert modules, f"rule {name!r} names no module"
        for module in modules:
            assert (ROOT / module).is_file(), f"rule {name!r}: no module {module}"


def test_every_proving_test_exists() -> None:
    for name, _what, _kept_by, proved, _details in _rows():
        tests = _CODE.findall(proved)
        assert tests, f"rule {name!r} names no test"
        for test in tests:
            path, _, function = test.partition("::")
            source = ROOT / path
            assert source.is_file(), f"rule {name!r}: no test file {path}"
            if function:
                found = re.search(
                    rf"^\s*(async )?def {re.escape(function)}\(", source.read_text(), re.M
                )
                assert found, f"rule {name!r}: no test {function} in {path}"


def test_every_cited_section_exists() -> None:
    for name, _what, _kept_by, _proved, details in _rows():
        sections = _SECTION.findall(details)
        assert sections, f"rule {name!r} cites no section of the docs"
        for doc, heading in sections:
            assert heading in _headings(doc), f"rule {name!r}: {doc} has no section {heading!r}"
