"""End to end through the NBD gateway: `qemu-img bench` against csnap-nbd
(in front of a real csnapd) over a Unix socket, beside qemu-nbd serving a
qcow2 image with an internal snapshot over a Unix socket, and beside
`nbdkit file` on the origin file itself as the ceiling (no snapshots, no
metadata: just the file).

Every request is 4 KiB, queue depth 16, one request per 64 KiB (-s 4k
-S 64k -d 16), over a region of `writes` x 64 KiB. csnap uses 64 KiB
chunks and qcow2 64 KiB clusters, so each request of a first-write pass
is the first write to its chunk (cluster) since the snapshot and makes the
server copy one whole chunk. Both the csnap origin and the qcow2 image are
filled with data before the snapshot, so the copies read real blocks, and
synced, so that both start in the page cache with nothing to write back.

Phases, in this order, each one `qemu-img bench` run:
  first_write      writes after snapshot 1 (-t none: no FUA, no flush)
  rewrite          the same writes again: chunks already unique; `passes`
                   passes over the region in one run (qemu-img bench wraps
                   at the end of the image to the same offsets)
  snapshot_read    reads of snapshot 1 at the same offsets, `passes` passes
                   (csnap: the snap-1 export, every chunk in the store;
                   qcow2: qemu-nbd --load-snapshot; file: the file)
  first_write_fua  writes after snapshot 2 with -t directsync: every write
                   carries FUA, so each reply means the data is durable
  rewrite_fua      the same again
and two backups, each `nbdcopy` of a whole snapshot to null: (256 KiB
requests, 16 in flight, one connection), timed by the wall clock:
  backup           snapshot 1 after the first-write pass (every chunk copied;
                   read right after snapshot_read)
  backup_half      snapshot 3, taken after rewrite_fua, after 4 KiB writes
                   into every other chunk (half the snapshot copied, half
                   still shared with the origin)
Without FUA, csnap still commits each copy-out's metadata before replying;
qemu-nbd keeps qcow2 metadata in its caches until a flush.

A round runs every system through every phase, each on fresh state
(a newly formatted store, a new qcow2 image) and with nothing of the
system before it left to write back (a sync of every file system between
systems); the systems' order rotates
from round to round so that drift on a shared machine falls on all of
them. The figure for each phase is the median over rounds of the IOPS
qemu-img reports ("Run completed in T seconds": requests / T); ratios are
csnap's median over the peer's median. The JSON also keeps each round's
ratio (round_ratios: csnap's round over the peer's round of the same
number), whose spread the targets table shows.

csnap's copies are counted from the store: data chunks free before and
after the first-write pass; qcow2's from the image's allocated bytes.

Memory: the peak resident memory (VmHWM from /proc) of each server
process at the end of its round, just before it is stopped: csnap-nbd and
csnapd for csnap and csnap_direct, qemu-nbd (the highest of the round's
processes, one per export), nbdkit; median and max over rounds, in a
second table.

csnap_direct is csnap again with --direct given to csnapd and csnap-nbd:
the origin and store files read and written with O_DIRECT, as block
devices are by default (no page cache: what a disk shared between hosts
costs); csnap_direct/csnap is its median over csnap's.

Then what TLS costs (a third table): one csnap-nbd with --tls=on serves
the same store to plaintext and TLS clients, with the same client both
ways, one connection, 16 requests in flight, so the only difference is TLS
(Python's ssl in the gateway, GnuTLS in the client). Per round, on a fresh
store with snapshot 1 whose region has been written once since (so every
timed write is a rewrite, whichever mode goes first):
  read_4k    bench/nbd_load.py (libnbd): 4 KiB reads of the snapshot
             export, in order over the first quarter of the region
  write_4k   bench/nbd_load.py: 4 KiB writes to the origin export, the same
  read_256k  nbdcopy (libnbd): the snapshot export to null:, 256 KiB requests
The 4 KiB phases do not use nbdcopy: it raises its request size to the
export's preferred block size (csnap-nbd advertises its chunk size), nor
qemu-img bench, which takes no TLS credentials. The modes swap order each
round; the time runs from connecting (the TLS handshake included) to the
last reply (nbdcopy: its run's wall clock). The gateway's own count of the
requests it read is checked against what each phase sends.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from bench.common import (
    Part,
    fill_file,
    fmt_ratio,
    listening,
    median,
    missing_tools,
    peak_rss_kib,
    progress,
    ratio,
    run_tool,
    scrape,
    serving_unix,
    stdout_line,
    sync_file,
    table,
)
from bench.server_bench import csnapd
from csnap_client import AdminClient, open_admin
from csnap_format.mkcsnap import format_store

IO = 4096
STRIDE = 64 << 10
DEPTH = 16
#: csnap chunk size and qcow2 cluster size.
CHUNK = 64 << 10
PATTERN = 0xA5

PHASES = ("first_write", "rewrite", "snapshot_read", "first_write_fua", "rewrite_fua")
#: Phases that may pass over the region more than once: a second pass
#: rewrites (reads) the same 4 KiB as the first. A first write cannot repeat.
REPEATED = ("rewrite", "snapshot_read")
#: Backups: nbdcopy of a whole snapshot to null:, reported in MiB/s.
BACKUPS = ("backup", "backup_half")
#: nbdcopy's request size for the backups.
BACKUP_REQUEST = 256 << 10
SYSTEMS = ("csnap", "csnap_direct", "qcow2", "file")
LABELS = {
    "csnap": "csnap-nbd + csnapd",
    "csnap_direct": "csnap --direct",
    "qcow2": "qemu-nbd + qcow2",
    "file": "nbdkit file",
}

#: One system's round: seconds per phase, its other figures, and the peak
#: resident memory (VmHWM, KiB; None when unreadable) of each of its server
#: processes (csnap-nbd and csnapd, qemu-nbd, nbdkit), read just before
#: they are stopped.
RoundResult = tuple[dict[str, float], dict[str, Any], dict[str, int | None]]


@dataclass(frozen=True)
class Plan:
    rounds: int
    #: Requests per pass of qemu-img bench over the region (one per 64 KiB).
    writes: int
    #: Passes over the region of the phases that may repeat (REPEATED): each
    #: of their runs takes `passes` x `writes` requests, so that a phase of
    #: 30,000 IOPS lasts half a second, not a seventh, and a stall of the
    #: machine decides less of its figure.
    passes: int = 1

    @property
    def region(self) -> int:
        return self.writes * STRIDE


@dataclass(frozen=True)
class TlsPhase:
    """One phase of the TLS table."""

    #: Bytes per request.
    request: int
    write: bool
    #: Run by bench/nbd_load.py over the first quarter of the region; else
    #: by nbdcopy over all of it. nbdcopy raises its request size to the
    #: export's preferred block size, so it cannot send 4 KiB requests here.
    small: bool


#: The TLS table's phases.
TLS_PHASES = {
    "read_4k": TlsPhase(4096, write=False, small=True),
    "write_4k": TlsPhase(4096, write=True, small=True),
    "read_256k": TlsPhase(256 << 10, write=False, small=False),
}
TLS_MODES = ("plaintext", "tls")
#: The TLS table's client of 4 KiB requests, and the Python that has libnbd.
NBD_LOAD = Path(__file__).resolve().parent / "nbd_load.py"
SYSTEM_PYTHON = "/usr/bin/python3"
#: Makes the CA, server and client certificates for the TLS runs.
NBD_CERTS = Path(__file__).resolve().parents[1] / "scripts" / "nbd-certs"

FULL = Plan(rounds=5, writes=4096, passes=4)
QUICK = Plan(rounds=1, writes=128, passes=2)


async def half_write(url: str, count: int) -> None:
    """4 KiB into every other chunk (cluster) of the region: half of it copied, untimed."""
    argv = ["qemu-img", "bench", "-q", "-f", "raw", "-c", str(count // 2), "-s", str(IO)]
    argv += ["-S", str(2 * STRIDE), "-d", str(DEPTH), "-t", "none", "-w", f"--pattern={PATTERN}"]
    await run_tool([*argv, url])


async def qemu_bench(url: str, count: int, *, write: bool, fua: bool = False) -> float:
    """Seconds qemu-img bench says the run took."""
    argv = ["qemu-img", "bench", "-f", "raw", "-c", str(count), "-s", str(IO), "-S", str(STRIDE)]
    argv += ["-d", str(DEPTH), "-t", "directsync" if fua else "none"]
    if write:
        argv += ["-w", f"--pattern={PATTERN}"]
    return await qemu_bench_seconds([*argv, url])


async def qemu_bench_seconds(argv: Sequence[str]) -> float:
    """Run `qemu-img bench` as `argv` says; the seconds it says the run took."""
    out = await run_tool(argv)
    found = re.search(r"Run completed in ([0-9.]+) seconds", out)
    if found is None:
        raise RuntimeError(f"qemu-img bench said {out!r}")
    # A run too short for its clock's resolution still took some time.
    return max(float(found.group(1)), 1e-3)


def _url(sock: Path, export: str) -> str:
    return f"nbd+unix:///{export}?socket={sock}"


# -- csnap ---------------------------------------------------------------------


async def _data_free(admin: AdminClient) -> int:
    free: int = (await admin.status()).store.data_free
    return free


async def csnap_round(d: Path, origin: Path, plan: Plan, *, direct: bool = False) -> RoundResult:
    store = d / "csnap.store"
    store.unlink(missing_ok=True)
    # Room for three snapshots' copies of the whole region, plus metadata.
    format_store(
        str(store),
        str(origin),
        chunk_size=CHUNK,
        store_size=3 * plan.region + (64 << 20),
        progress=False,
    )
    sock = d / "csnap.sock"
    times: dict[str, float] = {}
    gateway = ["-m", "csnap_nbd", "--unix", str(sock), "--log-level", "warning"]
    flags = ["--direct"] if direct else []
    async with (
        csnapd(store, origin, d / "csnapd.log", "--log-level", "warning", *flags) as server,
        open_admin(server.connect) as admin,
        listening(
            [
                *(sys.executable, *gateway, *flags, "--server", server.address),
                *("--origin", str(origin), "--store", str(store)),
            ],
            d / "nbd.log",
        ) as gateway_process,
    ):
        n = plan.writes
        await admin.create_snapshot(1)
        free = await _data_free(admin)
        times["first_write"] = await qemu_bench(_url(sock, "origin"), n, write=True)
        copied = free - await _data_free(admin)
        times["rewrite"] = await qemu_bench(
            _url(sock, "origin"), requests(plan, "rewrite"), write=True
        )
        times["snapshot_read"] = await qemu_bench(
            _url(sock, "snap-1"), requests(plan, "snapshot_read"), write=False
        )
        times["backup"] = await nbdcopy_seconds(_url(sock, "snap-1"), "null:", BACKUP_REQUEST)
        await admin.create_snapshot(2)
        times["first_write_fua"] = await qemu_bench(_url(sock, "origin"), n, write=True, fua=True)
        times["rewrite_fua"] = await qemu_bench(_url(sock, "origin"), n, write=True, fua=True)
        await admin.create_snapshot(3)
        await half_write(_url(sock, "origin"), n)
        times["backup_half"] = await nbdcopy_seconds(_url(sock, "snap-3"), "null:", BACKUP_REQUEST)
        memory = {
            "csnap-nbd": peak_rss_kib(gateway_process.pid),
            "csnapd": peak_rss_kib(server.pid),
        }
    store.unlink()
    return times, {"copied_bytes_per_first_write": copied * CHUNK / plan.writes}, memory


# -- qemu-nbd with qcow2 ---------------------------------------------------------


@asynccontextmanager
async def qemu_nbd(
    image: Path, sock: Path, log: Path, *, snapshot: str | None = None
) -> AsyncIterator[trio.Process]:
    argv = ["qemu-nbd", "--format=qcow2", f"--socket={sock}", "--persistent"]
    argv += ["--cache=writeback", "--aio=threads"]
    if snapshot is None:
        argv += ["--export-name=origin"]
    else:
        argv += [f"--load-snapshot={snapshot}", "--read-only", "--export-name=snap"]
    async with serving_unix([*argv, str(image)], sock, log) as process:
        yield process


def _allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


class PeakMemory:
    """The highest peak resident memory (VmHWM) of several processes, KiB."""

    def __init__(self) -> None:
        self.kib: int | None = None

    def note(self, process: trio.Process) -> None:
        """Read before the process is stopped; one already gone is left out."""
        peak = peak_rss_kib(process.pid)
        if peak is not None:
            self.kib = peak if self.kib is None else max(self.kib, peak)


async def qcow2_round(d: Path, plan: Plan) -> RoundResult:
    image, sock, log = d / "peer.qcow2", d / "qemu-nbd.sock", d / "qemu-nbd.log"
    image.unlink(missing_ok=True)
    n = plan.writes
    create = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={CHUNK}"]
    await run_tool([*create, str(image), str(plan.region)])
    # Every cluster allocated with data before the snapshot.
    fill = ["qemu-img", "bench", "-q", "-f", "qcow2", "-w", "-c", str(n), "-s", str(STRIDE)]
    await run_tool([*fill, "-d", str(DEPTH), "--pattern=90", str(image)])
    sync_file(image)
    await run_tool(["qemu-img", "snapshot", "-c", "s1", str(image)])
    times: dict[str, float] = {}
    allocated = _allocated(image)
    # A qemu-nbd per export: the round's figure is the highest of their peaks.
    memory = PeakMemory()
    async with qemu_nbd(image, sock, log) as process:
        times["first_write"] = await qemu_bench(_url(sock, "origin"), n, write=True)
        times["rewrite"] = await qemu_bench(
            _url(sock, "origin"), requests(plan, "rewrite"), write=True
        )
        memory.note(process)
    grown = _allocated(image) - allocated
    async with qemu_nbd(image, sock, log, snapshot="s1") as process:
        times["snapshot_read"] = await qemu_bench(
            _url(sock, "snap"), requests(plan, "snapshot_read"), write=False
        )
        times["backup"] = await nbdcopy_seconds(_url(sock, "snap"), "null:", BACKUP_REQUEST)
        memory.note(process)
    await run_tool(["qemu-img", "snapshot", "-c", "s2", str(image)])
    async with qemu_nbd(image, sock, log) as process:
        times["first_write_fua"] = await qemu_bench(_url(sock, "origin"), n, write=True, fua=True)
        times["rewrite_fua"] = await qemu_bench(_url(sock, "origin"), n, write=True, fua=True)
        memory.note(process)
    await run_tool(["qemu-img", "snapshot", "-c", "s3", str(image)])
    async with qemu_nbd(image, sock, log) as process:
        await half_write(_url(sock, "origin"), n)
        memory.note(process)
    async with qemu_nbd(image, sock, log, snapshot="s3") as process:
        times["backup_half"] = await nbdcopy_seconds(_url(sock, "snap"), "null:", BACKUP_REQUEST)
        memory.note(process)
    image.unlink()
    return times, {"allocated_bytes_per_first_write": grown / n}, {"qemu-nbd": memory.kib}


# -- nbdkit file -----------------------------------------------------------------


async def file_round(d: Path, origin: Path, plan: Plan) -> RoundResult:
    sock, log = d / "nbdkit.sock", d / "nbdkit.log"
    argv = ["nbdkit", "--foreground", "--exit-with-parent", "--unix", str(sock)]
    times: dict[str, float] = {}
    n = plan.writes
    async with serving_unix([*argv, "file", f"file={origin}"], sock, log) as process:
        url = _url(sock, "")
        times["first_write"] = await qemu_bench(url, n, write=True)
        times["rewrite"] = await qemu_bench(url, requests(plan, "rewrite"), write=True)
        times["snapshot_read"] = await qemu_bench(url, requests(plan, "snapshot_read"), write=False)
        times["first_write_fua"] = await qemu_bench(url, n, write=True, fua=True)
        times["rewrite_fua"] = await qemu_bench(url, n, write=True, fua=True)
        times["backup"] = await nbdcopy_seconds(url, "null:", BACKUP_REQUEST)
        times["backup_half"] = times["backup"]
        memory = {"nbdkit": peak_rss_kib(process.pid)}
    return times, {}, memory


# -- csnap with and without TLS ----------------------------------------------------


def _csnap_url(sock: Path, export: str, certificates: Path | None) -> str:
    if certificates is None:
        return _url(sock, export)
    return f"nbds+unix:///{export}?socket={sock}&tls-certificates={certificates}"


def tls_requests(plan: Plan, phase: str) -> int:
    """Requests one run of a TLS phase makes."""
    spec = TLS_PHASES[phase]
    covered = plan.region // 4 if spec.small else plan.region
    return covered // spec.request


async def _metrics_url(gateway: trio.Process) -> str:
    """The URL csnap-nbd prints on its "metrics URL" line, after "listening"."""
    line = await stdout_line(
        gateway, seconds=30, ended="csnap-nbd ended before printing its metrics URL"
    )
    word, _, url = line.partition(" ")
    if word != "metrics":
        raise RuntimeError(f"csnap-nbd said {line!r}, not 'metrics URL'")
    return url


def _gateway_requests(metrics_url: str, command: str) -> int:
    """NBD requests of `command` (read, write...) the gateway has read, every export."""
    return sum(
        int(value)
        for name, value in scrape(metrics_url).items()
        if name.startswith("csnap_nbd_requests_total{") and f'command="{command}"' in name
    )


async def _tls_phase_seconds(
    plan: Plan, phase: str, sock: Path, source: Path, certificates: Path | None
) -> float:
    """Wall-clock seconds of one TLS phase's client run, connecting included."""
    spec = TLS_PHASES[phase]
    if spec.small:
        url = _csnap_url(sock, "origin" if spec.write else "snap-1", certificates)
        argv = [SYSTEM_PYTHON, str(NBD_LOAD), url, str(tls_requests(plan, phase))]
        argv += [str(spec.request), str(DEPTH), "write" if spec.write else "read"]
        return max(float((await run_tool(argv)).strip()), 1e-3)
    if spec.write:
        copy = (str(source), _csnap_url(sock, "origin", certificates))
    else:
        copy = (_csnap_url(sock, "snap-1", certificates), "null:")
    return await nbdcopy_seconds(*copy, spec.request)


