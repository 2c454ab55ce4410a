"""python -m bench.gateway_trees: first writes into a snapshot through
csnap-nbd in two source trees, side by side, in alternating rounds of one
run.

  python -m bench.gateway_trees BASE [NEW] [--size S] [--depth D]
                                [--count N] [--rounds R] [--zero]
                                [--origin] [--backup | --reads | --rewrites]
                                [--passes P]

BASE and NEW are as for bench.trees (git revisions checked out into
temporary worktrees, or directories); NEW defaults to this checkout. Each
round formats a fresh store for each tree over a filled origin, starts
that tree's csnapd (serving metrics) and csnap-nbd from a directory
outside both trees, creates snapshot 1 with that tree's own admin client
(the trees may speak different protocol versions), and writes into the
snap-1 export: `qemu-img bench` with S-byte requests (one per
max(S, 64 KiB), so each is the first write to its chunks since the
snapshot), D in flight, N of them; with --zero, `qemu-io` zeroes the same
ranges one at a time (`write -z`) and D is 1. With --origin the writes
go to the origin export instead: each the first to its chunk since the
snapshot, so each makes csnapd copy the chunk out (the nbd part's
first_write phase). The order of the trees turns every round, so that a
slow stretch of the machine falls on both.

With --backup, the round backs snap-1 up instead: 4 KiB into every other
chunk of an N-chunk origin after the snapshot (untimed: half the snapshot
copied, half still shared with the origin), then P passes (--passes) of
`nbdcopy` of snap-1 to null: with 256 KiB requests, 16 in flight.

With --reads, the round reads snap-1 instead: 4 KiB into every chunk of an
N-chunk origin after the snapshot (untimed: the whole snapshot copied, each
chunk owned alone in the store), then P passes (--passes) of `qemu-img
bench` reading 4 KiB of every chunk of snap-1, D in flight; each pass is a
new NBD connection, which learns its owned map anew.

With --rewrites, the round rewrites the origin instead: 4 KiB into every
chunk of an N-chunk origin after the snapshot (untimed: each chunk copied
out, so unique), then P passes of `qemu-img bench` writing the same 4 KiB
again, D in flight (the nbd part's rewrite phase).

Prints each tree's writes per second (qemu-img's own timing; qemu-io's run
by the wall clock) and csnapd's fsyncs per write (csnapd_fsyncs before and
after), each round's and their medians; with --backup, MiB/s (the median
of each round's passes), the gateway's and csnapd's CPU per pass
(/proc) and csnapd's query_map requests per pass; with --reads, reads per
second, the same CPU times and csnapd's query_owned requests per pass;
with --rewrites, writes per second, the same CPU times and csnapd's
query_write requests per pass.
--json FILE writes the same.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import trio

from bench.common import cpu_ns, fill_file, listening, missing_tools, progress, run_tool
from bench.nbd_bench import (
    BACKUP_REQUEST,
    DEPTH,
    IO,
    half_write,
    nbdcopy_seconds,
    qemu_bench_seconds,
)
from bench.server_bench import Server, csnapd
from bench.trees import add_tree_arguments, both_checked_out, csnapd_source, tree_env

#: csnap chunk size: one request per chunk at most.
CHUNK = 64 << 10
PATTERN = 0xA5

#: Run by the tree's own interpreter path: snapshot 1 through its admin client.
_CREATE_SNAPSHOT = """
import sys
from pathlib import Path
import trio
from csnap_client import open_admin, tcp_connector
from csnap_common.credentials import ROLE_ADMIN, client_context, store_credentials
host, port, store = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
connect = tcp_connector(host, port, client_context(store_credentials(store), ROLE_ADMIN))
async def create():
    async with open_admin(connect) as admin:
        await admin.create_snapshot(1)
