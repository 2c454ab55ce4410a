"""The layer rules are enforced by ruff (TID251), not by prose: an import a
package may not make fails `ruff check` on that package's own path.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

FORBIDDEN = [
    ("csnap_format/_probe.py", "import trio"),
    ("csnap_format/_probe.py", "import msgpack"),
    ("csnap_format/_probe.py", "from csnapd.engine import Engine"),
    ("csnapd/engine/_probe.py", "import trio"),
    ("csnapd/engine/_probe.py", "import socket"),
    ("csnapd/engine/_probe.py", "from msgpack import packb"),
    ("csnapd/engine/_probe.py", "import construct"),
    ("csnapd/engine/_probe.py", "import csnap_protocol"),
    ("csnap_protocol/_probe.py", "import trio"),
    ("csnap_protocol/_probe.py", "from csnapd.engine import Engine"),
    ("csnap_protocol/_probe.py", "import csnap_format"),
    ("csnapd/_probe.py", "import msgpack"),
    ("csnapd/_probe.py", "import construct"),
    ("csnap_agent/_probe.py", "import msgpack"),
    ("csnap_agent/_probe.py", "import csnapd.engine"),
    ("csnap_client/_probe.py", "import construct"),
    ("csnap_nbd/_probe.py", "from csnap_format import Leaf"),
    ("csnap_nbd/_probe.py", "import msgpack"),
    ("csnap_nbd/wire/_probe.py", "import trio"),
    ("csnap_nbd/wire/_probe.py", "import socket"),
    ("csnap_nbd/wire/_probe.py", "from csnap_client import DataClient"),
    ("csnap_delta/_probe.py", "import csnap_format"),
    ("csnap_delta/_probe.py", "import msgpack"),
    ("csnap_delta/_probe.py", "from csnap_nbd import datapath"),
    ("csnap_common/_probe.py", "import csnap_format"),
    ("csnap_common/_probe.py", "import socket"),
    ("csnap_common/systemd/_probe.py", "import trio"),
    ("csnap_common/systemd/_probe.py", "import csnapd"),
    ("csnapd/engine/_probe.py", "import prometheus_client"),
    ("csnap_format/_probe.py", "from prometheus_client import Counter"),
    ("csnap_protocol/_probe.py", "import prometheus_client"),
    ("csnap_nbd/wire/_probe.py", "import prometheus_client"),
    ("csnap_common/_probe.py", "import prometheus_client"),
    ("csnap_common/metrics/_probe.py", "import csnapd"),
    ("csnap_transport/_probe.py", "import msgpack"),
    ("csnap_transport/_probe.py", "import csnapd"),
    ("csnap_transport/_probe.py", "from csnap_client import DataClient"),
    ("csnap_transport/_probe.py", "import prometheus_client"),
]

ALLOWED = [
    ("csnap_format/_probe.py", "import construct"),
    ("csnapd/engine/_probe.py", "import csnap_format"),
    ("csnap_protocol/_probe.py", "import msgpack"),
    ("csnapd/_probe.py", "import trio"),
    ("csnap_agent/_probe.py", "import trio"),
    ("csnap_nbd/_probe.py", "import trio"),
    ("csnap_delta/_probe.py", "import zstandard"),
    ("csnap_nbd/wire/_probe.py", "import struct"),
    ("tests/_probe.py", "import trio"),
    ("csnap_common/systemd/_probe.py", "import socket"),
    ("csnap_common/metrics/_probe.py", "import trio"),
    ("csnap_common/metrics/_probe.py", "import prometheus_client"),
    ("csnapd/_probe.py", "import prometheus_client"),
    ("csnap_agent/_probe.py", "import prometheus_client"),
    ("csnap_nbd/_probe.py", "import prometheus_client"),
    ("csnap_transport/_probe.py", "import trio"),
    ("csnap_transport/_probe.py", "import csnap_protocol"),
]


def ruff(path: str, source: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("ruff", path=str(Path(sys.executable).parent)) or "ruff"
    return subprocess.run(
        [
            exe,
            "check",
            "--no-cache",
            "--select",
            "TID251",
            "--stdin-filename",
            path,
            "-",
        ],
        input=f"from __future__ import annotations\n\n{source}\n",
        capture_output=True,
        text=True,
        cwd=ROOT,
    )


@pytest.mark.parametrize(("path", "source"), FORBIDDEN)
def test_forbidden_import_fails_lint(path: str, source: str) -> None:
    result = ruff(path, source)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "TID251" in result.stdout


@pytest.mark.parametrize(("path", "source"), ALLOWED)
def test_allowed_import_passes_lint(path: str, source: str) -> None:
    result = ruff(path, source)
    assert result.returncode == 0, result.stdout + result.stderr