async def nbdcopy_seconds(source: str, target: str, request: int) -> float:
    """Wall-clock seconds of one nbdcopy run: one connection, DEPTH requests."""
    argv = ["nbdcopy", "--connections=1", "--threads=1", f"--requests={DEPTH}"]
    argv += [f"--request-size={request}", "--no-extents", source, target]
    started = time.perf_counter()
    await run_tool(argv)
    return max(time.perf_counter() - started, 1e-3)


async def tls_round(
    d: Path, origin: Path, plan: Plan, certificates: Path, order: Sequence[str]
) -> dict[str, dict[str, float]]:
    """Seconds per mode and phase, on one gateway serving both modes."""
    store = d / "csnap-tls.store"
    store.unlink(missing_ok=True)
    format_store(
        str(store),
        str(origin),
        chunk_size=CHUNK,
        store_size=plan.region + (64 << 20),
        progress=False,
    )
    source = d / "tls-source.raw"
    if not source.exists():
        fill_file(source, plan.region, 0xC3)
    sock = d / "csnap-tls.sock"
    argv = ["-m", "csnap_nbd", "--unix", str(sock), "--log-level", "warning"]
    argv += ["--tls=on", f"--tls-certificates={certificates}", "--metrics", "127.0.0.1:0"]
    seconds: dict[str, dict[str, float]] = {mode: {} for mode in order}
    async with (
        csnapd(store, origin, d / "csnapd-tls.log", "--log-level", "warning") as server,
        open_admin(server.connect) as admin,
        listening(
            [
                *(sys.executable, *argv, "--server", server.address),
                *("--origin", str(origin), "--store", str(store)),
            ],
            d / "nbd-tls.log",
        ) as gateway,
    ):
        metrics = await _metrics_url(gateway.process)
        await admin.create_snapshot(1)
        # Every chunk copied out once, untimed: the timed writes only rewrite.
        await nbdcopy_seconds(str(source), _url(sock, "origin"), 256 << 10)
        for phase in TLS_PHASES:
            for mode in order:
                tls = certificates if mode == "tls" else None
                command = "write" if TLS_PHASES[phase].write else "read"
                before = await trio.to_thread.run_sync(_gateway_requests, metrics, command)
                seconds[mode][phase] = await _tls_phase_seconds(plan, phase, sock, source, tls)
                seen = await trio.to_thread.run_sync(_gateway_requests, metrics, command) - before
                # The figure is per request: the client must have sent the
                # requests the phase names, of the size it names.
                if seen != tls_requests(plan, phase):
                    raise RuntimeError(
                        f"{phase} ({mode}): the gateway read {seen} {command} requests,"
                        f" not the {tls_requests(plan, phase)} the phase sends"
                    )
    store.unlink()
    return seconds


