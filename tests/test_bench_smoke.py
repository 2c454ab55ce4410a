"""The benchmarks' --quick runs: each finishes, and its JSON has every figure
with a sane value. Speed is never asserted: CI machines vary too much.
"""

from __future__ import annotations

import json
import os
import statistics
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
    "snapshot_write_data",
)
#: Workloads whose every request copies a chunk, so every batch commits.
COPYING = ("origin_write_copy", "snapshot_write", "snapshot_write_data")


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
            assert 0 < row["csnapd_rss_kib"] <= row["csnapd_peak_rss_kib"], key
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


def test_suite_quick(tmp_path: Path) -> None:
    out = tmp_path / "suite.json"
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CSNAP_BENCH_DIR": str(work)}
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--json", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results: dict[str, Any] = json.loads(out.read_text())
    assert results["quick"] is True
    assert results["machine"]["cores"] >= 1
    parts = results["parts"]
    assert set(parts) == {
        "server",
        "nbd",
        "snapshots",
        "scale",
        "lifecycle",
        "recovery",
        "failover",
        "cluster",
        "metrics",
        "changes",
        "reclaim",
        "tls",
        "floor",
    }
    for name, part in parts.items():
        assert "error" not in part, name
        assert part["part_seconds"] > 0, name
        assert f"== {name}:" in done.stdout
    # Every temporary file went with the run's directory.
    assert not list(work.iterdir())
    check_server_part(parts["server"])
    check_nbd_part(parts["nbd"])
    # Both parts the targets read ran: every target is measured, and shown.
    assert "== targets" in done.stdout
    for row in results["targets"]:
        assert row["measured"] is not None and row["measured"] > 0, row["target"]
        assert row["target"] in done.stdout
    check_snapshots_part(parts["snapshots"])
    check_scale_part(parts["scale"])
    check_recovery_part(parts["recovery"])
    check_failover_part(parts["failover"])
    check_metrics_part(parts["metrics"])
    check_floor_part(parts["floor"])
    cluster = parts["cluster"]
    assert cluster["one_node_queries_per_s"] > 0 and cluster["three_nodes_queries_per_s"] > 0
    assert parts["lifecycle"]["exceptions_swept"] == parts["lifecycle"]["exceptions"]
    check_changes_part(parts["changes"])
    check_reclaim_part(parts["reclaim"])
    for side in ("tls", "plaintext"):
        figures = parts["tls"][side]
        assert figures["connections_per_s"] > 0, side
        assert figures["queries_1_clients"]["chunks_per_s"] > 0, side
        assert figures["queries_8_clients"]["chunks_per_s"] > 0, side


def check_changes_part(part: dict[str, Any]) -> None:
    for walk in ("changelist_between_snapshots", "changelist_from_origin"):
        assert part[walk]["chunks"] > 0 and part[walk]["seconds"] > 0, walk
        assert part[walk]["peak_rss_mib"] > 0, walk
    delta = part["delta"]
    assert 0 < delta["plain"]["per_chunk_size"] <= 1.02
    assert 0 < delta["compressed"]["per_chunk_size"] < delta["plain"]["per_chunk_size"]
    assert delta["apply_mib_per_s"] > 0


def check_reclaim_part(part: dict[str, Any]) -> None:
    assert part["exceptions"] > 0 and part["idle_lookups_per_s"] > 0
    for key in ("delete_single", "delete_sixty_fourth"):
        case = part[key]
        assert case["owned"] > 0 and case["ack_s"] > 0 and case["free_s"] > 0, key
        assert 0 < case["commits"] <= case["steps"] + 1, key
        assert case["leaves_visited"] > 0 and case["longest_step_ms"] > 0, key
    # A snapshot owning one exception is reclaimed in fewer transactions than
    # one owning an exception in every leaf.
    assert part["delete_single"]["commits"] < part["delete_sixty_fourth"]["commits"]
    # And it reads fewer leaves: the index summaries skip the others.
    assert part["delete_single"]["leaves_visited"] < part["delete_sixty_fourth"]["leaves_visited"]
    # Through csnapd: lookups answered idle and while the sweep ran, which ended.
    served = part["csnapd_delete_sixty_fourth"]
    assert served["owned"] > 0 and 0 < served["ack_s"] < served["free_s"]
    assert served["commits"] > 0
    for window in ("idle", "during"):
        figures = served[window]
        assert figures["lookups"] > 0 and figures["lookups_per_s"] > 0, window
        assert 0 < figures["p50_ms"] <= figures["p99_ms"] <= figures["max_ms"], window
    assert part["idle_lookup_p99_ms"] > 0 and part["delete_single"]["lookup_p99_ms"] > 0
    squash = part["squash_sixty_fourth"]
    assert squash["owned"] > 0 and squash["write_served_s"] > 0


