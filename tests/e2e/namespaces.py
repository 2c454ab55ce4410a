"""Hosts for cluster tests: network namespaces the test creates, each joined
by a veth pair to a bridge in the root namespace whose address carries
etcd. Creating them needs root; a test fails, never skips, without it.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import pytest

from csnap_common.credentials import store_credentials
from tests.e2e.processes import Daemon, start


def ip(*args: str) -> None:
    """Run `ip ARGS`; the test fails with ip's message if it does."""
    result = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        pytest.fail(f"ip {' '.join(args)}: {result.stderr.strip()} (the test runs as root)")


@dataclass
class Host:
    """A network namespace with one address on the test's bridge."""

    namespace: str
    #: The root namespace's end of its veth pair: down means partitioned.
    link: str
    address: str


@contextmanager
def hosts(count: int) -> Iterator[tuple[str, list[Host]]]:
    """A bridge with an address, and `count` namespaces on it; all removed at the end."""
    if os.geteuid() != 0:
        pytest.fail("network namespaces need root: run the suite as root")
    tag = f"{os.getpid() % 100000}"
    subnet = f"10.{200 + os.getpid() % 50}.{os.getpid() % 250}"
    bridge = f"csbr{tag}"
    made: list[Host] = []
    try:
        ip("link", "add", bridge, "type", "bridge")
        ip("addr", "add", f"{subnet}.1/24", "dev", bridge)
        ip("link", "set", bridge, "up")
        for number in range(count):
            host = Host(f"csns{tag}n{number}", f"csv{tag}n{number}", f"{subnet}.{number + 2}")
            ip("netns", "add", host.namespace)
            made.append(host)
            ip(
                "link",
                "add",
                host.link,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                host.namespace,
            )
            ip("link", "set", host.link, "master", bridge, "up")
            inside = ("netns", "exec", host.namespace, "ip")
            ip(*inside, "addr", "add", f"{host.address}/24", "dev", "eth0")
            ip(*inside, "link", "set", "eth0", "up")
            ip(*inside, "link", "set", "lo", "up")
        yield f"{subnet}.1", made
    finally:
        for host in made:
            subprocess.run(["ip", "netns", "del", host.namespace], check=False)
        subprocess.run(["ip", "link", "del", bridge], check=False, capture_output=True)


def kill_host(host: Host) -> list[int]:
    """SIGKILL every process in the host's namespace at once, as a node losing
    power; returns their pids."""
    listed = subprocess.run(
        ["ip", "netns", "pids", host.namespace], capture_output=True, text=True, check=False
    )
    pids = [int(word) for word in listed.stdout.split()]
    for pid in pids:
        # One may have exited on its own meanwhile.
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return pids


def inside(host: Host) -> tuple[str, ...]:
    """The prefix that runs a command in `host`."""
    return ("ip", "netns", "exec", host.namespace)


async def start_agent_in(host: Host, etcd_url: str, sock: Path, name: str, ttl: int,
                         log: Path) -> Daemon:  # fmt: skip
    """Node `name`'s agent in `host`, on etcd at `etcd_url`, serving `sock`."""
    return await start(
        ["csnap_agent", "--socket", str(sock), "--etcd-endpoints", etcd_url, "--node", name,
         "--lease-ttl", str(ttl), "--log-format", "json"],
        log,
        prefix=inside(host),
    )  # fmt: skip


async def start_candidate_in(host: Host, sock: Path, store: Path, origin: Path, log: Path,
                             extra: Sequence[str] = ()) -> Daemon:  # fmt: skip
    """A csnapd candidate in `host` for `store`, registered with the agent at
    `sock`, on the cluster's credentials (off loopback csnapd makes none itself)."""
    server = await start(
        ["csnapd", str(store), str(origin), "--agent", str(sock),
         "--listen", f"{host.address}:0", "--credentials", str(store_credentials(store)),
         "--log-format", "json", *extra],
        log,
        prefix=inside(host),
    )  # fmt: skip
    word, _, _address = server.first_line.partition(" ")
    assert word == "listening", server.first_line
    return server
