# The benchmarks' --quick runs: each finishes, and its JSON has every figure
# with a sane value. Speed is never asserted: CI machines vary too much.
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]

SERVER_WORKLOADS = (
    "origin_write_unique",
    "origin_write_copy",
    "snapshot_read_store",
    "snapshot_read_locked",
    "snapshot_write",
)
#: Workloads whose every request copies a chunk, so every batch commits.
COPYING = ("origin_write_copy", "snapshot_write")


def run_quick(module: str, tmp_path: Path) -> dict[str, Any]:
    out = tmp_path / "figures.json"
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CSNAP_BENCH_DIR": str(work)}
    subprocess.run(
        [sys.executable, "-m", module, "--quick", "--json", str(out)],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
        timeout=300,
    )
    figures: dict[str, Any] = json.loads(out.read_text())
    return figures


def test_server_bench_quick(tmp_path: Path) -> None:
    figures = run_quick("bench.server_bench", tmp_path)
    for workload in SERVER_WORKLOADS:
        for clients in (1, 8, 64):
            key = f"{workload}_{clients}_clients"
            row = figures[key]
            assert row["clients"] == clients
            assert row["ops"] > 0 and row["replies"] >= row["ops"], key
            assert row["chunks_per_s"] > 0, key
            assert 0 < row["p50_ms"] <= row["p99_ms"], key
            assert 0 <= row["commits_per_reply"] <= 1, key
            assert row["fsyncs_per_reply"] >= row["commits_per_reply"], key
            assert row["client_cpu_us_per_reply"] >= 0, key
            assert row["server_cpu_us_per_reply"] is None or row["server_cpu_us_per_reply"] >= 0
            if workload in COPYING:
                assert row["commits_per_reply"] > 0, key
                assert row["batch"] >= 1, key
            elif row["commits"] == 0:
                assert row["batch"] is None, key
    life = figures["snapshot_lifecycle"]
    for key in ("create_0_origin_clients", "create_8_origin_clients", "delete_empty"):
        assert 0 < life[key]["p50_ms"] <= life[key]["p99_ms"], key
    assert life["delete_full_ms"] > 0
    # The deleted snapshot held every exception: the sweep reclaims them all.
    assert life["exceptions"] > 0
    assert life["exceptions_swept"] == life["exceptions"]
    assert life["sweep_s"] > 0 and life["sweep_exceptions_per_s"] > 0
    assert life["sweep_commits"] >= 1


def test_engine_bench_quick(tmp_path: Path) -> None:
    figures = run_quick("bench.engine_bench", tmp_path)
    for snapshots in (1, 64):
        for batch in (1, 64):
            row = figures[f"copy_out_{snapshots}_snapshots_batch_{batch}"]
            assert row["copy_outs_per_s"] > 0
            assert row["commit_p50_ms"] > 0
            assert row["fsyncs_per_request"] > 0
        row = figures[f"lookups_{snapshots}_snapshots"]
        assert row["snapshot_reads_per_s"] > 0
        assert row["unique_checks_per_s"] > 0
    large = figures["large_store"]
    assert large["exceptions"] > 0
    assert 0 < large["lookup_p50_us"] <= large["lookup_p99_us"]
    for key in ("build_s", "open_s", "rss_mib", "cached_pages", "check_s"):
        assert large[key] > 0, key
