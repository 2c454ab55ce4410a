"""--log-format=json on every service while it does real work (an agent,
csnapd registered with it, the NBD gateway; snapshots created and deleted,
NBD clients reading a snapshot, an administrator's shutdown): every line
of stderr is one JSON object with only documented fields, the important
events are there with their ids, and docs/operations.md ("Logs") lists
exactly the fields and events the code writes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import trio

from csnap_common.logs import FIELDS, NO_EVENT
from tests.docs_tables import marked_table
from tests.e2e.processes import ROOT, csnap
from tests.nbd.support import run
from tests.ops.support import LIMIT, make_store, running

pytestmark = pytest.mark.e2e

CORE = ("time", "level", "service", "logger", "event", "message")
LEVELS = {"debug", "info", "warning", "error", "critical"}
SOURCES = ("csnapd", "csnap_agent", "csnap_nbd", "csnap_client", "csnap_common")


def documented_events() -> dict[str, tuple[set[str], set[str], set[str]]]:
    """event -> (services, ids always present, ids present when they apply)."""
    events = {}
    for name, services, ids, _what in marked_table("operations.md", "log_events"):
        always = set(re.findall(r"(?<!\()`(\w+)`(?!\))", ids))
        sometimes = set(re.findall(r"\(`(\w+)`\)", ids))
        events[name.strip("`")] = (set(services.replace(" ", "").split(",")), always, sometimes)
    return events


def read_json_lines(log: Path) -> list[dict[str, Any]]:
    lines = [line for line in log.read_text().splitlines() if line]
    assert lines, f"{log} is empty"
    parsed = []
    for line in lines:
        record = json.loads(line)  # every line is JSON: nothing else on stderr
        assert isinstance(record, dict), line
        parsed.append(record)
    return parsed


def check_record(record: dict[str, Any], service: str) -> None:
    assert set(record) <= set(FIELDS), record
    assert all(key in record for key in CORE), record
    assert record["service"] == service, record
    assert record["level"] in LEVELS, record
    assert datetime.fromisoformat(record["time"]).utcoffset() is not None, record
    assert record["message"], record


def by_event(records: list[dict[str, Any]], event: str) -> list[dict[str, Any]]:
    return [r for r in records if r["event"] == event]


async def test_every_service_writes_json_lines_while_it_works(tmp_path: Path) -> None:
    assert shutil.which("nbdinfo"), "nbdinfo is missing: scripts/test installs libnbd-bin"
    store, origin = make_store(tmp_path)
    sock = tmp_path / "agent.sock"
    logs = {name: tmp_path / f"{name}.log" for name in ("csnap-agent", "csnapd", "csnap-nbd")}
    json_flag = "--log-format=json"
    async with running(
        ["csnap_agent", "--socket", str(sock), json_flag], logs["csnap-agent"]
    ) as agent:
        await agent.first_line()
        async with running(
            ["csnapd", str(store), str(origin), "--agent", str(sock), json_flag], logs["csnapd"]
        ) as csnapd:
            address = (await csnapd.first_line()).removeprefix("listening ")
            for tag in ("1", "2"):
                created = await csnap(sock, "create", tag)
                assert created.returncode == 0, created.stderr
            async with running(
                ["csnap_nbd", "--agent", str(sock), "--listen", "127.0.0.1:0", json_flag],
                logs["csnap-nbd"],
            ) as nbd:
                url = (await nbd.first_line()).removeprefix("listening ")
                size = await run("nbdinfo", "--size", f"{url}/snap-1")
                assert int(size.stdout) == 16 << 20
                await run("nbdinfo", "--size", url)
                deleted = await csnap(sock, "delete", "2")
                assert deleted.returncode == 0, deleted.stderr
                assert await nbd.terminate() == 0
            done = await csnap(sock, "shutdown")
            assert done.returncode == 0, done.stderr
            with trio.fail_after(LIMIT):
                assert await csnapd.process.wait() == 0
        assert await agent.terminate() == 0

    records = {service: read_json_lines(log) for service, log in logs.items()}
    events = documented_events()
    for service, lines in records.items():
        for record in lines:
            check_record(record, service)
            if record["event"] != NO_EVENT:
                assert record["event"] in events, record
                services, always, _sometimes = events[record["event"]]
                assert service in services, record
                assert always <= set(record), (record, always)

    server, gateway, node = records["csnapd"], records["csnap-nbd"], records["csnap-agent"]
    [opened] = by_event(server, "store.opened")
    assert opened["store"] == str(store) and opened["transactions"] >= 0
    assert [r["address"] for r in by_event(server, "server.standby")] == [address]
    assert [r["snapshot"] for r in by_event(server, "snapshot.created")] == [1, 2]
    assert [r["snapshot"] for r in by_event(server, "snapshot.deleted")] == [2]
    connected = by_event(server, "client.connected")
    gone = by_event(server, "client.gone")
    assert {r["connection"] for r in gone} <= {r["connection"] for r in connected}
    assert {r["role"] for r in connected} == {"client", "admin"}
    assert all(isinstance(r["locks"], int) for r in gone)
    identified = by_event(server, "client.identified")
    assert any(r.get("snapshot") == 1 for r in identified)
    assert all(r["client"].startswith("0x") for r in identified)
    assert by_event(server, "server.stopping") and by_event(server, "store.closed")

    assert [r["address"] for r in by_event(node, "server.active")] == [address]
    assert [r["address"] for r in by_event(node, "server.lost")] == [address]
    assert by_event(node, "agent.listening")[0]["address"] == str(sock)

    exports = [(r["export"], r.get("snapshot")) for r in by_event(gateway, "nbd.connected")]
    assert exports == [("snap-1", 1), ("origin", None)]
    assert by_event(gateway, "gateway.listening")[0]["address"] == url
    assert len(by_event(gateway, "nbd.disconnected")) == 2
    assert by_event(gateway, "gateway.stopping")


def test_the_docs_list_every_field_and_every_event() -> None:
    fields = [row[0].strip("`") for row in marked_table("operations.md", "log_fields")]
    assert fields == list(FIELDS)
    in_code = set()
    for package in SOURCES:
        for path in (ROOT / package).rglob("*.py"):
            in_code |= set(re.findall(r'"event": "([\w.]+)"', path.read_text()))
    assert in_code == set(documented_events())


CRASH = """
import warnings
from csnap_common.cli import configure_logging
configure_logging("info", "json", service="csnapd")
warnings.warn("a deprecated thing")
raise RuntimeError("boom")
"""


def test_warnings_and_an_uncaught_error_are_json_lines_too() -> None:
    result = subprocess.run(
        [sys.executable, "-c", CRASH],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 1
    warning, crash = (json.loads(line) for line in result.stderr.splitlines())
    for record in (warning, crash):
        check_record(record, "csnapd")
    assert warning["level"] == "warning" and "a deprecated thing" in warning["message"]
    assert crash["event"] == "service.crashed" and crash["level"] == "critical"
    assert crash["error"].splitlines()[-1] == "RuntimeError: boom"
