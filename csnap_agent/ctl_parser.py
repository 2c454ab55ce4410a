"""The csnap command line's arguments: the verbs, their options and the
types that check each value before anything is sent.

Owns the parser `csnap_agent.ctl` runs, grouped by what the verbs act on:
the options every verb takes, the snapshot verbs, the server verbs and
`keys`; the delta verbs (csnap_delta.cli) and `resize`
(csnap_agent.resize_cli) add their own.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path

from csnap_agent import resize_cli
from csnap_agent.resize_cli import VerbMaker
from csnap_common.credentials import ROLES
from csnap_delta import cli as delta_cli

__all__ = ["parser"]

_EPILOG = """\
verbs (csnap VERB --help for each):
  create TAG [--priority N]   take a snapshot of the origin now
  delete TAG                  delete a snapshot (space is reclaimed in the background)
  revert TAG                  make the origin's content equal to snapshot TAG's
  list                        live and squashed snapshots, oldest first
  status [TAG]                store size and free space, and every snapshot
  priority TAG N              set a snapshot's priority (-128..127)
  usecount TAG [DELTA]        read, or add DELTA to, a snapshot's use count
  server                      the active server (where, node, token, clients), the standbys
  shutdown                    stop the server cleanly (the store is marked clean)
  resize --origin-size SIZE --store-size SIZE
                              grow the origin and/or the store online
  delta FROM TO -o FILE       write the chunks that differ between two snapshots
  apply FILE --to TARGET      apply a delta to a raw image of its FROM snapshot
  receive FILE                receive a delta into this store: creates snapshot TO
  receive --listen HOST:PORT  receive one delta from `csnap send`
  send FROM TO --to HOST:PORT send a delta to a receiving store (resumable)
  keys DIR [--role ROLE]      make a cluster CA and credentials in DIR (no agent needed)

examples:
  csnap create 7 --priority 10
  csnap revert 7
  csnap --json list
  csnap --agent /run/csnap/agent.sock status
  csnap keys /etc/csnap/keys

exit status: 0 done, 1 refused by the server (snapshot exists, 64 snapshots
live, use count not zero, store full, unsafe shrink, ...), 2 bad usage, 3 no such snapshot,
4 the agent or the server could not be reached or did not answer in time.
"""


def _decimal(text: str, *, signed: bool) -> int | None:
    """`text` as a plain decimal number, or None: ASCII digits only (and a
    leading sign when `signed`); no spaces, no 0x, no underscores."""
    digits = text[1:] if signed and text[:1] in ("+", "-") else text
    if not (digits.isascii() and digits.isdigit()) or len(digits) > 20:
        return None
    return int(text)


def _tag(text: str) -> int:
    value = _decimal(text, signed=False)
    if value is None:
        raise argparse.ArgumentTypeError(f"a tag is a decimal number, got {text!r}")
    if not 0 <= value <= 0xFFFF_FFFF:
        raise argparse.ArgumentTypeError(f"a tag is 0..4294967295, got {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"a timeout is a number of seconds, got {text!r}"
        ) from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"a timeout is a positive number of seconds, got {text}")
    return value


def _ranged(low: int, high: int, what: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = _decimal(text, signed=True)
        if value is None:
            raise argparse.ArgumentTypeError(f"{what} is a decimal number, got {text!r}")
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{what} is {low}..{high}, got {value}")
        return value

    return parse


_priority = _ranged(-128, 127, "a priority")
_delta = _ranged(-(1 << 31), (1 << 31) - 1, "a delta")


def _common_options() -> argparse.ArgumentParser:
    """The options every verb takes (before or after the verb)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--agent",
        default=argparse.SUPPRESS,
        metavar="PATH",
        help="the agent's socket, a path or @name (default $CSNAP_AGENT or @csnap-agent)",
    )
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON")
    common.add_argument(
        "--timeout",
        type=_seconds,
        default=argparse.SUPPRESS,
        metavar="SECONDS",
        help="give up after this long (default 120)",
    )
    return common


