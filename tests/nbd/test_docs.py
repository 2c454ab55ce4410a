"""docs/nbd.md's tables say what the gateway does: the options it answers,
the commands it serves, its metadata contexts and its limits.
"""

from __future__ import annotations

from csnap_nbd.datapath import STATUS_PIECES
from csnap_nbd.negotiation import _HANDLERS
from csnap_nbd.settings import Settings
from csnap_nbd.wire import transmission as tx
from csnap_nbd.wire.constants import Command, Option
from csnap_nbd.wire.contexts import CONTEXTS
from tests.docs_tables import doc_lines, marked_tables

DOC = "nbd.md"
TABLES = marked_tables(DOC, "nbd")


def _names_numbers(rows: list[list[str]]) -> list[tuple[str, int]]:
    return [(row[0].strip("`"), int(row[1])) for row in rows]


def test_options_table_lists_every_option_answered() -> None:
    documented = _names_numbers(TABLES["options"])
    handled = [(f"NBD_OPT_{Option(o).name}", int(o)) for o in sorted(_HANDLERS)]
    assert documented == handled


def test_commands_table_lists_every_command_served() -> None:
    documented = _names_numbers(TABLES["commands"])
    served = [
        (f"NBD_CMD_{Command(c).name}", int(c))
        for c in sorted(tx._COMMAND_FLAGS)  # the table the checks use
    ]
    assert documented == served
    assert all(row[2] and row[3] for row in TABLES["commands"])


def test_contexts_table() -> None:
    documented = [(row[0].strip("`"), int(row[1])) for row in TABLES["contexts"]]
    assert documented == [(c.name, c.id) for c in CONTEXTS]


def test_limits_table_matches_the_defaults() -> None:
    limits = {row[0].partition(" (")[0]: row[1] for row in TABLES["limits"]}
    defaults = Settings()
    mib = 1 << 20
    assert limits["read or write payload"] == f"{defaults.max_payload // mib} MiB"
    assert limits["data held per connection"] == f"{defaults.connection_budget // mib} MiB"
    assert limits["requests in flight per connection"] == str(defaults.max_in_flight)
    assert limits["option data"] == f"{defaults.max_option >> 10} KiB"
    assert limits["option data or write payload skipped"] == f"{defaults.max_drain // mib} MiB"
    handshake = limits["time from connecting to choosing an export"]
    assert handshake == f"{defaults.handshake_timeout:g} s"
    assert any(
        f"at most {STATUS_PIECES} \N{MULTIPLICATION SIGN} `max_chunks`" in line
        for line in doc_lines(DOC)
    )
