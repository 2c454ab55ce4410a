"""Snapshot reads placed from the gateway's owned map (docs/rules.md, "stable
owned addresses", "verified origin reads"): two gateways serve one snapshot,
one writes it while the other reads it from its map, and no read sent after
a write was acknowledged returns what that write replaced; a deleted
snapshot's addresses are never read again, even once its store chunks hold
another snapshot's data; origin chunks read without read locks while the
other gateway writes the origin are always the snapshot's, several reads in
flight sharing each confirmation; a full store squashes another snapshot
rather than one whose reader holds its owned map, and once squashed, a
snapshot's chunks are never read through it again.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import pytest
import trio

from csnap_nbd.wire.constants import Command
from tests.e2e.processes import Daemon, poll
from tests.nbd.rawclient import RawClient
from tests.nbd.support import (
    CHUNK,
    ORIGIN_SIZE,
    Gateway,
    gateway,
    need,
    origin_image,
    qemu_io,
    run,
    start_gateway,
    stop,
)

pytestmark = [pytest.mark.e2e]

#: Chunks the tests use: the first half copied for snapshot 1 alone, the
#: second half copied for snapshots 1 and 2 together.
CHUNKS = 128
ALONE = range(CHUNKS // 2)
SHARED = range(CHUNKS // 2, CHUNKS)
WRITE_ROUNDS = 12
CHUNKS_PER_ROUND = 8


@asynccontextmanager
async def second_gateway(gw: Gateway, directory: Path) -> AsyncIterator[Path]:
    """Another csnap-nbd on the same csnapd and files; yields its Unix socket."""
    await trio.Path(directory).mkdir()
    sock = directory / "nbd.sock"
    daemon: Daemon | None = None
    try:
        daemon, _ = await start_gateway(
            directory,
            *("--unix", str(sock), "--origin", str(gw.origin), "--store", str(gw.store)),
            server=f"127.0.0.1:{gw.csnapd_port}",
        )
        yield sock
    finally:
        with trio.CancelScope(shield=True):
            if daemon is not None:
                await stop(daemon)


async def export(stack: AsyncExitStack, sock: Path, name: str) -> RawClient:
    """A raw NBD client on export `name`, closed when `stack` closes."""
    client = await RawClient.unix(sock)
    stack.push_async_callback(client.aclose)
    await client.go(name, structured=False)
    return client


async def write_chunks(client: RawClient, chunks: dict[int, bytes]) -> None:
    """Write each chunk (all in flight at once) and wait for every reply."""
    for chunk, data in chunks.items():
        await client.request(Command.WRITE, chunk * CHUNK, CHUNK, cookie=chunk, payload=data)
    for _ in chunks:
        answer = await client.answer()
        assert answer.error == 0, answer


def filled(chunks: range, byte: bytes) -> dict[int, bytes]:
    return dict.fromkeys(chunks, byte * CHUNK)


async def read_chunk(client: RawClient, chunk: int, cookie: int = 1) -> tuple[int, bytes]:
    await client.request(Command.READ, chunk * CHUNK, CHUNK, cookie=cookie)
    answer = await client.answer(CHUNK)
    return answer.error, answer.data


async def server_requests(gw: Gateway) -> int:
    requests = (await gw.server_info())["requests"]
    assert isinstance(requests, int)
    return requests


async def test_owned_map_reads_see_every_write_of_another_gateway(tmp_path: Path) -> None:
    image = origin_image()
    original = {c: image[c * CHUNK : (c + 1) * CHUNK] for c in range(CHUNKS)}
    async with gateway(tmp_path, image=image) as gw, AsyncExitStack() as stack:
        origin = await export(stack, gw.socket, "origin")
        await gw.create(1)
        await write_chunks(origin, filled(ALONE, b"\x11"))
        await gw.create(2)
        await write_chunks(origin, filled(SHARED, b"\x22"))

        async with second_gateway(gw, tmp_path / "b") as other:
            reader = await export(stack, gw.socket, "snap-1")
            for c in range(CHUNKS):
                assert await read_chunk(reader, c) == (0, original[c]), c
            # Warm: chunks owned alone are read without asking csnapd (the
            # count moves only by keepalives and the admin's own request).
            before = await server_requests(gw)
            for c in ALONE:
                assert await read_chunk(reader, c) == (0, original[c]), c
            assert await server_requests(gw) - before < len(ALONE) // 4

            # history[c]: every value chunk c had; acked[c]: the index of the
            # newest one whose write was acknowledged.
            history = {c: [original[c]] for c in range(CHUNKS)}
            acked = dict.fromkeys(range(CHUNKS), 0)
            checked = 0

            async def check_reads(client: RawClient, seed: int, done: trio.Event) -> None:
                nonlocal checked
                rng = random.Random(seed)
                while not done.is_set():
                    c = rng.randrange(CHUNKS)
                    floor = acked[c]
                    error, data = await read_chunk(client, c)
                    assert error == 0
                    assert data in history[c][floor:], (
                        f"chunk {c}: a read sent after write {floor} was acknowledged"
                        " returned older data"
                    )
                    checked += 1

            writer = await export(stack, other, "snap-1")
            done = trio.Event()
            async with trio.open_nursery() as nursery:
                for seed in range(3):
                    nursery.start_soon(
                        check_reads, await export(stack, gw.socket, "snap-1"), seed, done
                    )
                rng = random.Random(7)
                for number in range(1, WRITE_ROUNDS + 1):
                    chosen = rng.sample(list(ALONE), CHUNKS_PER_ROUND // 2)
                    chosen += rng.sample(list(SHARED), CHUNKS_PER_ROUND // 2)
                    writes = {c: bytes([number, c % 256]) * (CHUNK // 2) for c in chosen}
                    for c, data in writes.items():
                        history[c].append(data)
                    await write_chunks(writer, writes)
                    for c in chosen:
                        acked[c] = len(history[c]) - 1
                    # Straight after the acknowledgement, on the other gateway.
                    for c in chosen:
                        assert await read_chunk(reader, c) == (0, writes[c]), c
                done.set()
            assert checked > 0
            # csnapd agrees with what the reading gateway returns.
            for c in range(CHUNKS):
                assert await read_chunk(reader, c) == (0, history[c][-1]), c


async def test_a_deleted_snapshots_addresses_are_never_read_again(tmp_path: Path) -> None:
    image = origin_image()
    original = {c: image[c * CHUNK : (c + 1) * CHUNK] for c in range(CHUNKS)}
    async with gateway(tmp_path, image=image) as gw, AsyncExitStack() as stack:
        origin = await export(stack, gw.socket, "origin")
        await gw.create(1)
        await write_chunks(origin, filled(range(CHUNKS), b"\x11"))

        async with second_gateway(gw, tmp_path / "b") as other:
            readers = [await export(stack, gw.socket, "snap-1") for _ in range(3)]
            for c in range(CHUNKS):
                assert await read_chunk(readers[0], c) == (0, original[c]), c
            results: list[tuple[int, int, bytes]] = []

            async def read_until_gone(client: RawClient, seed: int) -> None:
                rng = random.Random(seed)
                with trio.move_on_after(30):
                    while True:
                        c = rng.randrange(CHUNKS)
                        try:
                            error, data = await read_chunk(client, c)
                        except Exception:  # the export ended: the gateway hung up
                            return
                        results.append((c, error, data))
                        if error:
                            return

            async with trio.open_nursery() as nursery:
                for seed, reader in enumerate(readers):
                    nursery.start_soon(read_until_gone, reader, seed)
                await trio.sleep(0.2)
                await gw.delete(1)
                # Snapshot 2's copy-outs go into chunks freed by the sweep:
                # they hold 0x11, which snapshot 1 never held.
                await gw.create(2)
                writer = await export(stack, other, "origin")
                for _ in range(3):
                    await write_chunks(writer, filled(range(CHUNKS), b"\x33"))
                    async with gw.admin() as admin:
                        if not (await admin.status()).deleting:
                            break
                    await trio.sleep(0.5)
            assert results, "no read ran"
            assert any(error for _, error, _ in results), "no read failed after the delete"
            for c, error, data in results:
                assert error or data == original[c], f"chunk {c}: a read returned other data"


async def test_origin_reads_without_locks_never_return_an_origin_write(tmp_path: Path) -> None:
    image = origin_image()
    original = {c: image[c * CHUNK : (c + 1) * CHUNK] for c in range(CHUNKS)}
    async with gateway(tmp_path, image=image) as gw, AsyncExitStack() as stack:
        await gw.create(1)
        async with second_gateway(gw, tmp_path / "b") as other:
            checked = 0

            async def check_reads(client: RawClient, seed: int, done: trio.Event) -> None:
                nonlocal checked
                rng = random.Random(seed)
                while not done.is_set():
                    # Several chunks per read, so reads cross chunks still
                    # shared and chunks copied meanwhile; several reads in
                    # flight, so one confirmation covers several of them.
                    firsts = {cookie: rng.randrange(CHUNKS - 4) for cookie in range(1, 5)}
                    for cookie, c in firsts.items():
                        await client.request(Command.READ, c * CHUNK, 4 * CHUNK, cookie=cookie)
                    for _ in firsts:
                        answer = await client.answer(dict.fromkeys(firsts, 4 * CHUNK))
                        assert answer.error == 0
                        c = firsts[answer.cookie]
                        expected = b"".join(original[k] for k in range(c, c + 4))
                        assert answer.data == expected, f"chunks {c}..{c + 3}: not the snapshot's"
                        checked += 1

            writer = await export(stack, other, "origin")
            done = trio.Event()
            async with trio.open_nursery() as nursery:
                for seed in range(3):
                    nursery.start_soon(
                        check_reads, await export(stack, gw.socket, "snap-1"), seed, done
                    )
                rng = random.Random(11)
                order = list(range(CHUNKS))
                rng.shuffle(order)
                for number in range(0, CHUNKS, 4):
                    chosen = order[number : number + 4]
                    await write_chunks(writer, {c: bytes([number % 256]) * CHUNK for c in chosen})
                    await trio.sleep(0.005)
                done.set()
            assert checked > 0


#: A store with room for two and a half copies of the origin (as in
#: tests/nbd/test_store_full.py): every third whole-origin write squashes.
SQUASH_STORE_SIZE = 44 << 20


async def snapshot_states(gw: Gateway) -> dict[int, str]:
    async with gw.admin() as admin:
        return {s["tag"]: s["state"] for s in await admin.list_snapshots()}


async def test_a_squash_never_takes_a_snapshot_under_its_owned_map_readers(
    tmp_path: Path,
) -> None:
    need("qemu-io")
    image = origin_image()
    original = {c: image[c * CHUNK : (c + 1) * CHUNK] for c in range(CHUNKS)}
    async with (
        gateway(tmp_path, image=image, store_size=SQUASH_STORE_SIZE) as gw,
        AsyncExitStack() as stack,
    ):

        async def write_origin(byte: int) -> None:
            await run(*qemu_io(gw.url(), f"write -P {byte:#x} 0 {ORIGIN_SIZE}"))

        async with gw.admin() as admin:
            await admin.create_snapshot(1, -100)  # the first a full store squashes
        await write_origin(0x11)  # the whole origin copied for snapshot 1
        reader = await export(stack, gw.socket, "snap-1")
        for c in range(CHUNKS):
            assert await read_chunk(reader, c) == (0, original[c]), c
        # Warm: its chunks are read from the owned map, without csnapd.
        before = await server_requests(gw)
        for c in range(CHUNKS):
            assert await read_chunk(reader, c) == (0, original[c]), c
        assert await server_requests(gw) - before < CHUNKS // 4

        async with gw.admin() as admin:
            await admin.create_snapshot(2, -100)
        await write_origin(0x22)  # copies for snapshot 2: the store is nearly full
        async with gw.admin() as admin:
            await admin.create_snapshot(3, 0)
        # Snapshot 3's copies need room: snapshot 1 is the most expendable,
        # but its reader is connected, so snapshot 2 goes instead.
        await write_origin(0x33)
        assert await snapshot_states(gw) == {1: "live", 2: "squashed", 3: "live"}
        # The addresses the reader's map holds are still snapshot 1's own.
        for c in range(CHUNKS):
            assert await read_chunk(reader, c) == (0, original[c]), c

        # Once its reader has gone, snapshot 1 is expendable again.
        await reader.aclose()

        async def no_snapshot_client() -> bool:
            return (await gw.server_info())["snapshot_clients"] == 0

        with trio.fail_after(30):
            await poll(no_snapshot_client)
        async with gw.admin() as admin:
            await admin.change_use_count(3, 1)  # in use: never squashed
            await admin.create_snapshot(4, 0)
        # Snapshot 4's copies (the origin's 0x33) go into the chunks snapshot
        # 1's squash freed: a new reader of snapshot 1 gets an error, never them.
        await write_origin(0x44)
        assert await snapshot_states(gw) == {1: "squashed", 2: "squashed", 3: "live", 4: "live"}
        gone = await run(*qemu_io(gw.url("snap-1"), "read 0 4096", read_only=True), check=False)
        assert gone.returncode != 0, gone
        assert "snapshot 1 was squashed" in gw.log(), gw.log()
        assert "read 4096/4096" not in gone.stdout, gone
