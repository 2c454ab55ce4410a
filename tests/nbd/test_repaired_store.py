"""After csnap-check --repair has marked a damaged leaf's chunks lost, a real
NBD client reading a snapshot through csnapd and csnap-nbd gets EIO for
exactly those chunks (with a log line saying which), and the snapshot's own
data everywhere else.
"""

from __future__ import annotations

from pathlib import Path

import trio

from tests.crash.repair_support import (
    build,
    check_cli,
    erase_journal_copies,
    flip,
    lost_chunks,
    tree,
)
from tests.e2e.processes import start_csnapd
from tests.engine.helpers import pattern
from tests.nbd.support import need, qemu_io, run, start_gateway, stop


async def test_a_lost_chunk_reads_as_eio_through_nbd(tmp_path: Path) -> None:
    need("qemu-io")
    built = build(tmp_path)
    _, children = tree(built)
    address, lo, hi = children[len(children) // 2]
    flip(built.store, address * built.g.block_size + 2000)
    erase_journal_copies(built, address)
    code, report = await trio.to_thread.run_sync(check_cli, built.store, "--repair")
    assert code == 1, report
    lost = lost_chunks(report)
    tag = min(lost)
    bad = min(lost[tag])
    good = next(c for c in range(built.g.origin_chunks) if not lo <= c < hi)
    size = built.g.chunk_size

    csnapd, _, port = await start_csnapd(built.store, built.origin, tmp_path / "csnapd.log")
    nbd = None
    try:
        nbd, urls = await start_gateway(
            tmp_path,
            "--listen",
            "127.0.0.1:0",
            "--origin",
            str(built.origin),
            "--store",
            str(built.store),
            server=f"127.0.0.1:{port}",
        )
        url = f"{urls[0]}/snap-{tag}"
        failed = await run(*qemu_io(url, f"read {bad * size} {size}", read_only=True), check=False)
        assert "Input/output error" in failed.stdout + failed.stderr, failed
        # The first 32 bytes of a chunk outside the damaged leaf: its own data.
        read = await run(*qemu_io(url, f"read -v {good * size} 32", read_only=True))
        dumped = bytes(
            int(word, 16)
            for line in read.stdout.splitlines()
            if line[:8].isalnum() and line[8:9] == ":"
            for word in line[9:].split()[:16]
            if len(word) == 2
        )
        assert dumped == pattern(good, built.versions[tag][good], size)[:32], read.stdout
    finally:
        with trio.CancelScope(shield=True):
            if nbd is not None:
                await stop(nbd)
            await stop(csnapd)
    log = (tmp_path / "nbd.log").read_text()
    assert f"snap-{tag} failed" in log and "was lost" in log, log[-3000:]
