"""The engine task waits for the clients of the recent commits, briefly, so
that clients taking turns share one sync (csnapd.group_commit)."""

from __future__ import annotations

import trio
import trio.testing

from csnap_protocol import Keepalive, Role
from csnapd.batch import Item, Peer, Received
from csnapd.group_commit import LINGER_FRACTION, MAX_LINGER, Gathering


def _peers(count: int) -> list[Peer]:
    return [Peer(n, Role.CLIENT, f"client {n}") for n in range(count)]


def _from(peer: Peer) -> Received:
    return Received(peer, Keepalive(1))


def test_a_lone_client_and_a_first_batch_never_wait() -> None:
    gathering = Gathering()
    [alone] = _peers(1)
    assert gathering.linger([_from(alone)]) == (0, 0.0)
    gathering.committed([_from(alone)], 0.01)
    assert gathering.linger([_from(alone)]) == (0, 0.0)


def test_a_batch_waits_for_the_missing_clients_of_the_last_commits() -> None:
    gathering = Gathering()
    peers = _peers(8)
    # Two groups taking turns, each committing on its own.
    gathering.committed([_from(p) for p in peers[:4]], 0.001)
    gathering.committed([_from(p) for p in peers[4:]], 0.001)
    missing, seconds = gathering.linger([_from(peers[0])])
    assert missing == 7
    assert 0 < seconds <= min(MAX_LINGER, 0.001 * LINGER_FRACTION)
    # Only the last two commits count: an old group is not waited for.
    gathering.committed([_from(peers[0])], 0.001)
    gathering.committed([_from(peers[1])], 0.001)
    assert gathering.linger([_from(peers[0])])[0] == 1


def test_a_batch_that_commits_nothing_forgets_whom_to_wait_for() -> None:
    gathering = Gathering()
    peers = _peers(8)
    gathering.committed([_from(p) for p in peers], 0.001)
    assert gathering.linger([_from(peers[0])])[0] == 7
    # Lookups, or clients gone since: later batches do not wait for them.
    gathering.nothing_committed()
    assert gathering.linger([_from(peers[0])]) == (0, 0.0)


def test_more_stops_when_every_client_is_back_or_the_time_is_up() -> None:
    peers = _peers(3)
    gathering = Gathering()
    gathering.committed([_from(p) for p in peers], 1.0)

    async def main() -> None:
        send, receive = trio.open_memory_channel[Item](10)
        batch: list[Item] = [_from(peers[0])]
        async with trio.open_nursery() as nursery:

            async def arrive() -> None:
                for peer in peers[1:]:
                    await trio.sleep(0.0001)
                    await send.send(_from(peer))
                await send.send(_from(peers[0]))  # after the gathering ends

            nursery.start_soon(arrive)
            await gathering.more(batch, receive, 100)
            assert [item.peer for item in batch if isinstance(item, Received)] == peers
        # Nobody else is coming: the wait ends within its bound.
        batch = [_from(peers[0])]
        started = trio.current_time()
        await gathering.more(batch, receive, 100)
        assert trio.current_time() - started <= MAX_LINGER + 1e-9
        assert len(batch) == 2  # the one left in the channel, then the time ran out

    # Virtual time: the waits are exact whatever the machine is doing.
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
