"""Every module of the packages stays small enough to hold one concern, and
every function short enough to read at once (docs/layers.md, "Size").

A function's length counts its lines of code: blank lines, comment lines and
its docstring do not count, so explaining why costs nothing. Functions that
were longer when the limit came are listed in LONG_FUNCTIONS with their
length then; each may only shrink, and leaves the list once it fits.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PACKAGES = (
    "csnap_agent",
    "csnap_client",
    "csnap_common",
    "csnap_delta",
    "csnap_format",
    "csnap_nbd",
    "csnap_protocol",
    "csnap_transport",
    "csnapd",
)

#: Most lines of code in one function.
FUNCTION_LINES = 50
#: Most lines in one module, everything counted.
MODULE_LINES = 550

#: Modules exempt from MODULE_LINES, and why.
LONG_MODULES = {
    "csnap_protocol/messages.py": "one declaration per message: it grows with the protocol",
}

#: Functions longer than FUNCTION_LINES when the limit came, with their length
#: then: "path::qualified name" -> lines of code. Shorten them, never lengthen.
LONG_FUNCTIONS: dict[str, int] = {}


def _modules() -> Iterator[Path]:
    for package in PACKAGES:
        yield from sorted((ROOT / package).rglob("*.py"))


def _code_lines(function: ast.FunctionDef | ast.AsyncFunctionDef, lines: list[str]) -> int:
    """Lines of `function` that hold code: not blank, not only a comment, not its docstring."""
    skip: set[int] = set()
    first = function.body[0]
    if (
        isinstance(first, ast.Expr)
        and isinstance(first.value, ast.Constant)
        and isinstance(first.value.value, str)
    ):
        skip = set(range(first.lineno, (first.end_lineno or first.lineno) + 1))
    end = function.end_lineno or function.lineno
    return sum(
        1
        for number in range(function.lineno, end + 1)
        if number not in skip and lines[number - 1].strip()[:1] not in ("", "#")
    )


def _functions(path: Path) -> Iterator[tuple[str, int]]:
    """(qualified name, lines of code) of every function and method in `path`."""
    text = path.read_text()
    lines = text.splitlines()

    def walk(node: ast.AST, prefix: str) -> Iterator[tuple[str, int]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                name = prefix + child.name
                yield name, _code_lines(child, lines)
                yield from walk(child, name + ".")
            elif isinstance(child, ast.ClassDef):
                yield from walk(child, prefix + child.name + ".")

    yield from walk(ast.parse(text, str(path)), "")


def _function_lengths() -> dict[str, int]:
    return {
        f"{path.relative_to(ROOT).as_posix()}::{name}": length
        for path in _modules()
        for name, length in _functions(path)
    }


def test_no_function_is_longer_than_the_limit() -> None:
    lengths = _function_lengths()
    too_long = {
        name: length
        for name, length in lengths.items()
        if length > FUNCTION_LINES and name not in LONG_FUNCTIONS
    }
    assert not too_long, f"functions over {FUNCTION_LINES} lines of code (split them): {too_long}"


def test_the_long_functions_only_shrink() -> None:
    lengths = _function_lengths()
    grown = {
        name: (LONG_FUNCTIONS[name], lengths[name])
        for name in LONG_FUNCTIONS
        if name in lengths and lengths[name] > LONG_FUNCTIONS[name]
    }
    assert not grown, f"listed long functions grew (listed, now): {grown}"
    fitting = [name for name in LONG_FUNCTIONS if lengths.get(name, 0) <= FUNCTION_LINES]
    assert not fitting, (
        f"these now fit in {FUNCTION_LINES} lines or are gone: take them off LONG_FUNCTIONS:"
        f" {fitting}"
    )


def test_no_module_is_longer_than_the_limit() -> None:
    lengths = {
        path.relative_to(ROOT).as_posix(): len(path.read_text().splitlines()) for path in _modules()
    }
    too_long = {
        name: length
        for name, length in lengths.items()
        if length > MODULE_LINES and name not in LONG_MODULES
    }
    assert not too_long, f"modules over {MODULE_LINES} lines (split them): {too_long}"
    # A listed module whose reason names its length may not grow past it.
    grown = {
        name: lengths.get(name, 0)
        for name, reason in LONG_MODULES.items()
        if reason.split(" ")[0].isdigit() and lengths.get(name, 0) > int(reason.split(" ")[0])
    }
    assert not grown, f"listed long modules grew: {grown}"


def test_the_measure_counts_code_only() -> None:
    source = '''
def f():
    """A docstring
    on two lines."""
    # a comment

    a = 1
    return a
'''
    tree = ast.parse(source)
    function = tree.body[0]
    assert isinstance(function, ast.FunctionDef)
    assert _code_lines(function, source.splitlines()) == 3