def check_server_part(part: dict[str, Any]) -> None:
    for workload in SERVER_WORKLOADS:
        for clients in (1, 8, 64):
            row = part[f"{workload}_{clients}_clients"]
            assert row["ops"] > 0 and row["chunks_per_s"] > 0
            assert 0 < row["csnapd_peak_rss_kib"] <= part["csnapd_peak_rss_kib"]
            # The medians come from the rounds kept beside them.
            for figure in ("chunks_per_s", "server_requests_per_s"):
                rounds = row[f"round_{figure}"]
                assert len(rounds) == row["rounds"] and row[figure] == statistics.median(rounds)


NBD_PHASES = (
    "first_write",
    "rewrite",
    "snapshot_read",
    "first_write_fua",
    "rewrite_fua",
    "backup",
    "backup_half",
)


def check_nbd_part(part: dict[str, Any]) -> None:
    assert part["io_bytes"] == 4096 and part["queue_depth"] == 16
    # Rewrites and snapshot reads pass over the region more than once, first
    # writes (which cannot repeat) and FUA rewrites once.
    assert part["passes"] == {
        "first_write": 1,
        "rewrite": 2,
        "snapshot_read": 2,
        "first_write_fua": 1,
        "rewrite_fua": 1,
    }
    skipped = part["skipped"]
    # scripts/test installs the peers (qemu-utils, nbdkit): none may be missing.
    assert not skipped, f"systems skipped: {skipped}"
    for system in ("csnap", "csnap_direct", "qcow2", "file"):
        for phase in NBD_PHASES:
            assert part[system]["iops"][phase] > 0, (system, phase)
            assert len(part[system]["round_iops"][phase]) == part["rounds"]
        # Each server process's peak resident memory, read before it stopped.
        for name, peak in part[system]["peak_rss_kib"].items():
            assert len(peak["rounds"]) == part["rounds"], (system, name)
            assert 0 < peak["median"] <= peak["max"], (system, name)
    assert set(part["csnap"]["peak_rss_kib"]) == {"csnap-nbd", "csnapd"}
    # Each first write after a snapshot copies exactly one 64 KiB chunk.
    assert part["csnap"]["copied_bytes_per_first_write"] == part["chunk_bytes"]
    # csnap again with O_DIRECT (--direct to csnapd and csnap-nbd), and its ratio.
    assert all(r is not None and r > 0 for r in part["direct_vs_cached"].values())
    # NBD with and without TLS, side by side on one gateway.
    tls = part["tls"]
    for mode in ("plaintext", "tls"):
        for phase in ("read_4k", "write_4k", "read_256k"):
            assert tls[mode][phase]["iops"] > 0, (mode, phase)
            assert len(tls[mode][phase]["round_iops"]) == part["rounds"]
    # The 4 KiB phases send 4 KiB requests (the part checked the gateway's
    # count of them): a quarter of the region each, the 256 KiB phase all of it.
    assert tls["request_bytes"] == {"read_4k": 4096, "write_4k": 4096, "read_256k": 256 << 10}
    assert tls["client"]["read_4k"] == tls["client"]["write_4k"] == "bench/nbd_load.py"
    region = part["writes"] * part["stride_bytes"]
    assert tls["requests"] == {
        "read_4k": region // 4 // 4096,
        "write_4k": region // 4 // 4096,
        "read_256k": region // (256 << 10),
    }
    assert all(r is not None and r > 0 for r in tls["tls_vs_plaintext"].values())
    for peer in ("qcow2", "file"):
        assert all(r is not None and r > 0 for r in part["ratios"][peer].values()), peer
        # Each round's ratio: csnap's round over the peer's round of that number.
        for phase, rounds in part["round_ratios"][peer].items():
            ours, theirs = part["csnap"]["round_iops"][phase], part[peer]["round_iops"][phase]
            assert rounds == [a / b for a, b in zip(ours, theirs, strict=True)], (peer, phase)


def check_snapshots_part(part: dict[str, Any]) -> None:
    levels = part["levels"]
    assert set(levels) == {"0", "1", "2", "4", "8", "16", "32", "64"}
    assert levels["0"]["copied_bytes_per_write"] == 0
    for k in ("1", "2", "4", "8", "16", "32", "64"):
        row = levels[k]
        # One chunk per first write, however many snapshots share it.
        assert row["copied_bytes_per_write"] == part["chunk_bytes"], k
        assert row["writes_per_s"] > 0 and 0 < row["p50_ms"] <= row["p99_ms"], k
        assert row["time_vs_1_snapshot"] > 0, k
    assert part["time_64_vs_1"] == levels["64"]["time_vs_1_snapshot"]