trio.run(create)
"""


@dataclass
class Tree:
    """One source tree under comparison."""

    name: str
    revision: str
    path: Path
    #: Writes (or reads) per second, or with --backup MiB/s, per round.
    per_s: list[float] = field(default_factory=list)
    fsyncs_per_write: list[float] = field(default_factory=list)
    #: With --backup or --reads, per round (medians of its passes): CPU ms
    #: per pass of the gateway and of csnapd, and csnapd's requests per
    #: pass of the kind the run counts (query_map, query_owned).
    gateway_ms: list[float] = field(default_factory=list)
    csnapd_ms: list[float] = field(default_factory=list)
    asked: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class Plan:
    size: int
    depth: int
    count: int
    zero: bool
    #: Passes of nbdcopy per round; 0: the writes instead.
    backup_passes: int = 0
    #: Passes of 4 KiB reads per round; 0: the writes instead.
    read_passes: int = 0
    #: Passes of 4 KiB rewrites of the origin per round; 0: not those.
    rewrite_passes: int = 0
    #: The export the writes go to: snap-1, or the origin (copy-outs).
    export: str = "snap-1"

    @property
    def passes(self) -> int:
        return self.backup_passes or self.read_passes or self.rewrite_passes

    @property
    def counted(self) -> str:
        """The csnapd requests a pass counts."""
        if self.rewrite_passes:
            return "query_write"
        return "query_map" if self.backup_passes else "query_owned"

    @property
    def stride(self) -> int:
        return max(self.size, CHUNK)

    @property
    def region(self) -> int:
        return self.count * self.stride


async def _writes(plan: Plan, url: str) -> float:
    """Seconds the writes (or zeroes) into `url` took."""
    if plan.zero:
        commands = []
        for n in range(plan.count):
            commands += ["-c", f"write -z {n * plan.stride} {plan.size}"]
        started = time.monotonic()
        await run_tool(["qemu-io", "-f", "raw", *commands, url])
        return time.monotonic() - started
    argv = ["qemu-img", "bench", "-f", "raw", "-w", f"--pattern={PATTERN}", "-t", "none"]
    argv += ["-c", str(plan.count), "-s", str(plan.size), "-S", str(plan.stride)]
    return await qemu_bench_seconds([*argv, "-d", str(plan.depth), url])


async def one_round(tree: Tree, plan: Plan, directory: Path) -> None:
    """Fresh store, the tree's csnapd and gateway, snapshot 1, the writes."""
    env = tree_env(tree.path)
    source = csnapd_source(tree.path, directory)
    if source != tree.path / "csnapd":
        raise RuntimeError(f"csnapd would come from {source}, not from the tree {tree.path}")
    origin = directory / "origin"
    if not origin.exists():
        fill_file(origin, plan.region, 0x5A)
    store = directory / f"{tree.name}.store"
    store.unlink(missing_ok=True)
    mkcsnap = [sys.executable, "-m", "csnap_format.mkcsnap", str(store), str(origin)]
    mkcsnap += ["--chunk-size", str(CHUNK), "--store-size", str(2 * plan.region + (64 << 20))]
    await trio.run_process(mkcsnap, env=env, cwd=directory, capture_stdout=True)
    sock = directory / f"{tree.name}.sock"
    log = directory / f"{tree.name}.csnapd.log"
    options = ("--log-level", "warning")
    async with csnapd(store, origin, log, *options, metrics=True, env=env, cwd=directory) as server:
        host, _, port = server.address.rpartition(":")
        create = [sys.executable, "-c", _CREATE_SNAPSHOT, host.strip("[]"), port, str(store)]
        await trio.run_process(create, env=env, cwd=directory, capture_stdout=True)
        gateway = [sys.executable, "-m", "csnap_nbd", "--unix", str(sock), *options]
        gateway += ["--server", server.address, "--origin", str(origin), "--store", str(store)]
        async with listening(
            gateway, directory / f"{tree.name}.nbd.log", env=env, cwd=directory
        ) as gateway_process:
            if plan.passes:
                await _passes(tree, plan, sock, server, gateway_process.pid)
                store.unlink()
                return
            before = await trio.to_thread.run_sync(server.fsyncs)
            seconds = await _writes(plan, f"nbd+unix:///{plan.export}?socket={sock}")
            after = await trio.to_thread.run_sync(server.fsyncs)
    store.unlink()
    if before is None or after is None:
        raise RuntimeError("csnapd did not report its fsyncs")
    tree.per_s.append(plan.count / seconds)
    tree.fsyncs_per_write.append((after - before) / plan.count)


