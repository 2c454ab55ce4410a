"""contrib/grafana/csnap.json queries only metrics docs/operations.md lists,
each as its type allows (a histogram by its _bucket, _sum or _count series),
and is a dashboard Grafana can import: unique panel ids, every query with a
data source and a refId.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from tests.ops.metrics_support import documented_metrics

DASHBOARD = Path(__file__).resolve().parents[2] / "contrib" / "grafana" / "csnap.json"
#: Metric names in a PromQL expression (labels and functions are not these).
_METRIC = re.compile(r"\b((?:csnapd|csnap_agent|csnap_nbd|process)_\w+)")
_HISTOGRAM_SERIES = ("_bucket", "_sum", "_count")


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    panels = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


def _queries(dashboard: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in _panels(dashboard) for t in p.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        if isinstance(query, dict):
            exprs.append(query["query"])
    return exprs


def _family(series: str, documented: dict[str, tuple[str, str, set[str]]]) -> str:
    """The documented family a series in a query belongs to."""
    if series in documented and documented[series][0] != "histogram":
        return series
    for suffix in _HISTOGRAM_SERIES:
        base = series.removesuffix(suffix)
        if base != series and documented.get(base, ("",))[0] == "histogram":
            return base
    raise AssertionError(f"{series} is not a metric docs/operations.md lists (or not as queried)")


def test_dashboard_queries_only_documented_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    documented = documented_metrics()
    queried: set[str] = set()
    for expr in _queries(dashboard):
        names = _METRIC.findall(expr)
        assert names, f"a query that reads no csnap metric: {expr}"
        queried.update(_family(name, documented) for name in names)
    # It shows every service's main families.
    for name in ("csnapd_requests_total", "csnap_agent_servers", "csnap_nbd_requests_total"):
        assert name in queried


def test_dashboard_is_importable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = _panels(dashboard)
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for panel in panels:
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"]), panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        refs = [target["refId"] for target in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]
    names = {variable["name"] for variable in dashboard["templating"]["list"]}
    assert {"datasource", "instance"} <= names