def check_scale_part(part: dict[str, Any]) -> None:
    assert part["exceptions"] > 0 and part["snapshots"] == 64
    server = part["server"]
    assert 0 < server["startup_s"] <= server["ready_s"]
    assert server["lookups"] > 0 and 0 < server["lookup_p50_us"] <= server["lookup_p99_us"]
    assert server["rss_mib"] > 0 and server["peak_rss_mib"] >= server["rss_mib"]
    assert part["csnap_check"]["seconds"] > 0 and part["csnap_check"]["mappings_per_s"] > 0
    # scripts/test installs thin-provisioning-tools: the peer must have run.
    assert "thin_check" not in part["skipped"], part["skipped"]
    assert part["thin_check"]["seconds"] > 0 and part["check_ratio"] > 0
    assert part["csnap_repair"]["seconds"] > 0
    assert part["thin_repair"] is None or part["thin_repair"]["seconds"] > 0


def check_recovery_part(part: dict[str, Any]) -> None:
    assert part["python_import_floor_s"] > 0
    assert part["journals"]
    for figs in part["journals"].values():
        assert figs["journal_commit_records"] > 0
        assert figs["copied_before_kill"] > 0
        assert 0 < figs["crash_listening_s"] <= figs["crash_ready_s"]
        assert 0 < figs["clean_listening_s"] <= figs["clean_ready_s"]
        assert all(state == "active" for state in figs["state_after_crash"])
        assert figs["check_clean"] is True


def check_failover_part(part: dict[str, Any]) -> None:
    # One time per client per round, each after the kill.
    assert len(part["failover_s"]) == part["rounds"] * part["clients"]
    assert all(t > 0 for t in part["failover_s"])
    assert 0 < part["failover_median_s"] <= part["failover_max_s"]
    assert part["check_clean"] is True


def check_floor_part(part: dict[str, Any]) -> None:
    for clients in (1, 8):
        figures = part[f"{clients}_clients"]
        for server in ("echo", "csnapd_plaintext", "csnapd_tls"):
            assert figures[server]["replies"] > 0, (clients, server)
            assert figures[server]["replies_per_s"] > 0, (clients, server)
            assert figures[server]["cpu_us_per_reply"] >= 0, (clients, server)
        for server in ("csnapd_plaintext", "csnapd_tls"):
            own = figures[server]["own_us_per_reply"]
            assert own == figures[server]["cpu_us_per_reply"] - figures["echo"]["cpu_us_per_reply"]


def check_metrics_part(part: dict[str, Any]) -> None:
    for workload in ("origin_write_unique", "snapshot_read_store"):
        for clients in (8, 64):
            row = part[f"{workload}_{clients}_clients"]
            assert row["without_per_s"] > 0 and row["with_per_s"] > 0
            # The server with --metrics was scraped while measured.
            assert row["scrapes"] >= 1 and row["scrape_bytes"] > 0
            assert row["scrape_ms_p50"] > 0
    assert part["counting_ns_per_request"] > 0


def compare_trees(module: str, out: Path, *options: str) -> dict[str, Any]:
    """Run a two-tree comparison of HEAD against this checkout; its figures,
    after checking both trees are named and the revision's worktree is gone."""
    subprocess.run(
        [sys.executable, "-m", module, "HEAD", *options, "--json", str(out)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=True,
        capture_output=True,
        timeout=300,
    )
    figures: dict[str, Any] = json.loads(out.read_text())
    base, new = figures["trees"]["base"], figures["trees"]["new"]
    assert base["revision"] == "HEAD" and Path(new["path"]) == ROOT
    assert not Path(base["path"]).exists()
    listed = subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "list"], check=True, capture_output=True, text=True
    )
    assert base["path"] not in listed.stdout
    return figures


def test_trees_compares_a_revision_with_this_checkout_each_from_its_own_tree(
    tmp_path: Path,
) -> None:
    figures = compare_trees(
        "bench.trees",
        tmp_path / "trees.json",
        *("--workload", "origin_write_copy", "--clients", "2", "--rounds", "2", "--count", "40"),
    )
    assert figures["workload"] == "origin_write_copy"
    for tree in figures["trees"].values():
        assert len(tree["cpu_us"]) == len(tree["per_s"]) == 2
        assert all(cpu > 0 for cpu in tree["cpu_us"]) and all(rate > 0 for rate in tree["per_s"])


def test_gateway_trees_writes_into_a_snapshot_through_each_trees_gateway(
    tmp_path: Path,
) -> None:
    figures = compare_trees(
        "bench.gateway_trees",
        tmp_path / "gateway_trees.json",
        *("--size", "4096", "--rounds", "2", "--count", "8"),
    )
    assert (figures["size"], figures["depth"], figures["count"]) == (4096, 1, 8)
    for tree in figures["trees"].values():
        assert len(tree["per_s"]) == len(tree["fsyncs_per_write"]) == 2
        assert all(rate > 0 for rate in tree["per_s"])
        # Every write is the first into its chunk: each copies, and its
        # commit is synced before the write is answered.
        assert all(fsyncs >= 1.0 for fsyncs in tree["fsyncs_per_write"])