def _cpu_ms(pid: int) -> float:
    used = cpu_ns(pid)
    if used is None:
        raise RuntimeError(f"the CPU time of process {pid} is not readable")
    return used / 1e6


async def _passes(tree: Tree, plan: Plan, sock: Path, server: Server, gateway_pid: int) -> None:
    """Snap-1 made ready (half or all of it copied), then plan.passes timed
    passes over it: nbdcopy backups, 4 KiB reads or 4 KiB rewrites."""
    origin = f"nbd+unix:///origin?socket={sock}"
    snapshot = f"nbd+unix:///snap-1?socket={sock}"
    if plan.backup_passes:
        await half_write(origin, plan.count)
    else:
        await _writes(replace(plan, size=IO, depth=DEPTH), origin)
    rates: list[float] = []
    gateway_ms: list[float] = []
    csnapd_ms: list[float] = []
    asked: list[float] = []
    for _ in range(plan.passes):
        gateway, server_cpu = _cpu_ms(gateway_pid), _cpu_ms(server.pid)
        before = await trio.to_thread.run_sync(server.requests, plan.counted)
        if plan.backup_passes:
            seconds = await nbdcopy_seconds(snapshot, "null:", BACKUP_REQUEST)
            rates.append(plan.region / seconds / (1 << 20))
        elif plan.rewrite_passes:
            rates.append(plan.count / await _writes(replace(plan, size=IO), origin))
        else:
            argv = ["qemu-img", "bench", "-f", "raw", "-c", str(plan.count), "-s", str(IO)]
            argv += ["-S", str(CHUNK), "-d", str(plan.depth), "-t", "none", snapshot]
            rates.append(plan.count / await qemu_bench_seconds(argv))
        gateway_ms.append(_cpu_ms(gateway_pid) - gateway)
        csnapd_ms.append(_cpu_ms(server.pid) - server_cpu)
        asked.append(await trio.to_thread.run_sync(server.requests, plan.counted) - before)
    tree.per_s.append(statistics.median(rates))
    tree.gateway_ms.append(statistics.median(gateway_ms))
    tree.csnapd_ms.append(statistics.median(csnapd_ms))
    tree.asked.append(statistics.median(asked))


async def compare(trees: list[Tree], plan: Plan, rounds: int, directory: Path) -> None:
    for number in range(rounds):
        for tree in trees if number % 2 == 0 else trees[::-1]:
            await one_round(tree, plan, directory)
            progress(f"gateway_trees: round {number + 1}: {tree.name} {tree.per_s[-1]:,.1f}/s")