def _snapshot_verbs(verb: VerbMaker) -> None:
    """Declare the verbs that act on snapshots."""
    create = verb(
        "create",
        "Take a snapshot of the origin now. Origin writes already granted finish first,"
        " so the snapshot is exactly the origin at this moment.",
        "csnap create 7 --priority 10",
    )
    create.add_argument("tag", type=_tag, help="the new snapshot's tag (a number)")
    create.add_argument("--priority", type=_priority, default=0, help="-128..127 (default 0)")
    delete = verb(
        "delete",
        "Delete a snapshot. Its tag is gone at once; its space is reclaimed in the"
        " background. Refused while its use count is not zero.",
        "csnap delete 7",
    )
    delete.add_argument("tag", type=_tag)
    revert = verb(
        "revert",
        "Make the origin's content equal to snapshot TAG's, online. Origin writes already"
        " granted finish first, and origin writes wait until the revert is done; every other"
        " snapshot keeps its content and TAG survives. Waits for the end, showing progress on"
        " a terminal (no time limit unless --timeout); with --no-wait, returns once started"
        " (csnap status shows how far it is).",
        "csnap revert 7",
    )
    revert.add_argument("tag", type=_tag)
    revert.add_argument("--no-wait", action="store_true", help="return once the revert has started")
    verb("list", "List live snapshots, oldest first.", "csnap list --json")
    status = verb(
        "status",
        "Store size and free space, and per snapshot: creation time, priority, use count,"
        " state, chunks it owns alone and chunks it shares. With TAG, that snapshot only.",
        "csnap status 7",
    )
    status.add_argument("tag", type=_tag, nargs="?")
    priority = verb("priority", "Set a snapshot's priority (-128..127).", "csnap priority 7 -5")
    priority.add_argument("tag", type=_tag)
    priority.add_argument("priority", type=_priority)
    usecount = verb(
        "usecount",
        "Show a snapshot's use count, or add DELTA to it. A snapshot in use cannot be deleted.",
        "csnap usecount 7 +1",
    )
    usecount.add_argument("tag", type=_tag)
    usecount.add_argument("delta", type=_delta, nargs="?", default=0)


def _server_verbs(verb: VerbMaker) -> None:
    """Declare the verbs that ask about or stop the server."""
    verb(
        "server",
        "Where the active server listens, since when, its node, fencing token, state and"
        " clients, and the servers standing by to take over.",
        "csnap server",
    )
    verb(
        "shutdown",
        "Stop the server: work in flight finishes and the store is marked clean.",
        "csnap shutdown",
    )


def _keys_verb(verb: VerbMaker) -> None:
    """Declare `csnap keys`, which needs no agent."""
    keys = verb(
        "keys",
        "Make credentials in DIR: the cluster CA (ca-cert.pem, ca-key.pem) when DIR has"
        " none, then a new credential for each ROLE (ROLE-cert.pem, ROLE-key.pem; all"
        " three by default), replacing what is there. Files are mode 0600, DIR 0700."
        " server: csnapd's; admin: may do everything (csnap-agent's); client: I/O and"
        " read-only queries (csnap-nbd's).",
        "csnap keys /etc/csnap/keys --role client",
    )
    keys.add_argument("directory", type=Path, metavar="DIR")
    keys.add_argument("--role", action="append", choices=ROLES, help="repeatable")
    keys.add_argument(
        "--days", type=_ranged(1, 36500, "days"), default=825, help="validity (default 825)"
    )


def parser() -> argparse.ArgumentParser:
    """The csnap command line's parser, every verb declared."""
    common = _common_options()
    parser = argparse.ArgumentParser(
        prog="csnap",
        description="Create, delete and inspect csnap snapshots through the node's agent.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common],
    )
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    def verb(name: str, summary: str, example: str) -> argparse.ArgumentParser:
        return verbs.add_parser(
            name,
            help=summary,
            description=summary,
            epilog=f"example:\n  {example}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
            parents=[common],
        )

    _snapshot_verbs(verb)
    _server_verbs(verb)
    delta_cli.add_verbs(verb, _tag)
    resize_cli.add_verb(verb)
    _keys_verb(verb)
    return parser
