"""The csnap:diff:TAG metadata contexts, seen through real clients: nbdinfo
maps exactly the chunks written between two snapshots, on snapshot and
origin exports; the contexts are listed one per live snapshot, and csnapd's
own changelist (query_changes) agrees with what the gateway serves.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from csnap_nbd.wire import handshake as hs
from csnap_nbd.wire.constants import Option, Reply
from tests.nbd.rawclient import RawClient
from tests.nbd.support import (
    CHUNK,
    ORIGIN_SIZE,
    Gateway,
    chunks_of,
    gateway,
    mapped_chunks,
    need,
    qemu_io,
    run,
)

pytestmark = [pytest.mark.e2e]


async def write_all(gw: Gateway, export: str, writes: list[tuple[int, int]], byte: int) -> None:
    commands = [f"write -P {byte:#x} {offset} {length}" for offset, length in writes]
    await run(*qemu_io(gw.url(export), *commands))


async def diff_map(gw: Gateway, export: str, base: int) -> set[int]:
    """The chunks nbdinfo's map of csnap:diff:`base` on `export` marks."""
    return await mapped_chunks(gw.url(export, unix=True), f"csnap:diff:{base}")


async def changelist(gw: Gateway, view: int | None, base: int | None) -> set[int]:
    """csnapd's own answer, asked in steps from where each reply stopped."""
    chunks: set[int] = set()
    async with gw.client(view) as client:
        start: int | None = 0
        total = ORIGIN_SIZE // CHUNK
        for _ in range(total):
            if start is None:
                break
            ranges, start = await client.changes(base, start, total - start)
            chunks |= {c for first, count in ranges for c in range(first, first + count)}
        assert start is None
    return chunks


async def test_diff_maps_mark_exactly_the_chunks_written_between_snapshots(
    tmp_path: Path,
) -> None:
    need("qemu-io", "nbdinfo")
    async with gateway(tmp_path) as gw:
        before = [(0, 2 * CHUNK), (700 * CHUNK, 5)]
        between = [(3 * CHUNK, CHUNK), (100 * CHUNK + 17, 100), (2000 * CHUNK, 40 * CHUNK)]
        after = [(3 * CHUNK, 10), (3000 * CHUNK - 1, 2), (4095 * CHUNK, CHUNK)]
        await write_all(gw, "origin", before, 0x11)
        await gw.create(1)
        await write_all(gw, "origin", between, 0x22)
        await gw.create(2)
        await write_all(gw, "origin", after, 0x33)

        assert await diff_map(gw, "snap-2", 1) == chunks_of(between)
        assert await diff_map(gw, "snap-1", 2) == chunks_of(between)
        assert await diff_map(gw, "origin", 2) == chunks_of(after)
        assert await diff_map(gw, "origin", 1) == chunks_of(between) | chunks_of(after)
        assert await diff_map(gw, "snap-2", 2) == set()
        assert await changelist(gw, 2, 1) == chunks_of(between)
        assert await changelist(gw, None, 1) == chunks_of(between) | chunks_of(after)

        # A write to snapshot 2 makes it differ from snapshot 1 there too,
        # and from the origin; snapshot 1 and the origin are as they were.
        own = [(1500 * CHUNK + 3, 1)]
        await write_all(gw, "snap-2", own, 0x44)
        assert await diff_map(gw, "snap-2", 1) == chunks_of(between) | chunks_of(own)
        assert await diff_map(gw, "origin", 2) == chunks_of(after) | chunks_of(own)
        assert await diff_map(gw, "origin", 1) == chunks_of(between) | chunks_of(after)


async def test_diff_contexts_are_listed_per_live_snapshot(tmp_path: Path) -> None:
    need("nbdinfo")
    async with gateway(tmp_path) as gw:
        await gw.create(3)
        await gw.create(7)
        listed = json.loads((await run("nbdinfo", "--list", "--json", gw.tcp)).stdout)
        for export in listed["exports"]:
            assert sorted(export["contexts"]) == [
                "base:allocation",
                "csnap:diff:3",
                "csnap:diff:7",
                "csnap:exceptions",
            ]

        client = await RawClient.unix(gw.socket)
        try:
            await client.greet()
            assert (await client.option(Option.STRUCTURED_REPLY))[-1][0] == Reply.ACK

            async def names(opt: int, queries: list[str]) -> list[bytes]:
                replies = await client.option(opt, hs.meta_context_request("snap-3", queries))
                assert replies[-1][0] == Reply.ACK, replies
                return [p[4:] for r, p in replies if r == Reply.META_CONTEXT]

            listing, setting = Option.LIST_META_CONTEXT, Option.SET_META_CONTEXT
            assert await names(listing, ["csnap:diff:"]) == [b"csnap:diff:3", b"csnap:diff:7"]
            assert await names(listing, ["csnap:diff:7"]) == [b"csnap:diff:7"]
            # Only live snapshots are bases; a tag is written one way only.
            assert await names(listing, ["csnap:diff:9", "csnap:diff:03"]) == []
            assert await names(setting, ["csnap:diff:"]) == []
            assert await names(setting, ["csnap:diff:7", "base:allocation"]) == [
                b"base:allocation",
                b"csnap:diff:7",
            ]
        finally:
            await client.aclose()

        await gw.delete(3)
        listed = json.loads((await run("nbdinfo", "--list", "--json", gw.tcp)).stdout)
        assert "csnap:diff:3" not in listed["exports"][0]["contexts"]
        refused = await run("nbdinfo", "--map=csnap:diff:3", gw.url("snap-7"), check=False)
        assert refused.returncode != 0
