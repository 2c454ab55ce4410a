"""The speed targets csnap is held to, checked against one run's figures.

Each target reads one figure of one part (docs/performance.md says where the
targets come from): the nbd part's ratios against qemu-nbd + qcow2 and
nbdkit file in the same run, and csnapd's own rates and fsync counts from
the server part. `evaluate` turns the figures of whatever parts ran into
rows: the goal, what was measured, how far along the goal it is, and whether
it was reached; a target whose part did not run is "not measured". The peak
memory of the gateway and of csnapd have no figure to reach: they are
reported beside the targets. python -m bench prints the rows after the parts
and writes them to its JSON under "targets".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bench.common import fmt_ratio, table

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


TARGETS: tuple[Target, ...] = (
    Target("rewrites vs qemu-nbd + qcow2", "nbd", ("ratios", "qcow2", "rewrite"), 1.0, "ratio"),
    Target("rewrites vs nbdkit file", "nbd", ("ratios", "file", "rewrite"), 0.5, "ratio"),
    Target(
        "snapshot 4 KiB reads vs qcow2", "nbd", ("ratios", "qcow2", "snapshot_read"), 1.0, "ratio"
    ),
    Target(
        "backup of a whole snapshot vs qcow2", "nbd", ("ratios", "qcow2", "backup"), 1.0, "ratio"
    ),
    Target(
        "backup, half in the store, vs qcow2",
        "nbd",
        ("ratios", "qcow2", "backup_half"),
        1.0,
        "ratio",
    ),
    Target(
        "first writes (durable) vs qcow2", "nbd", ("ratios", "qcow2", "first_write"), 2.0, "ratio"
    ),
    Target(
        "csnapd already-unique checks, 8 clients",
        "server",
        ("origin_write_unique_8_clients", "server_requests_per_s"),
        20_000,
        "per_s",
    ),
    Target(
        "csnapd copy-outs, 8 clients",
        "server",
        ("origin_write_copy_8_clients", "chunks_per_s"),
        5_000,
        "per_s",
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


def _lookup(figures: Mapping[str, Any], keys: Sequence[str]) -> float | None:
    value: Any = figures
    for key in keys:
        if not isinstance(value, Mapping) or key not in value:
            return None
        value = value[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _format(value: float, unit: str) -> str:
    if unit == "ratio":
        return fmt_ratio(value)
    if unit == "per_s":
        return f"{value:,.0f}/s"
    if unit == "replies_per_fsync":
        return f"{value:.1f}"
    return f"{value:.3f}"


def evaluate(parts: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per target and per memory figure, from the figures of the
    parts that ran (a part that failed has only an "error")."""
    rows: list[dict[str, Any]] = []
    for target in TARGETS:
        measured = _lookup(parts.get(target.part, {}), target.figure)
        if measured is None:
            reached, progress = None, None
        elif target.at_most:
            reached = measured <= target.goal
            progress = target.goal / measured if measured else None
        else:
            reached = measured >= target.goal
            progress = measured / target.goal
        rows.append(
            {
                "target": target.name,
                "goal": ("≤ " if target.at_most else "≥ ") + _format(target.goal, target.unit),
                "measured": measured,
                "shown": "not measured" if measured is None else _format(measured, target.unit),
                "of_goal": progress,
                "reached": reached,
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
            }
        )
    return rows


def targets_table(rows: Sequence[Mapping[str, Any]], *, quick: bool) -> str:
    notes = ["one run's figures: the nbd part's ratios are against peers measured beside csnap"]
    if quick:
        notes.append("a --quick run: smoke-test sizes, not a measurement")
    body = [
        [
            row["target"],
            row["goal"],
            row["shown"],
            "" if row["of_goal"] is None else f"{row['of_goal']:.0%}",
            {True: "yes", False: "no", None: "-"}[row["reached"]],
        ]
        for row in rows
    ]
    return table(["target", "goal", "measured", "of goal", "reached"], body, notes=notes)
