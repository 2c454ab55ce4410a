"""The speed targets csnap is held to, checked against one run's figures.

Each target reads one figure of one part (docs/performance.md says where the
targets come from): the nbd part's ratios against qemu-nbd + qcow2 and
nbdkit file in the same run, and csnapd's own rates and fsync counts from
the server part. `evaluate` turns the figures of whatever parts ran into
rows: the goal, what was measured, how far along the goal it is, and whether
it was reached; where the part keeps the figure per round, the lowest and
highest round and how many rounds reached the goal (on a shared machine the
rounds of one run spread widely, and the median alone hides it); a target
whose part did not run is "not measured". The peak
memory of the gateway and of csnapd have no figure to reach: they are
reported beside the targets. python -m bench prints the rows after the parts
and writes them to its JSON under "targets".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bench.common import table

__all__ = ["TARGETS", "Target", "evaluate", "targets_table"]


@dataclass(frozen=True)
class Target:
    """A figure of a part that must reach `goal` (or stay at or below it)."""

    name: str
    part: str
    #: Keys from the part's figures down to the number.
    figure: tuple[str, ...]
    goal: float
    #: How the number reads: "ratio" (times a peer), "per_s", "replies_per_fsync",
    #: "fsyncs_per_reply".
    unit: str
    at_most: bool = False
    #: Keys down to the figure's value in each round, where the part keeps
    #: them: how the rounds spread around the median, and how many of them
    #: reached the goal.
    rounds: tuple[str, ...] | None = None


def _against_peer(name: str, peer: str, phase: str, goal: float) -> Target:
    """A ratio of the nbd part: csnap's median over the peer's in one phase."""
    return Target(
        name, "nbd", ("ratios", peer, phase), goal, "ratio", rounds=("round_ratios", peer, phase)
    )


TARGETS: tuple[Target, ...] = (
    _against_peer("rewrites vs qemu-nbd + qcow2", "qcow2", "rewrite", 1.0),
    _against_peer("rewrites vs nbdkit file", "file", "rewrite", 0.5),
    _against_peer("snapshot 4 KiB reads vs qcow2", "qcow2", "snapshot_read", 1.0),
    _against_peer("backup of a whole snapshot vs qcow2", "qcow2", "backup", 1.0),
    _against_peer("backup, half in the store, vs qcow2", "qcow2", "backup_half", 1.0),
    _against_peer("first writes (durable) vs qcow2", "qcow2", "first_write", 2.0),
    Target(
        "csnapd already-unique checks, 8 clients",
        "server",
        ("origin_write_unique_8_clients", "server_requests_per_s"),
        20_000,
        "per_s",
        rounds=("origin_write_unique_8_clients", "round_server_requests_per_s"),
    ),
    Target(
        "csnapd copy-outs, 8 clients",
        "server",
        ("origin_write_copy_8_clients", "chunks_per_s"),
        5_000,
        "per_s",
        rounds=("origin_write_copy_8_clients", "round_chunks_per_s"),
    ),
    Target(
        "csnapd replies per fsync, 8 clients",
        "server",
        ("origin_write_copy_8_clients", "replies_per_fsync"),
        10,
        "replies_per_fsync",
    ),
    Target(
        "fsyncs per origin copy-out, 1 client",
        "server",
        ("origin_write_copy_1_clients", "fsyncs_per_reply"),
        1.0,
        "fsyncs_per_reply",
        at_most=True,
    ),
    Target(
        "fsyncs per snapshot write that copies, 1 client",
        "server",
        ("snapshot_write_1_clients", "fsyncs_per_reply"),
        1.0,
        "fsyncs_per_reply",
        at_most=True,
    ),
    Target(
        "fsyncs per small snapshot write with its data, 1 client",
        "server",
        ("snapshot_write_data_1_clients", "fsyncs_per_reply"),
        1.0,
        "fsyncs_per_reply",
        at_most=True,
    ),
)

#: Reported beside the targets: (label, part, keys to the peak in KiB).
MEMORY: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("csnap-nbd peak RSS, nbd part", "nbd", ("csnap", "peak_rss_kib", "csnap-nbd", "max")),
    ("csnapd peak RSS, nbd part", "nbd", ("csnap", "peak_rss_kib", "csnapd", "max")),
    ("csnapd peak RSS, server part", "server", ("csnapd_peak_rss_kib",)),
)


def _walk(figures: Mapping[str, Any], keys: Sequence[str]) -> Any:
    """What lies under `keys`, or None where a key is missing."""
    value: Any = figures
    for key in keys:
        if not isinstance(value, Mapping) or key not in value:
            return None
        value = value[key]
    return value


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _lookup(figures: Mapping[str, Any], keys: Sequence[str]) -> float | None:
    value = _walk(figures, keys)
    return float(value) if _number(value) else None


def _lookup_rounds(figures: Mapping[str, Any], keys: Sequence[str] | None) -> list[float] | None:
    """The per-round values under `keys`, those a round could not give left out."""
    value = None if keys is None else _walk(figures, keys)
    if not isinstance(value, Sequence) or isinstance(value, str):
        return None
    rounds = [float(v) for v in value if _number(v)]
    return rounds or None


def _reaches(value: float, target: Target) -> bool:
    return value <= target.goal if target.at_most else value >= target.goal


def _rounds_shown(rounds: list[float] | None, reached: int | None, unit: str) -> str:
    """'lowest to highest, k of n': the spread of a figure's rounds."""
    if rounds is None or reached is None:
        return "-"
    low, high = _format(min(rounds), unit), _format(max(rounds), unit)
    return f"{low} to {high}, {reached} of {len(rounds)}"


