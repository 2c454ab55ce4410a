"""What every part of the benchmark suite shares: starting and stopping the
processes it measures (csnapd, csnap-nbd, qemu-nbd, nbdkit), finding the
peer tools, medians and ratios of repeated rounds, plain-text tables, and
a description of the machine the figures come from.

Processes are started with trio and always stopped when their block ends
(SIGTERM, then SIGKILL after a grace period), whatever happened inside.
"""

from __future__ import annotations

import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import trio
import trio.lowlevel

ROOT = Path(__file__).resolve().parents[1]

#: Environment for the Python processes the suite starts: this checkout first.
PYTHON_ENV = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}


# -- results ---------------------------------------------------------------------


@dataclass
class Part:
    """One part's figures (JSON-ready) and its table, printed once it ends."""

    figures: dict[str, Any]
    table: str
    #: Peers that could not run, with the reason.
    skipped: dict[str, str] = field(default_factory=dict)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def ratio(ours: float | None, theirs: float | None) -> float | None:
    """ours / theirs, or None when either side is missing or theirs is zero."""
    if ours is None or theirs is None or theirs == 0:
        return None
    return ours / theirs


def table(
    headers: Sequence[str], rows: Sequence[Sequence[Any]], *, notes: Sequence[str] = ()
) -> str:
    """A plain-text table: first column left-aligned, the others right-aligned."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, text in enumerate(row):
            widths[i] = max(widths[i], len(text))

    def line(values: Sequence[str]) -> str:
        first, *rest = values
        return "  ".join(
            [first.ljust(widths[0]), *(v.rjust(w) for v, w in zip(rest, widths[1:], strict=True))]
        ).rstrip()

    out = [f"# {note}" for note in notes]
    out.append(line(list(headers)))
    out.append(line(["-" * w for w in widths]))
    out.extend(line(row) for row in cells)
    return "\n".join(out)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 1:
            return f"{value:.2f}"
        return f"{value:.3g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def fill_file(path: Path, size: int, byte: int) -> None:
    """Write `size` bytes of `byte`, then fsync.

    Not sparse, so that copies read real blocks; synced, so that no
    writeback of the fill competes with what is measured next.
    """
    block = bytes([byte]) * (1 << 20)
    with open(path, "wb") as f:
        for done in range(0, size, len(block)):
            f.write(block[: min(len(block), size - done)])
        f.flush()
        os.fsync(f.fileno())


def sync_file(path: Path) -> None:
    """fsync a file another process wrote through the page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- tools -----------------------------------------------------------------------


def scratch_directory(prefix: str = "tmp") -> tempfile.TemporaryDirectory[str]:
    """A temporary directory for a run, under $CSNAP_BENCH_DIR when that is
    set, as an absolute path: Unix socket paths are made from it, and
    qemu-nbd takes only absolute ones."""
    parent = os.environ.get("CSNAP_BENCH_DIR") or None
    if parent is not None:
        parent = os.path.abspath(parent)
    return tempfile.TemporaryDirectory(prefix=prefix, dir=parent)


def find_tool(name: str) -> str | None:
    """A program on PATH or in the sbin directories (thin_check lives there)."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    return shutil.which(name, path=path)


def missing_tools(*names: str) -> str | None:
    """Why a peer cannot run: the tools not installed, or None when all are."""
    missing = [n for n in names if find_tool(n) is None]
    if not missing:
        return None
    return f"{', '.join(missing)} not installed (scripts/bench installs them on Debian)"


def tool_version(argv: Sequence[str]) -> str | None:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (out.stdout or out.stderr).strip().splitlines()
    return text[0] if text else None


def console_script(name: str) -> list[str]:
    """How to run one of csnap's console scripts with this interpreter."""
    modules = {"csnap-check": "csnapd.check_cli", "mkcsnap": "csnap_format.mkcsnap"}
    return [sys.executable, "-c", f"from {modules[name]} import run; run()"]


def machine() -> dict[str, Any]:
    """Where the figures were measured."""
    cpu = "unknown"
    try:
        for text in Path("/proc/cpuinfo").read_text().splitlines():
            if text.startswith("model name"):
                cpu = text.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = (0.0, 0.0, 0.0)
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load_average_at_start": [round(x, 2) for x in load],
        "qemu_img": tool_version(["qemu-img", "--version"]),
        "nbdkit": tool_version(["nbdkit", "--version"]),
        "thin_check": tool_version([find_tool("thin_check") or "thin_check", "--version"]),
        **_source(),
    }


def _source() -> dict[str, Any]:
    """The commit measured, and whether the tree had changes on top of it."""
    head = tool_version(["git", "-C", str(ROOT), "rev-parse", "HEAD"])
    try:
        status = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        status = ""
    return {"commit": head, "modified_files": status.split("\n")[:-1] if status else []}


# -- processes -------------------------------------------------------------------


def rss_kib(pid: int) -> dict[str, int]:
    """Resident memory now (VmRSS) and at its peak (VmHWM) of a live process, KiB."""
    out: dict[str, int] = {}
    try:
        for text in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = text.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    except OSError:
        pass
    return out


