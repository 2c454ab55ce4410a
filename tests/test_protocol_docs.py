"""docs/protocol.md's tables say what csnap_protocol and csnapd say: every
message and its fields with their wire types, who sends it, the records,
the error codes, the constants, the states, the roles and csnapd's limits.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator, Mapping

import pytest

from csnap_agent import agent as csnap_agent
from csnap_protocol import (
    DEFAULT_MAX_FRAME,
    MESSAGES,
    MIN_MAX_FRAME,
    ConnectionState,
    ErrorCode,
    Role,
    messages,
)
from csnap_protocol.schema import Blob, Choice, ListOf, Nullable, Record, Spec, Text
from csnapd.cli import _parser as csnapd_parser
from csnapd.server import OUTBOX_LIMIT, QUEUED_DATA_LIMIT, QUEUED_LIMIT, ServerConfig
from tests.docs_tables import doc_lines, marked_table, marked_table_list, marker_of

DOC = "protocol.md"

MESSAGE_TABLES = marked_table_list(DOC, "message")
RECORD_TABLES = marked_table_list(DOC, "record")

#: Constants the document must quote, with their values in the code.
REQUIRED_CONSTANTS: dict[str, object] = {
    "PROTOCOL_MAGIC": messages.PROTOCOL_MAGIC,
    "PROTOCOL_VERSION": messages.PROTOCOL_VERSION,
    "MAX_RANGES": messages.MAX_RANGES,
    "DEFAULT_MAX_FRAME": DEFAULT_MAX_FRAME,
    "MIN_MAX_FRAME": MIN_MAX_FRAME,
    "MAX_WRITE_DATA": messages.MAX_WRITE_DATA,
}
#: Constants it may quote besides.
OTHER_CONSTANTS: dict[str, object] = {"MAX_LIST": messages.MAX_LIST}

#: csnapd limits the "Limits" table must give, with their defaults.
_CONFIG_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ServerConfig)}
#: Every ServerConfig field is a limit the doc must list, except these.
_NOT_LIMITS = {
    "store",
    "origin",
    "host",
    "port",
    "cache_bytes",
    "agent",
    "space",
    "credentials",
    "direct",
}
LIMITS: dict[str, object] = {
    name: default for name, default in _CONFIG_DEFAULTS.items() if name not in _NOT_LIMITS
}
LIMITS["OUTBOX_LIMIT"] = OUTBOX_LIMIT
LIMITS["QUEUED_LIMIT"] = QUEUED_LIMIT
LIMITS["QUEUED_DATA_LIMIT"] = QUEUED_DATA_LIMIT
#: The agent's limits, for the "agent_limits" table.
AGENT_LIMITS = {
    name: getattr(csnap_agent, name)
    for name in ("MAX_IN_FLIGHT", "MAX_FRAME", "MAX_CONNECTIONS", "HELLO_TIMEOUT")
}

_GENERIC_TYPES = {"T or nil", "array of T"}


def _name(cell: str) -> str:
    return cell.strip().strip("`")


def _keys(tables: list[tuple[str | None, list[list[str]]]]) -> list[str | None]:
    return [key for key, _ in tables]


def _table(tables: list[tuple[str | None, list[list[str]]]], key: str) -> list[list[str]]:
    found = [rows for name, rows in tables if name == key]
    assert len(found) == 1, f"{len(found)} tables for {key!r} in {DOC}"
    return found[0]


def _records() -> dict[str, Record]:
    """Every Record spec a message field holds, by its wire name."""
    out: dict[str, Record] = {}

    def visit(spec: Spec) -> None:
        if isinstance(spec, Nullable | ListOf):
            visit(spec.inner)
        elif isinstance(spec, Record):
            out[spec.name] = spec
            for inner in spec.fields.values():
                visit(inner)

    for cls in MESSAGES.values():
        for spec in cls.FIELDS.values():
            visit(spec)
    return out


def _check_fields(what: str, rows: list[list[str]], specs: Mapping[str, Spec]) -> None:
    """A field table lists exactly these fields, in order, with their wire types."""
    assert all(len(row) == 3 for row in rows), f"{what}: rows need field, type, meaning"
    documented = [(_name(row[0]), row[1]) for row in rows]
    declared = [(name, spec.wire()) for name, spec in specs.items()]
    assert documented == declared, what
    for row in rows:
        assert row[2], f"{what}.{_name(row[0])}: no meaning written"
        spec = specs[_name(row[0])]
        if isinstance(spec, Nullable):
            spec = spec.inner
        where = f"{what}.{_name(row[0])}"
        if isinstance(spec, Text):
            assert f"at most {spec.max_length} characters" in row[2], where
        if isinstance(spec, Choice):
            for value in spec.values:
                assert f"`{value}`" in row[2], f"{where}: {value!r} not named"
        if isinstance(spec, Blob):
            assert f"{spec.length}-byte" in row[2], where


def _sections() -> Iterator[list[str]]:
    """The lines of each `###` section of the document."""
    section: list[str] = []
    for line in doc_lines(DOC):
        if line.startswith("#"):
            yield section
            section = []
        section.append(line)
    yield section


def _senders_by_section() -> dict[str, list[set[str]]]:
    """For each message section: the roles of its "Sent by:" lines."""
    out: dict[str, list[set[str]]] = {}
    for section in _sections():
        markers = [m for line in section if (m := marker_of(line)) and m[0] == "message"]
        if not markers:
            continue
        assert len(markers) == 1, f"one message table per section: {section[0]}"
        key = markers[0][1]
        assert key is not None
        out[key] = [
            _roles(line.removeprefix("Sent by:")) for line in section if line.startswith("Sent by:")
        ]
    return out


def _roles(text: str) -> set[str]:
    return {word.strip().strip("`") for word in text.strip().rstrip(".").split(",")}


def _senders(type_name: str) -> set[str]:
    return {role.value for role in MESSAGES[type_name].SENDERS}


# -- messages ------------------------------------------------------------------


def test_every_message_has_exactly_one_table() -> None:
    keys = _keys(MESSAGE_TABLES)
    assert len(keys) == len(set(keys)), "a message has two tables"
    assert set(keys) == set(MESSAGES)


@pytest.mark.parametrize("type_name", sorted(MESSAGES))
def test_message_table_matches_fields(type_name: str) -> None:
    rows = _table(MESSAGE_TABLES, type_name)
    _check_fields(type_name, rows, MESSAGES[type_name].FIELDS)


@pytest.mark.parametrize("type_name", sorted(MESSAGES))
def test_message_section_names_its_senders(type_name: str) -> None:
    sections = _senders_by_section()
    assert type_name in sections, f"{type_name}: no section"
    assert sections[type_name] == [_senders(type_name)], type_name


def test_catalogue_lists_every_message_with_its_senders() -> None:
    rows = marked_table(DOC, "messages")
    names = [_name(row[0]) for row in rows]
    assert len(names) == len(set(names)), "a message is listed twice"
    assert set(names) == set(MESSAGES)
    for row in rows:
        assert _roles(row[1]) == _senders(_name(row[0])), _name(row[0])


# -- records and types -----------------------------------------------------------


def test_every_record_has_exactly_one_table() -> None:
    keys = _keys(RECORD_TABLES)
    assert len(keys) == len(set(keys)), "a record has two tables"
    assert set(keys) == set(_records())


@pytest.mark.parametrize("name", sorted(_records()))
def test_record_table_matches_fields(name: str) -> None:
    _check_fields(f"record {name}", _table(RECORD_TABLES, name), _records()[name].fields)


def _base_type(wire: str) -> str:
    wire = wire.removesuffix(" or nil")
    return wire.removeprefix("array of ")


def test_types_table_names_exactly_the_types_used() -> None:
    used = {
        _base_type(row[1])
        for _, rows in MESSAGE_TABLES + RECORD_TABLES
        for row in rows
        if len(row) > 1
    }
    documented = [_name(row[0]) for row in marked_table(DOC, "types")]
    assert len(documented) == len(set(documented))
    assert set(documented) == used | _GENERIC_TYPES
    assert all(row[2] for row in marked_table(DOC, "types"))


# -- errors, constants, states, roles, limits -----------------------------------


def test_error_table_lists_every_code() -> None:
    rows = marked_table(DOC, "errors")
    documented = [(int(row[0]), _name(row[1])) for row in rows]
    assert documented == [(int(code), code.symbol) for code in ErrorCode]
    for row in rows:
        assert len(row) == 5, row
        scopes = {word.strip() for word in row[2].split(";")}
        assert scopes <= {"request", "connection", "refusal", "reserved"}, row[1]
        assert row[3] and row[4], f"{row[1]}: when and what to do must be written"


def test_constants_match_the_code() -> None:
    rows = marked_table(DOC, "constants")
    known = REQUIRED_CONSTANTS | OTHER_CONSTANTS
    documented = {_name(row[0]): _name(row[1]) for row in rows}
    assert set(REQUIRED_CONSTANTS) <= set(documented)
    assert set(documented) <= set(known)
    for name, text in documented.items():
        value = known[name]
        assert (text if isinstance(value, str) else int(text)) == value, name


def test_states_are_the_codecs() -> None:
    rows = marked_table(DOC, "states")
    assert [_name(row[0]) for row in rows] == [state.value for state in ConnectionState]


def test_roles_are_the_protocols() -> None:
    rows = marked_table(DOC, "roles")
    assert [_name(row[0]) for row in rows] == [role.value for role in Role]


def test_limits_match_csnapd() -> None:
    rows = marked_table(DOC, "limits")
    documented = {_name(row[0]): row for row in rows}
    assert set(documented) == set(LIMITS)
    usage = csnapd_parser().format_help()
    for name, default in LIMITS.items():
        row = documented[name]
        assert isinstance(default, int | float)
        assert float(row[1]) == float(default), name
        option = _name(row[2])
        if option != "—":
            assert re.search(rf"(^|\s){re.escape(option)}\b", usage), f"{name}: {option}"
        assert row[3] and row[4], f"{name}: bounds and effect must be written"


def test_agent_limits_match_the_agent() -> None:
    rows = marked_table(DOC, "agent_limits")
    documented = {_name(row[0]): int(row[1]) for row in rows}
    assert documented == AGENT_LIMITS
    assert all(row[2] and row[3] for row in rows)