#: Decimals each unit is shown with.
_DECIMALS = {"ratio": 2, "per_s": 0, "replies_per_fsync": 1, "fsyncs_per_reply": 3}


def _format(value: float, unit: str, extra: int = 0) -> str:
    digits = _DECIMALS.get(unit, 3) + extra
    if unit == "ratio":
        return f"{value:.{digits}f}x"
    if unit == "per_s":
        return f"{value:,.{digits}f}/s"
    return f"{value:.{digits}f}"


def _shown(value: float, target: Target) -> str:
    """The figure as the table shows it; with more decimals when it would
    otherwise read as the goal itself without reaching it (1.9995x of 2x)."""
    unit = target.unit
    shown = _format(value, unit)
    if _reaches(value, target):
        return shown
    for extra in range(4):
        shown = _format(value, unit, extra)
        if shown != _format(target.goal, unit, extra):
            return shown
    return f"{shown} (short of {_format(target.goal, unit)})"


def evaluate(parts: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per target and per memory figure, from the figures of the
    parts that ran (a part that failed has only an "error")."""
    rows: list[dict[str, Any]] = []
    for target in TARGETS:
        figures = parts.get(target.part, {})
        measured = _lookup(figures, target.figure)
        if measured is None:
            reached, progress = None, None
        else:
            reached = _reaches(measured, target)
            if target.at_most:
                progress = target.goal / measured if measured else None
            else:
                progress = measured / target.goal
        rounds = _lookup_rounds(figures, target.rounds) if measured is not None else None
        rounds_reached = None if rounds is None else sum(_reaches(v, target) for v in rounds)
        rows.append(
            {
                "target": target.name,
                "goal": ("≤ " if target.at_most else "≥ ") + _format(target.goal, target.unit),
                "measured": measured,
                "shown": "not measured" if measured is None else _shown(measured, target),
                "of_goal": progress,
                "reached": reached,
                "rounds": rounds,
                "rounds_reached": rounds_reached,
                "rounds_shown": _rounds_shown(rounds, rounds_reached, target.unit),
            }
        )
    for label, part, keys in MEMORY:
        kib = _lookup(parts.get(part, {}), keys)
        rows.append(
            {
                "target": label,
                "goal": "bounded (reported)",
                "measured": kib,
                "shown": "not measured" if kib is None else f"{kib / 1024:.1f} MiB",
                "of_goal": None,
                "reached": None,
                "rounds": None,
                "rounds_reached": None,
                "rounds_shown": "-",
            }
        )
    return rows


def targets_table(rows: Sequence[Mapping[str, Any]], *, quick: bool) -> str:
    notes = [
        "one run's figures: the nbd part's ratios are against peers measured beside csnap",
        "rounds: the lowest and highest of the figure's rounds (a ratio: csnap's round over"
        " the peer's round of the same number), and how many reached the goal",
    ]
    if quick:
        notes.append("a --quick run: smoke-test sizes, not a measurement")
    body = [
        [
            row["target"],
            row["goal"],
            row["shown"],
            "" if row["of_goal"] is None else f"{row['of_goal']:.0%}",
            {True: "yes", False: "no", None: "-"}[row["reached"]],
            row["rounds_shown"],
        ]
        for row in rows
    ]
    return table(["target", "goal", "measured", "of goal", "reached", "rounds"], body, notes=notes)