async def _tls_rounds(d: Path, plan: Plan) -> list[dict[str, dict[str, float]]]:
    origin = d / "tls-origin.img"
    fill_file(origin, plan.region, 0x5A)
    certificates = d / "nbd-pki"
    await run_tool([str(NBD_CERTS), str(certificates)])
    rounds = []
    for number in range(plan.rounds):
        order = TLS_MODES if number % 2 == 0 else TLS_MODES[::-1]
        seconds = await tls_round(d, origin, plan, certificates, order)
        rounds.append(seconds)
        rates = "  ".join(
            f"{phase} {mode} {tls_requests(plan, phase) / seconds[mode][phase]:,.0f}"
            for phase in TLS_PHASES
            for mode in TLS_MODES
        )
        progress(f"nbd tls round {number + 1}/{plan.rounds}: IOPS {rates}")
    return rounds


def _tls_figures(plan: Plan, rounds: list[dict[str, dict[str, float]]]) -> dict[str, Any]:
    figures: dict[str, Any] = {
        "requests_in_flight": DEPTH,
        "requests": {phase: tls_requests(plan, phase) for phase in TLS_PHASES},
        "request_bytes": {phase: spec.request for phase, spec in TLS_PHASES.items()},
        "client": {
            phase: "bench/nbd_load.py" if spec.small else "nbdcopy"
            for phase, spec in TLS_PHASES.items()
        },
    }
    for mode in TLS_MODES:
        figures[mode] = {}
        for phase, spec in TLS_PHASES.items():
            requests = tls_requests(plan, phase)
            round_iops = [requests / r[mode][phase] for r in rounds]
            figures[mode][phase] = {
                "iops": median(round_iops),
                "mib_per_s": median([iops * spec.request / (1 << 20) for iops in round_iops]),
                "round_iops": round_iops,
            }
    figures["tls_vs_plaintext"] = {
        phase: ratio(figures["tls"][phase]["iops"], figures["plaintext"][phase]["iops"])
        for phase in TLS_PHASES
    }
    return figures


