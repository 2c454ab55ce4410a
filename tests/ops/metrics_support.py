"""Scraping a service's /metrics with a real HTTP client and reading it with
prometheus_client's own text parser; the docs' table of every metric.
"""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

import trio
from prometheus_client.parser import text_string_to_metric_families

from tests.docs_tables import marked_table
from tests.e2e.processes import poll
from tests.ops.support import LIMIT, Service

#: Families only some set-ups expose (a coordinator that fences).
OPTIONAL = {"csnap_agent_fencing_token"}
#: The service column of docs/operations.md's metrics table.
SERVICES = ("csnapd", "csnap-agent", "csnap-nbd")


@dataclass(frozen=True)
class Scrape:
    """One scrape: every sample, and the names of the families exposed."""

    samples: dict[tuple[str, frozenset[tuple[str, str]]], float]
    families: dict[str, str]

    def value(self, name: str, **labels: str) -> float:
        """The sample `name` with exactly these labels (0 if absent)."""
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def total(self, name: str, **labels: str) -> float:
        """The sum of the samples `name` whose labels include these."""
        wanted = set(labels.items())
        return sum(v for (n, got), v in self.samples.items() if n == name and wanted <= got)


def exposed_name(name: str, kind: str) -> str:
    """A family's name as a query uses it: counters with their _total."""
    return f"{name}_total" if kind == "counter" and not name.endswith("_total") else name


async def scrape(url: str) -> Scrape:
    """GET `url` with urllib (in a thread) and parse it."""

    def fetch() -> tuple[str, str]:
        with urllib.request.urlopen(url, timeout=LIMIT) as response:
            return response.headers["Content-Type"], response.read().decode()

    content_type, text = await trio.to_thread.run_sync(fetch)
    assert content_type.startswith("text/plain"), content_type
    samples = {}
    families = {}
    for family in text_string_to_metric_families(text):
        families[exposed_name(family.name, family.type)] = family.type
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return Scrape(samples, families)


async def scrape_until(url: str, check: Callable[[Scrape], bool]) -> Scrape:
    """Scrape `url` until `check` holds (for what another process does next)."""
    found: list[Scrape] = []

    async def holds() -> bool:
        found.append(await scrape(url))
        return check(found[-1])

    with trio.fail_after(LIMIT):
        await poll(holds)
    return found[-1]


async def read_lines(service: Service, count: int) -> list[str]:
    """The first `count` lines the service prints on stdout."""
    return [await service.first_line() for _ in range(count)]


def metrics_url(lines: list[str]) -> str:
    """The URL of the "metrics URL" line among a service's first lines."""
    found = [line.split(" ", 1)[1] for line in lines if line.startswith("metrics ")]
    assert len(found) == 1, lines
    return found[0]


def documented_metrics() -> dict[str, tuple[str, str, set[str]]]:
    """docs/operations.md's metrics table: name -> (type, service, labels)."""
    out = {}
    for name, kind, labels, service, _meaning in marked_table("operations.md", "metrics"):
        out[name.strip("`")] = (kind, service, set(re.findall(r"`(\w+)`", labels)))
    return out


def assert_documented(found: Scrape, service: str) -> None:
    """What `service` exposes is exactly the docs' rows for it (and for "all")."""
    documented = {
        name: row for name, row in documented_metrics().items() if row[1] in (service, "all")
    }
    exposed = set(found.families)
    assert exposed - set(documented) == set(), "exposed but not in docs/operations.md"
    assert set(documented) - exposed - OPTIONAL == set(), "documented but not exposed"
    for name, kind in found.families.items():
        assert documented[name][0] == kind, name
    for name, labels in found.samples:
        family = next(
            f for f in documented if name == f or name.startswith(f.removesuffix("_total") + "_")
        )
        assert {k for k, _ in labels} - {"le"} <= documented[family][2], (name, labels)