def cpu_ns(pid: int) -> int | None:
    """CPU time a live process used so far (all its threads), from /proc;
    None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    # utime and stime, fields 14 and 15 of stat(5), in clock ticks.
    ticks = int(fields[11]) + int(fields[12])
    return ticks * 1_000_000_000 // os.sysconf("SC_CLK_TCK")


def peak_rss_kib(pid: int) -> int | None:
    """Peak resident memory (VmHWM) of a live process so far, KiB; None once it is gone."""
    return rss_kib(pid).get("VmHWM")


async def stop(process: trio.Process, *, sig: int = signal.SIGTERM, grace: float = 30) -> None:
    """Send `sig`, wait up to `grace` seconds, then SIGKILL; always reaps it."""
    with trio.CancelScope(shield=True):
        if process.returncode is None:
            with suppress(ProcessLookupError):
                process.send_signal(sig)
            with trio.move_on_after(grace):
                await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()


def _open_log(log: Path) -> BinaryIO:
    return open(log, "ab")


def _tail(log: Path) -> str:
    try:
        return log.read_text(errors="replace")[-2000:]
    except OSError:
        return ""


@dataclass
class Started:
    """A started process, the rest of its first stdout line, and when it was spawned."""

    process: trio.Process
    said: str
    spawned_ns: int
    listening_ns: int

    @property
    def pid(self) -> int:
        return self.process.pid


def scrape(metrics_url: str) -> dict[str, float]:
    """Every sample a Prometheus text endpoint serves: its name with its
    labels, as written (`csnapd_requests_total{type="query_owned"}`), to its value."""
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


class OutputEndedError(RuntimeError):
    """A process's stdout closed before the line that was waited for."""


async def stdout_line(process: trio.Process, *, seconds: float, ended: str) -> str:
    """The next line `process` writes on its stdout (a pipe), stripped;
    OutputEndedError(`ended`) if the pipe closes first.

    Read a byte at a time: what follows the line is the next caller's.
    """
    assert process.stdout is not None
    line = b""
    with trio.fail_after(seconds):
        while not line.endswith(b"\n"):
            data = await process.stdout.receive_some(1)
            if not data:
                raise OutputEndedError(ended)
            line += data
    return line.decode().strip()


@asynccontextmanager
async def listening(
    argv: Sequence[str],
    log: Path,
    *,
    word: str = "listening",
    seconds: float = 120,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> AsyncIterator[Started]:
    """A process whose first stdout line is "WORD REST" once it serves.

    stderr goes to `log`; the process gets SIGTERM when the block ends. It
    runs in `cwd`, this process's own directory by default.
    """
    with _open_log(log) as err:
        spawned = time.perf_counter_ns()
        process = await trio.lowlevel.open_process(
            list(argv), stdout=subprocess.PIPE, stderr=err, env=dict(env or PYTHON_ENV), cwd=cwd
        )
    try:
        try:
            line = await stdout_line(process, seconds=seconds, ended=f"{argv[0]} said nothing")
        except OutputEndedError:
            await process.wait()
            raise RuntimeError(
                f"{argv[0]} exited ({process.returncode}) before listening: {_tail(log)}"
            ) from None
        said_at = time.perf_counter_ns()
        first, _, rest = line.partition(" ")
        if first != word:
            raise RuntimeError(f"{argv[0]} said {line!r}, not '{word} ...'")
        yield Started(process, rest, spawned, said_at)
    finally:
        await stop(process)


@asynccontextmanager
async def serving_unix(
    argv: Sequence[str], sock: Path, log: Path, *, seconds: float = 60
) -> AsyncIterator[trio.Process]:
    """A process that serves on the Unix socket `sock` once it accepts a connection."""
    with _open_log(log) as out:
        process = await trio.lowlevel.open_process(
            list(argv), stdout=out, stderr=out, stdin=subprocess.DEVNULL
        )
    try:
        with trio.fail_after(seconds):
            while True:
                if process.returncode is not None or process.poll() is not None:
                    raise RuntimeError(
                        f"{argv[0]} exited ({process.returncode}) before serving: {_tail(log)}"
                    )
                try:
                    stream = await trio.open_unix_socket(str(sock))
                except OSError:
                    await trio.sleep(0.02)
                    continue
                await stream.aclose()
                break
        yield process
    finally:
        await stop(process)
        await trio.Path(sock).unlink(missing_ok=True)


async def run_tool(argv: Sequence[str], *, seconds: float = 600) -> str:
    """Run a command to completion; its stdout, or RuntimeError with its output."""
    with trio.fail_after(seconds):
        done = await trio.run_process(
            list(argv), capture_stdout=True, capture_stderr=True, check=False
        )
    if done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} exited {done.returncode}:"
            f" {(done.stderr or b'').decode(errors='replace')[-2000:]}"
        )
    return (done.stdout or b"").decode()


def progress(text: str) -> None:
    """A line of progress on stderr; the tables go to stdout."""
    print(text, file=sys.stderr, flush=True)