def _tls_table(plan: Plan, figures: dict[str, Any]) -> str:
    rows = [
        [
            phase,
            figures["plaintext"][phase]["iops"],
            figures["tls"][phase]["iops"],
            figures["plaintext"][phase]["mib_per_s"],
            figures["tls"][phase]["mib_per_s"],
            fmt_ratio(figures["tls_vs_plaintext"][phase]),
        ]
        for phase in TLS_PHASES
    ]
    notes = [
        f"csnap-nbd --tls=on, plaintext and TLS clients side by side, median of"
        f" {plan.rounds} rounds: 1 connection, {DEPTH} requests in flight, Unix socket;"
        f" writes rewrite the origin",
        f"*_4k: bench/nbd_load.py (libnbd), {tls_requests(plan, 'read_4k'):,} requests in"
        f" order over {plan.region >> 22} MiB; read_256k: nbdcopy of {plan.region >> 20} MiB"
        f" (nbdcopy would send the export's preferred 64 KiB, not 4 KiB)",
    ]
    headers = ["phase", "IOPS plain", "IOPS TLS", "MiB/s plain", "MiB/s TLS", "TLS/plain"]
    return table(headers, rows, notes=notes)


# -- the part --------------------------------------------------------------------


def _libnbd_missing() -> str | None:
    """Why bench/nbd_load.py cannot run, or None when the system Python has libnbd."""
    try:
        found = subprocess.run(
            [SYSTEM_PYTHON, "-c", "import nbd"], capture_output=True, timeout=30, check=False
        )
    except OSError as exc:
        return f"{SYSTEM_PYTHON}: {exc} (scripts/bench installs python3-libnbd on Debian)"
    if found.returncode != 0:
        return "libnbd's Python binding not installed (scripts/bench installs python3-libnbd)"
    return None


