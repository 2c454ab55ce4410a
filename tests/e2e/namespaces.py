"""Hosts for cluster tests: network namespaces the test creates, each joined
by a veth pair to a bridge in the root namespace whose address carries
etcd. Creating them needs root; a test fails, never skips, without it.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass

import pytest


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