def test_gateway_trees_writes_into_the_origin_copying_each_chunk_out(tmp_path: Path) -> None:
    figures = compare_trees(
        "bench.gateway_trees",
        tmp_path / "gateway_trees.json",
        *("--origin", "--size", "4096", "--rounds", "2", "--count", "8"),
    )
    assert (figures["export"], figures["size"], figures["count"]) == ("origin", 4096, 8)
    for tree in figures["trees"].values():
        assert all(rate > 0 for rate in tree["per_s"])
        # One at a time, each the first write into its chunk since the
        # snapshot: each is a copy-out, committed before it is answered (a
        # write into a chunk already unique would need no sync at all).
        assert all(fsyncs >= 1.0 for fsyncs in tree["fsyncs_per_write"])


def test_gateway_trees_backs_up_a_half_copied_snapshot_through_each_trees_gateway(
    tmp_path: Path,
) -> None:
    figures = compare_trees(
        "bench.gateway_trees",
        tmp_path / "gateway_trees.json",
        *("--backup", "--count", "64", "--rounds", "2", "--passes", "2"),
    )
    assert (figures["count"], figures["backup_passes"]) == (64, 2)
    for tree in figures["trees"].values():
        assert len(tree["per_s"]) == len(tree["query_maps_per_pass"]) == 2
        assert all(rate > 0 for rate in tree["per_s"])
        assert all(ms > 0 for ms in tree["gateway_ms_per_pass"] + tree["csnapd_ms_per_pass"])
        # Half the chunks are still shared with the origin: each pass reads
        # them unlocked and asks csnapd to confirm them.
        assert all(asked >= 1 for asked in tree["query_maps_per_pass"])


def test_gateway_trees_reads_a_copied_snapshot_through_each_trees_gateway(
    tmp_path: Path,
) -> None:
    figures = compare_trees(
        "bench.gateway_trees",
        tmp_path / "gateway_trees.json",
        *("--reads", "--count", "64", "--rounds", "2", "--passes", "2"),
    )
    assert (figures["count"], figures["depth"], figures["read_passes"]) == (64, 16, 2)
    for tree in figures["trees"].values():
        assert len(tree["per_s"]) == len(tree["query_owneds_per_pass"]) == 2
        assert all(rate > 0 for rate in tree["per_s"])
        # Each pass is a new connection: it learns the one window of its map.
        assert tree["query_owneds_per_pass"] == [1, 1]


def test_gateway_trees_rewrites_unique_origin_chunks_through_each_trees_gateway(
    tmp_path: Path,
) -> None:
    figures = compare_trees(
        "bench.gateway_trees",
        tmp_path / "gateway_trees.json",
        *("--rewrites", "--count", "64", "--rounds", "2", "--passes", "2"),
    )
    assert (figures["count"], figures["depth"], figures["rewrite_passes"]) == (64, 16, 2)
    assert figures["export"] == "origin"
    for tree in figures["trees"].values():
        assert len(tree["per_s"]) == len(tree["query_writes_per_pass"]) == 2
        assert all(rate > 0 for rate in tree["per_s"])
        assert all(ms > 0 for ms in tree["gateway_ms_per_pass"])
        # The untimed writes copied every chunk out: the gateway knows each
        # unique, so a rewrite asks csnapd nothing.
        assert tree["query_writes_per_pass"] == [0, 0]


def test_a_csnapd_started_inside_a_checkout_runs_that_checkouts_code(tmp_path: Path) -> None:
    # Why bench.trees starts each csnapd elsewhere: `python -m` looks in the
    # current directory first, whatever PYTHONPATH says.
    from bench.trees import csnapd_source

    other = tmp_path / "other"
    (other / "csnapd").mkdir(parents=True)
    (other / "csnapd" / "__init__.py").write_text("")
    assert csnapd_source(other, ROOT) == ROOT / "csnapd"
    assert csnapd_source(other, tmp_path) == other / "csnapd"


def test_scratch_directories_are_absolute_under_a_relative_bench_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Unix socket paths are made from it, and qemu-nbd refuses relative ones.
    from bench.common import scratch_directory

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for setting, parent in (("runs", tmp_path / "runs"), ("", None)):
        monkeypatch.setenv("CSNAP_BENCH_DIR", setting)
        with scratch_directory("csnap-bench-") as made:
            path = Path(made)
            assert path.is_absolute() and path.is_dir()
            assert path.name.startswith("csnap-bench-")
            if parent is not None:
                assert path.parent == parent