def _skips() -> dict[str, str]:
    skipped = {}
    for system, tools in (
        ("csnap", ("qemu-img", "nbdcopy")),
        ("csnap_direct", ("qemu-img", "nbdcopy")),
        ("qcow2", ("qemu-img", "qemu-nbd", "nbdcopy")),
        ("file", ("qemu-img", "nbdkit", "nbdcopy")),
    ):
        reason = missing_tools(*tools)
        if reason is not None:
            skipped[system] = reason
    return skipped


async def _rounds(d: Path, plan: Plan, systems: Sequence[str]) -> dict[str, list[RoundResult]]:
    origin = d / "origin.img"
    fill_file(origin, plan.region, 0x5A)
    runs: dict[str, Callable[[], Any]] = {
        "csnap": lambda: csnap_round(d, origin, plan),
        "csnap_direct": lambda: csnap_round(d, origin, plan, direct=True),
        "qcow2": lambda: qcow2_round(d, plan),
        "file": lambda: file_round(d, origin, plan),
    }
    results: dict[str, list[RoundResult]] = {s: [] for s in systems}
    for number in range(plan.rounds):
        shift = number % len(systems)
        for system in [*systems[shift:], *systems[:shift]]:
            # What the system before wrote is on disk before this one starts:
            # a sync of its own must not wait for another system's writeback.
            os.sync()
            result: RoundResult = await runs[system]()
            results[system].append(result)
            times, _, memory = result
            rates = "  ".join(f"{p} {_rate(plan, p, times[p]):,.0f}" for p in (*PHASES, *BACKUPS))
            peaks = "  ".join(f"{name} {_mib(kib)}" for name, kib in memory.items())
            progress(
                f"nbd round {number + 1}/{plan.rounds} {system}: IOPS or MiB/s {rates};"
                f" peak RSS MiB {peaks}"
            )
    return results