def render(trees: list[Tree], plan: Plan) -> str:
    median = statistics.median
    if plan.passes:
        if plan.backup_passes:
            title = (
                f"# nbdcopy of snap-1 ({plan.count} chunks, every other one copied),"
                f" {BACKUP_REQUEST >> 10} KiB requests, {plan.passes} passes per round"
            )
            unit, places = "MiB/s", 0
        elif plan.rewrite_passes:
            title = (
                f"# 4 KiB rewrites of the origin, one per chunk of {plan.count}, each unique,"
                f" {plan.depth} in flight, {plan.passes} passes per round"
            )
            unit, places = "writes per second", 0
        else:
            title = (
                f"# 4 KiB reads of snap-1, one per chunk of {plan.count}, each owned alone,"
                f" {plan.depth} in flight, {plan.passes} passes (connections) per round"
            )
            unit, places = "reads per second", 0

        def figures(tree: Tree) -> str:
            return (
                f"median {median(tree.per_s):,.0f} {unit}; per pass: gateway"
                f" {median(tree.gateway_ms):,.0f} ms CPU, csnapd {median(tree.csnapd_ms):,.0f}"
                f" ms CPU, {median(tree.asked):,.0f} {plan.counted}s"
            )
    else:
        what = "zeroes" if plan.zero else "writes"
        title = (
            f"# first {plan.size}-byte {what} into {plan.export} since snapshot 1,"
            f" {plan.depth} in flight, {plan.count} per round"
        )
        unit, places = f"{what} per second", 1

        def figures(tree: Tree) -> str:
            return (
                f"median {median(tree.per_s):,.1f}/s,"
                f" {median(tree.fsyncs_per_write):.3f} fsyncs/write"
            )

    lines = [title]
    for tree in trees:
        rounds = " / ".join(f"{x:,.{places}f}" for x in tree.per_s)
        lines.append(f"{tree.name:5s} {tree.revision}: {figures(tree)} (rounds: {rounds})")
    base, new = trees
    change = median(new.per_s) / median(base.per_s) - 1
    lines.append(f"new against base: {change:+.1%} {unit}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.gateway_trees",
        description="first writes into a snapshot through csnap-nbd, two trees, alternating",
    )
    add_tree_arguments(parser)
    parser.add_argument("--size", type=int, default=CHUNK, help="bytes per request")
    parser.add_argument(
        "--depth", type=int, help=f"requests in flight (1; with --reads or --rewrites {DEPTH})"
    )
    parser.add_argument("--count", type=int, default=256, help="requests per round")
    parser.add_argument("--rounds", type=int, default=6, help="rounds per tree")
    parser.add_argument(
        "--zero", action="store_true", help="zero the ranges (qemu-io, one at a time)"
    )
    parser.add_argument(
        "--origin",
        action="store_true",
        help="write into the origin (each write copies its chunk out), not into snap-1",
    )
    parser.add_argument(
        "--backup",
        action="store_true",
        help="back snap-1 up with nbdcopy, half of it copied, instead of writing",
    )
    parser.add_argument(
        "--reads",
        action="store_true",
        help="read 4 KiB of every chunk of snap-1, all of it copied, instead of writing",
    )
    parser.add_argument(
        "--rewrites",
        action="store_true",
        help="rewrite 4 KiB of every chunk of the origin, each unique, instead",
    )
    parser.add_argument(
        "--passes", type=int, default=5, help="nbdcopy, read or rewrite passes per round"
    )
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    if args.depth is None:
        args.depth = DEPTH if args.reads or args.rewrites else 1
    if min(args.size, args.depth, args.count, args.rounds, args.passes) < 1:
        parser.error("--size, --depth, --count, --rounds and --passes must be at least 1")
    if args.backup + args.zero + args.reads + args.rewrites > 1:
        parser.error("--backup, --reads, --rewrites and --zero are different runs: choose one")
    if args.origin and (args.backup or args.reads or args.rewrites):
        parser.error("--origin chooses where writes go: not with --backup, --reads or --rewrites")
    tools = ("qemu-img", "nbdcopy") if args.backup else ("qemu-io" if args.zero else "qemu-img",)
    missing = missing_tools(*tools)
    if missing is not None:
        parser.error(f"{missing} (scripts/bench installs it)")
    depth = 1 if args.zero else args.depth
    if args.backup:
        # One chunk per request of the half writes: every other chunk copied.
        plan = Plan(CHUNK, depth, args.count, False, backup_passes=args.passes)
    elif args.reads:
        plan = Plan(IO, depth, args.count, False, read_passes=args.passes)
    elif args.rewrites:
        plan = Plan(IO, depth, args.count, False, rewrite_passes=args.passes, export="origin")
    else:
        plan = Plan(
            args.size, depth, args.count, args.zero, export="origin" if args.origin else "snap-1"
        )
    with both_checked_out(args.base, args.new) as (directory, checked):
        trees = [Tree(*tree) for tree in checked]
        work = directory / "work"
        work.mkdir()
        trio.run(compare, trees, plan, args.rounds, work)
    print(render(trees, plan))
    if args.json:
        figures: dict[str, Any] = {
            "size": plan.size,
            "depth": plan.depth,
            "count": plan.count,
            "zero": plan.zero,
            "export": plan.export,
            "backup_passes": plan.backup_passes,
            "read_passes": plan.read_passes,
            "rewrite_passes": plan.rewrite_passes,
            "trees": {
                tree.name: {
                    "revision": tree.revision,
                    "path": str(tree.path),
                    "per_s": tree.per_s,
                    "fsyncs_per_write": tree.fsyncs_per_write,
                    "gateway_ms_per_pass": tree.gateway_ms,
                    "csnapd_ms_per_pass": tree.csnapd_ms,
                    f"{plan.counted}s_per_pass": tree.asked,
                }
                for tree in trees
            },
        }
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
