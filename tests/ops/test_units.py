"""The unit files under contrib/systemd: `systemd-analyze verify` accepts
them without a word (it runs without systemd as PID 1), and the command
line each one runs is one its program accepts.
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest

from csnap_agent.cli import _parser as agent_parser
from csnap_nbd.cli import _parser as nbd_parser
from csnapd.cli import _parser as csnapd_parser
from tests.e2e.processes import ROOT

UNITS = ROOT / "contrib" / "systemd"
#: Where the units expect the programs; the tests put the virtualenv's there.
INSTALLED = "/usr/local/bin/"
PARSERS: dict[str, Callable[[], argparse.ArgumentParser]] = {
    "csnapd": csnapd_parser,
    "csnap-agent": agent_parser,
    "csnap-nbd": nbd_parser,
}


def unit_files() -> list[Path]:
    units = sorted(p for p in UNITS.iterdir() if p.suffix in (".service", ".socket"))
    assert {p.name for p in units} == {
        "csnap-agent.socket",
        "csnap-agent.service",
        "csnapd@.service",
        "csnap-nbd.service",
    }
    return units


def installed_copies(directory: Path) -> list[Path]:
    """The units with this virtualenv's programs in ExecStart=, and a csnapd@ instance."""
    bin_dir = Path(sys.executable).parent
    copies = []
    for unit in unit_files():
        copy = directory / unit.name
        copy.write_text(unit.read_text().replace(INSTALLED, f"{bin_dir}/"))
        copies.append(copy)
    return [*(c for c in copies if "@." not in c.name), directory / "csnapd@data.service"]


def verify(units: list[Path]) -> subprocess.CompletedProcess[str]:
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing: scripts/test installs the systemd package"
    return subprocess.run(
        [analyze, "verify", "--man=no", *map(str, units)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_systemd_analyze_verify_accepts_every_unit(tmp_path: Path) -> None:
    result = verify(installed_copies(tmp_path))
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_verify_as_run_here_does_report_a_broken_unit(tmp_path: Path) -> None:
    """The check above can fail: a misspelt option and a missing program are reported."""
    units = installed_copies(tmp_path)
    nbd = tmp_path / "csnap-nbd.service"
    nbd.write_text(nbd.read_text().replace("ProtectSystem=", "ProtectSytem="))
    agent = tmp_path / "csnap-agent.service"
    agent.write_text(agent.read_text().replace("/csnap-agent ", "/no-such-csnap-agent "))
    result = verify(units)
    assert "ProtectSytem" in result.stderr
    assert "no-such-csnap-agent" in result.stderr
    assert result.returncode != 0


def exec_start(unit: Path) -> list[str]:
    [line] = [line for line in unit.read_text().splitlines() if line.startswith("ExecStart=")]
    return shlex.split(line.removeprefix("ExecStart="))


def environment(unit: Path) -> dict[str, str]:
    """Environment= of the unit, then the example configuration (as EnvironmentFile=)."""
    values: dict[str, str] = {}
    for line in unit.read_text().splitlines():
        if line.startswith("Environment="):
            for word in shlex.split(line.removeprefix("Environment=")):
                key, _, value = word.partition("=")
                values[key] = value
    if unit.name == "csnapd@.service":
        for line in (UNITS / "csnapd.conf.example").read_text().splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.partition("=")
                values[key] = value
    return values


def expand(argv: list[str], values: dict[str, str]) -> list[str]:
    """systemd's expansion: ${VAR} is one word, $VAR splits into words."""
    out: list[str] = []
    for word in argv:
        if (whole := re.fullmatch(r"\$\{(\w+)\}", word)) is not None:
            out.append(values[whole.group(1)])
        elif (split := re.fullmatch(r"\$(\w+)", word)) is not None:
            out.extend(values[split.group(1)].split())
        else:
            out.append(word)
    return out


@pytest.mark.parametrize(
    "unit", [p for p in unit_files() if p.suffix == ".service"], ids=lambda unit: unit.name
)
def test_each_unit_runs_a_command_line_its_program_accepts(unit: Path) -> None:
    program, *args = expand(exec_start(unit), environment(unit))
    assert program.startswith(INSTALLED)
    name = program.removeprefix(INSTALLED)
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert name in scripts and name in PARSERS
    parsed = PARSERS[name]().parse_args(args)  # exits (SystemExit) on a bad option
    # Every service names the socket csnap-agent.socket listens on.
    socket_unit = (UNITS / "csnap-agent.socket").read_text()
    [listen] = re.findall(r"^ListenStream=(.*)$", socket_unit, re.MULTILINE)
    assert (parsed.socket if name == "csnap-agent" else parsed.agent) == listen