def _mib(kib: float | None) -> str:
    return "-" if kib is None else f"{kib / 1024:.1f}"


def _memory_figures(rounds: Sequence[dict[str, int | None]]) -> dict[str, dict[str, Any]]:
    """Per server process: its peak resident memory in each round, their median and max.

    Median and max are None when any round could not read it.
    """
    figures: dict[str, dict[str, Any]] = {}
    for name in rounds[0]:
        values = [r[name] for r in rounds]
        known = [v for v in values if v is not None]
        complete = len(known) == len(values)
        figures[name] = {
            "median": median(known) if complete else None,
            "max": max(known) if complete else None,
            "rounds": values,
        }
    return figures


def _memory_table(plan: Plan, figures: dict[str, Any], systems: Sequence[str]) -> str:
    rows = []
    for system in SYSTEMS:
        if system not in systems:
            continue
        for name, peak in figures[system]["peak_rss_kib"].items():
            rows.append([LABELS[system], name, _mib(peak["median"]), _mib(peak["max"])])
    notes = [
        f"peak resident memory (VmHWM) of each server process, MiB, over {plan.rounds} rounds,"
        " read at the end of its round before it is stopped; qemu-nbd: the highest of the"
        " round's qemu-nbd processes (one per export)",
    ]
    return table(["system", "process", "peak MiB median", "peak MiB max"], rows, notes=notes)


