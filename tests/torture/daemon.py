"""A real csnapd process for the protocol fuzzer and the memory test: started
with the `csnapd` console script on a store file, watched (is it alive, how
much resident memory it holds), stopped with SIGTERM, and its store checked
afterwards with the `csnap-check` console script. Synchronous, so that a
hypothesis state machine can drive it step by step.
"""

from __future__ import annotations

import os
import selectors
import signal
import ssl
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tests.credentials import tls as credential_tls

__all__ = ["Csnapd", "start_csnapd", "csnap_check", "console_script"]

#: Seconds csnapd gets to print its address, and to stop on SIGTERM.
START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0


def console_script(name: str) -> str:
    """The installed console script `name` beside this interpreter."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise FileNotFoundError(f"{name} is not installed beside {sys.executable}")
    return str(path)


@dataclass
class Csnapd:
    """A running csnapd and where it listens."""

    process: subprocess.Popen[bytes]
    host: str
    port: int
    log: Path
    #: The admin credential csnapd made beside its store (zero configuration).
    tls: ssl.SSLContext = field(repr=False, default_factory=ssl.create_default_context)

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def exit_status(self) -> int | None:
        """None while it runs."""
        return self.process.poll()

    def rss_kib(self) -> int:
        """Resident memory now, from /proc/PID/status (VmRSS, in KiB)."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS line in /proc/PID/status")

    def log_tail(self, lines: int = 40) -> str:
        """The end of its log, a run of one message repeated shown once with its count."""
        out: list[str] = []
        repeats = 0
        for line in self.log.read_text(errors="replace").splitlines():
            # "2026-11-30 14:42:54,983 csnapd ...": compare without the time.
            logged = line[:4].isdigit() and line[23:24] == " "
            if logged and out and line[24:] == out[-1][24:]:
                repeats += 1
                continue
            if repeats:
                out.append(f"    (the line above {repeats} more times)")
                repeats = 0
            out.append(line)
        if repeats:
            out.append(f"    (the line above {repeats} more times)")
        return "\n".join(out[-lines:])

    def stop(self) -> int:
        """SIGTERM, then its exit status (killed if it does not stop in time)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()


def start_csnapd(store: Path, origin: Path, log: Path, *options: str) -> Csnapd:
    """Start csnapd on a free loopback port; returns once it listens."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log, "ab") as err:
        process = subprocess.Popen(
            [console_script("csnapd"), str(store), str(origin), *options],
            stdout=subprocess.PIPE,
            stderr=err,
            env=env,
        )
    assert process.stdout is not None
    try:
        os.set_blocking(process.stdout.fileno(), True)
        line = _first_line(process, START_TIMEOUT)
    except BaseException:
        process.kill()
        process.wait()
        process.stdout.close()
        raise
    word, _, address = line.partition(" ")
    if word != "listening":
        process.kill()
        process.wait()
        raise RuntimeError(f"csnapd said {line!r}: {log.read_text(errors='replace')[-2000:]}")
    host, _, port = address.rpartition(":")
    return Csnapd(process, host, int(port), log, credential_tls(store))


def _first_line(process: subprocess.Popen[bytes], timeout: float) -> str:
    assert process.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        if not selector.select(timeout):
            raise TimeoutError(f"csnapd did not say where it listens within {timeout}s")
    line = process.stdout.readline()
    if not line:
        raise RuntimeError("csnapd exited before it listened")
    return line.decode().strip()


def csnap_check(store: Path) -> subprocess.CompletedProcess[str]:
    """Run `csnap-check STORE` (read-only); its exit status and report."""
    return subprocess.run(
        [console_script("csnap-check"), str(store)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
