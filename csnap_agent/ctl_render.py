"""What the csnap command line prints: each verb's result as text for people,
or as JSON.

Owns the layout of the tables and summaries; the delta verbs and `resize`
render their own (csnap_delta.cli, csnap_agent.resize_cli).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from csnap_agent import resize_cli
from csnap_common import format_size
from csnap_delta import cli as delta_cli

__all__ = ["jsonable", "render"]


def _render_standbys(standbys: list[dict[str, Any]]) -> str:
    if not standbys:
        return "standbys   none\n"
    lines = [
        f"{s['address']}" + (f" on node {s['node']}" if s["node"] else "") + f", pid {s['pid']}"
        for s in standbys
    ]
    return "".join(f"{'standbys' if n == 0 else '':<10} {line}\n" for n, line in enumerate(lines))


def jsonable(value: Any) -> Any:
    """`value` as JSON can hold it: bytes as hex."""
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {key: jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(item) for item in value]
    return value


def _when(ns: int) -> str:
    if not ns:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ns / 1e9))


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = [headers, *rows]
    return "".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        + "\n"
        for line in lines
    )


_SNAPSHOT_HEADERS = ("TAG", "CREATED", "PRIORITY", "USE", "STATE", "OWNS ALONE", "SHARES")


def _snapshot_row(snapshot: dict[str, Any], chunk_size: int) -> list[str]:
    def amount(chunks: int) -> str:
        return f"{chunks} ({format_size(chunks * chunk_size)})"

    return [
        str(snapshot["tag"]),
        _when(snapshot["created_ns"]),
        str(snapshot["priority"]),
        str(snapshot["use_count"]),
        snapshot["state"],
        amount(snapshot["unique_chunks"]),
        amount(snapshot["shared_chunks"]),
    ]


def render(verb: str, result: Any) -> str:
    """What `verb` prints, for people, given its `result`."""
    if verb in ("delta", "apply", "receive", "send"):
        return delta_cli.render(verb, result)
    if verb == "revert":
        if not result["done"]:
            return (
                f"reverting the origin to snapshot {result['tag']}: {result['total']} chunks"
                " to restore (csnap status shows how far it is)\n"
            )
        return f"origin reverted to snapshot {result['tag']} ({result['total']} chunks restored)\n"
    if verb in ("create", "delete", "priority", "usecount"):
        done = {
            "create": "created",
            "delete": "deleted (space is reclaimed in the background)",
            "priority": f"priority {result['priority']}",
            "usecount": f"use count {result['use_count']}",
        }[verb]
        return f"snapshot {result['tag']}: {done}\n"
    if verb == "list":
        snapshots = result["snapshots"]
        if not snapshots:
            return "no snapshots\n"
        rows = [_snapshot_row(s, result["chunk_size"]) for s in snapshots]
        return _table(_SNAPSHOT_HEADERS, rows)
    if verb == "status":
        return _render_status(result)
    if verb == "resize":
        return resize_cli.render(result)
    if verb == "server":
        return (
            f"server     {result['address']}\n"
            f"state      {result['state']}\n"
            f"active     since {_when(result['active_since_ns'])}\n"
            + (f"node       {result['node']}\n" if result["node"] else "")
            + (f"token      {result['token']}\n" if result["token"] else "")
            + f"started    {_when(result['started_ns'])}\n"
            f"store      {result['store']}\n"
            f"origin     {result['origin']}\n"
            f"clients    {result['clients']} connected: {result['origin_clients']} origin,"
            f" {result['snapshot_clients']} snapshot\n"
            f"commits    {result['commits']}\n"
            f"requests   {result['requests']}\n" + _render_standbys(result["standbys"])
        )
    return "server stopped; the store is clean\n"


def _render_status(result: dict[str, Any]) -> str:
    store = result["store"]
    chunk = store["chunk_size"]
    data, free = store["data_chunks"], store["data_free"]
    used = data - free
    lines = [
        f"store      {format_size(store['store_chunks'] * chunk)}"
        f" ({store['store_chunks']} chunks of {format_size(chunk)})",
        f"origin     {format_size(store['origin_chunks'] * chunk)}"
        f" ({store['origin_chunks']} chunks)",
        f"data       {format_size(used * chunk)} used, {format_size(free * chunk)} free"
        f" of {format_size(data * chunk)} ({100 * used / data if data else 0:.1f}% used)",
        f"metadata   {store['meta_blocks'] - store['meta_free']} of {store['meta_blocks']}"
        f" blocks used",
        f"exceptions {store['exceptions']}",
    ]
    if store.get("space_warning"):
        lines.append(
            f"warning    the data area is past its warning threshold of {store['warn_at']}% used"
        )
    if store.get("keep_free"):
        lines.append(f"reserve    csnapd squashes snapshots to keep {store['keep_free']}% free")
    if store.get("reverting"):
        lines.append(
            f"revert     the origin is being reverted to snapshot {store['revert_tag']}:"
            f" {store['revert_restored']} of {store['revert_total']} chunks restored;"
            " origin writes wait"
        )
    lines.append("")
    if "snapshot" in result:
        snapshots = [result["snapshot"]]
    else:
        snapshots = result["snapshots"]
    if snapshots:
        lines.append(_table(_SNAPSHOT_HEADERS, [_snapshot_row(s, chunk) for s in snapshots]))
    else:
        lines.append("no snapshots\n")
    deleting = result.get("deleting") or []
    if deleting:
        tags = ", ".join(str(s["tag"]) for s in deleting)
        swept = store["sweep_cursor"] / store["origin_chunks"] if store["origin_chunks"] else 0
        lines.append(
            f"being deleted (space not yet reclaimed): {tags}; the sweep has visited"
            f" {swept:.0%} of the origin's chunks\n"
        )
    return "\n".join(lines)