def requests(plan: Plan, phase: str) -> int:
    """Requests of one qemu-img bench run of `phase` (it wraps at the region's end)."""
    return plan.writes * (plan.passes if phase in REPEATED else 1)


def _rate(plan: Plan, phase: str, seconds: float) -> float:
    """IOPS of a qemu-img bench phase, MiB/s of a backup."""
    if phase in BACKUPS:
        return plan.region / (1 << 20) / seconds
    return requests(plan, phase) / seconds


def nbd_part(directory: Path, *, quick: bool) -> Part:
    plan = QUICK if quick else FULL
    skipped = _skips()
    systems = [s for s in SYSTEMS if s not in skipped]
    results = trio.run(_rounds, directory, plan, systems) if "csnap" in systems else {}
    figures: dict[str, Any] = {
        "io_bytes": IO,
        "stride_bytes": STRIDE,
        "queue_depth": DEPTH,
        "chunk_bytes": CHUNK,
        "writes": plan.writes,
        "passes": {p: requests(plan, p) // plan.writes for p in PHASES},
        "rounds": plan.rounds,
        "skipped": skipped,
    }
    iops: dict[str, dict[str, float]] = {}
    for system, runs in results.items():
        per_phase = {
            p: [_rate(plan, p, times[p]) for times, _, _ in runs] for p in (*PHASES, *BACKUPS)
        }
        iops[system] = {p: median(v) for p, v in per_phase.items()}
        extra = {k: median([e[k] for _, e, _ in runs]) for k in runs[0][1]}
        figures[system] = {
            "iops": iops[system],
            "round_iops": per_phase,
            **extra,
            "peak_rss_kib": _memory_figures([memory for _, _, memory in runs]),
        }
    ratios = {
        peer: {p: ratio(iops["csnap"][p], iops[peer][p]) for p in (*PHASES, *BACKUPS)}
        for peer in ("qcow2", "file")
        if peer in iops and "csnap" in iops
    }
    figures["ratios"] = ratios
    # Round by round: csnap's round against the peer's round of the same
    # number, which ran next to it (the systems take turns within a round).
    figures["round_ratios"] = {
        peer: {
            p: [
                ratio(ours, theirs)
                for ours, theirs in zip(
                    figures["csnap"]["round_iops"][p], figures[peer]["round_iops"][p], strict=True
                )
            ]
            for p in (*PHASES, *BACKUPS)
        }
        for peer in ratios
    }
    direct_ratio = {
        p: ratio(iops["csnap_direct"][p], iops["csnap"][p])
        for p in (*PHASES, *BACKUPS)
        if "csnap_direct" in iops and "csnap" in iops
    }
    figures["direct_vs_cached"] = direct_ratio
    rows = [
        [
            p,
            *(iops.get(s, {}).get(p) for s in SYSTEMS),
            *(fmt_ratio(ratios.get(peer, {}).get(p)) for peer in ("qcow2", "file")),
            fmt_ratio(direct_ratio.get(p)),
        ]
        for p in (*PHASES, *BACKUPS)
    ]
    notes = [
        f"IOPS, median of {plan.rounds} rounds: qemu-img bench -s 4k -S 64k -d 16,"
        f" {plan.writes} requests over {plan.region >> 20} MiB, Unix sockets;"
        f" {', '.join(REPEATED)}: {plan.passes} passes over it",
        "csnap 64 KiB chunks, qcow2 64 KiB clusters; *_fua: -t directsync (FUA on every write)",
        f"backup*: MiB/s of nbdcopy of the whole snapshot to null:, {BACKUP_REQUEST >> 10} KiB"
        f" requests, {DEPTH} in flight, 1 connection; backup: snapshot 1 (every chunk"
        " copied); backup_half: snapshot 3, every other chunk copied (file: the file)",
    ]
    if "csnap" in figures:
        notes.append(
            "csnap copied per first write: "
            f"{figures['csnap']['copied_bytes_per_first_write']:,.0f} bytes"
            + (
                f"; qcow2 allocated per first write: "
                f"{figures['qcow2']['allocated_bytes_per_first_write']:,.0f} bytes"
                if "qcow2" in figures
                else ""
            )
        )
    tls_skip = missing_tools("nbdcopy", "openssl") or _libnbd_missing()
    if tls_skip is not None:
        skipped["csnap_tls"] = tls_skip
    notes += [f"skipped {s}: {why}" for s, why in skipped.items()]
    headers = [
        "phase",
        *(f"{LABELS[s]}" for s in SYSTEMS),
        "csnap/qcow2",
        "csnap/file",
        "direct/csnap",
    ]
    text = table(headers, rows, notes=notes)
    if results:
        text += "\n\n" + _memory_table(plan, figures, list(results))
    if tls_skip is None:
        figures["tls"] = _tls_figures(plan, trio.run(_tls_rounds, directory, plan))
        text += "\n\n" + _tls_table(plan, figures["tls"])
    return Part(figures, text, skipped)
