"""The speed targets' check (bench.targets): which figure each reads, the
direction of each goal, and a part that did not run or failed."""

from __future__ import annotations

from typing import Any

from bench.targets import TARGETS, evaluate, targets_table


def _rows(parts: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {row["target"]: row for row in evaluate(parts)}


def test_each_target_reads_its_figure_and_compares_it_the_right_way() -> None:
    parts = {
        "nbd": {
            "ratios": {
                "qcow2": {"rewrite": 1.25, "snapshot_read": 0.8, "first_write": 2.0},
                "file": {"rewrite": 0.4},
            },
            "round_ratios": {"qcow2": {"rewrite": [0.9, 1.25, 1.4, None, 1.0]}},
            "csnap": {"peak_rss_kib": {"csnap-nbd": {"max": 51_200}}},
        },
        "server": {
            "origin_write_unique_8_clients": {
                "server_requests_per_s": 10_000.0,
                "round_server_requests_per_s": [9_000.0, 10_000.0, 21_000.0],
            },
            "origin_write_copy_1_clients": {"fsyncs_per_reply": 1.0},
            "snapshot_write_1_clients": {"fsyncs_per_reply": 2.0},
            "origin_write_copy_8_clients": {"chunks_per_s": 6_000, "replies_per_fsync": None},
            "csnapd_peak_rss_kib": 60_000,
        },
    }
    rows = _rows(parts)
    rewrite = rows["rewrites vs qemu-nbd + qcow2"]
    assert (rewrite["measured"], rewrite["reached"], rewrite["shown"]) == (1.25, True, "1.25x")
    assert rows["rewrites vs nbdkit file"]["reached"] is False
    assert rows["snapshot 4 KiB reads vs qcow2"]["of_goal"] == 0.8
    # Exactly at the goal reaches it.
    assert rows["first writes (durable) vs qcow2"]["reached"] is True
    checks = rows["csnapd already-unique checks, 8 clients"]
    assert (checks["reached"], checks["of_goal"], checks["shown"]) == (False, 0.5, "10,000/s")
    assert rows["csnapd copy-outs, 8 clients"]["reached"] is True
    # At most one fsync per reply: two is half way, one is reached.
    snapshot = rows["fsyncs per snapshot write that copies, 1 client"]
    assert (snapshot["reached"], snapshot["of_goal"]) == (False, 0.5)
    assert rows["fsyncs per origin copy-out, 1 client"]["reached"] is True
    # A figure the run could not give (no fsync counted) is not measured.
    assert rows["csnapd replies per fsync, 8 clients"]["measured"] is None
    # Figures missing from a part are not measured either.
    assert rows["backup of a whole snapshot vs qcow2"]["shown"] == "not measured"
    assert rows["csnap-nbd peak RSS, nbd part"]["shown"] == "50.0 MiB"
    assert rows["csnapd peak RSS, nbd part"]["measured"] is None
    assert rows["csnapd peak RSS, server part"]["measured"] == 60_000


def test_rounds_show_their_spread_and_how_many_reached_the_goal() -> None:
    parts = {
        "nbd": {
            "ratios": {"qcow2": {"rewrite": 1.25, "snapshot_read": 0.8}},
            # A round a peer could not give (None) is left out; exactly at
            # the goal reaches it.
            "round_ratios": {"qcow2": {"rewrite": [0.9, 1.25, 1.4, None, 1.0]}},
        },
        "server": {
            "origin_write_unique_8_clients": {
                "server_requests_per_s": 10_000.0,
                "round_server_requests_per_s": [9_000.0, 10_000.0, 21_000.0],
            },
            "origin_write_copy_1_clients": {"fsyncs_per_reply": 1.0},
        },
    }
    rows = _rows(parts)
    rewrite = rows["rewrites vs qemu-nbd + qcow2"]
    assert rewrite["rounds"] == [0.9, 1.25, 1.4, 1.0]
    assert (rewrite["rounds_reached"], rewrite["rounds_shown"]) == (3, "0.90x to 1.40x, 3 of 4")
    checks = rows["csnapd already-unique checks, 8 clients"]
    assert checks["rounds_shown"] == "9,000/s to 21,000/s, 1 of 3"
    # No rounds kept for the figure: nothing to show.
    reads = rows["snapshot 4 KiB reads vs qcow2"]
    assert (reads["rounds"], reads["rounds_shown"]) == (None, "-")
    assert rows["fsyncs per origin copy-out, 1 client"]["rounds_shown"] == "-"
    text = targets_table(list(rows.values()), quick=False)
    assert "0.90x to 1.40x, 3 of 4" in text and "how many reached the goal" in text


def test_parts_that_did_not_run_or_failed_measure_nothing() -> None:
    rows = evaluate({"server": {"error": "Traceback ..."}})
    assert len(rows) == len(TARGETS) + 3
    assert all(row["measured"] is None and row["reached"] is None for row in rows)
    text = targets_table(rows, quick=False)
    assert text.count("not measured") == len(rows)
    assert "quick" not in text
    assert "smoke-test sizes" in targets_table(rows, quick=True)


def test_a_figure_just_short_of_its_goal_never_reads_as_the_goal() -> None:
    parts = {
        "nbd": {"ratios": {"qcow2": {"first_write": 1.9995044, "rewrite": 1.004}}},
        "server": {"origin_write_unique_8_clients": {"server_requests_per_s": 19_999.6}},
    }
    rows = _rows(parts)
    first = rows["first writes (durable) vs qcow2"]
    assert (first["shown"], first["reached"]) == ("1.9995x", False)
    checks = rows["csnapd already-unique checks, 8 clients"]
    assert (checks["shown"], checks["reached"]) == ("19,999.6/s", False)
    # Reached, or plainly apart from the goal: the usual decimals.
    assert rows["rewrites vs qemu-nbd + qcow2"]["shown"] == "1.00x"
