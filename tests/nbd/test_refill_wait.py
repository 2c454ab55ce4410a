"""The gathered writes' wait for a client's refill (csnap_nbd.gathered,
RefillWait), on trio's mock clock: it waits only just after a batch's
answers and only while the queue is below its depth in the cycle before;
it ends as soon as the queue is full again, a batch is whole or the reader
stopped, one gap after the writes stop, or at MOST_LINGER; what it costs a
client that never refills is the same for every batch, however many came
before; and a queue that shrinks pays in one cycle only."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing

from csnap_nbd.gathered import MOST_LINGER, REFILL_GAP, REFILL_WINDOW, RefillWait


class _Client:
    """A connection's requests in flight, and its gatherer's wait."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.batch_full = False
        self.wait = RefillWait(lambda: self.in_flight, lambda: self.batch_full)

    def send(self, count: int = 1) -> None:
        for _ in range(count):
            self.in_flight += 1
            self.wait.added()

    def answer_all(self) -> None:
        self.in_flight = 0
        self.wait.answered()

    async def lingered(self) -> float:
        """How long one linger took."""
        start = trio.current_time()
        await self.wait.linger()
        return trio.current_time() - start

    async def lingered_while(self, feed: Callable[[], Awaitable[None]]) -> float:
        """How long one linger took while `feed` sent writes."""
        took = 0.0

        async def linger() -> None:
            nonlocal took
            took = await self.lingered()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(linger)
            await feed()
        return took

    def trickle(self, count: int, every: float) -> Callable[[], Awaitable[None]]:
        """A feed: `count` writes, one `every` seconds."""

        async def feed() -> None:
            for _ in range(count):
                await trio.sleep(every)
                self.send()

        return feed


def _run(test: Callable[[], Awaitable[None]]) -> None:
    trio.run(test, clock=trio.testing.MockClock(autojump_threshold=0))


def _queue_of(depth: int) -> _Client:
    """A client whose last cycles had `depth` requests in flight, just answered."""
    client = _Client()
    for _ in range(3):
        client.send(depth)
        client.answer_all()
    return client


def test_a_refill_is_waited_for_until_the_queue_is_full_again() -> None:
    async def main() -> None:
        client = _queue_of(16)
        client.send()  # the first refill: it would go alone
        took = await client.lingered_while(client.trickle(15, REFILL_GAP / 10))
        # It ended when the 16th came, not at a look at the count.
        assert took == pytest.approx(15 * REFILL_GAP / 10)

    _run(main)


def test_a_wait_ends_when_the_writes_stop_coming() -> None:
    async def main() -> None:
        client = _queue_of(16)
        client.send()
        took = await client.lingered_while(client.trickle(1, REFILL_GAP / 2))
        # At the first look at the count that finds no new write: the
        # second, since the first found the one.
        assert took == pytest.approx(2 * REFILL_GAP)
        assert 2 * REFILL_GAP < MOST_LINGER

    _run(main)


def test_a_steady_trickle_waits_at_most_the_bound() -> None:
    async def main() -> None:
        client = _queue_of(1000)
        client.send()
        took = await client.lingered_while(client.trickle(100, REFILL_GAP / 2))
        assert took == pytest.approx(MOST_LINGER)

    _run(main)


def test_a_client_that_refills_after_all_its_replies_loses_one_gap_per_batch() -> None:
    """Writes left over from a batch cut short wait for no refill, since the
    client sends none until they are answered: each batch costs that client
    one gap, the hundredth as the first."""

    async def main() -> None:
        client = _queue_of(16)
        costs = []
        for _ in range(100):
            client.send(16)
            client.in_flight = 4  # 12 answered, 4 left over
            client.wait.answered()
            costs.append(await client.lingered())
            client.answer_all()
            await trio.sleep(REFILL_WINDOW)
        assert costs == pytest.approx([REFILL_GAP] * 100)

    _run(main)


def test_a_queue_that_shrinks_pays_in_one_cycle_only() -> None:
    async def main() -> None:
        client = _queue_of(16)
        costs = []
        for _ in range(5):  # one write in flight from now on
            client.send()
            costs.append(await client.lingered())
            client.answer_all()
        assert costs == pytest.approx([REFILL_GAP, 0, 0, 0, 0])

        # Down to 8, refilled one by one: the first cycle waits for a 16th
        # that never comes, the next ones fill to 8 and go at once.
        client = _queue_of(16)
        costs = []
        for _ in range(4):
            client.send()
            costs.append(await client.lingered_while(client.trickle(7, REFILL_GAP / 20)))
            client.answer_all()
        assert costs == pytest.approx([2 * REFILL_GAP] + [7 * REFILL_GAP / 20] * 3)

    _run(main)


def test_a_whole_batch_or_a_stopped_reader_ends_the_wait_at_once() -> None:
    async def main() -> None:
        for ending in ("batch", "reader"):
            client = _queue_of(16)
            client.send()

            async def feed(client: _Client = client, ending: str = ending) -> None:
                await client.trickle(1, REFILL_GAP / 10)()
                await trio.sleep(REFILL_GAP / 10)
                if ending == "batch":
                    client.batch_full = True
                    client.send()
                else:
                    client.wait.closed()

            took = await client.lingered_while(feed)
            assert took == pytest.approx(2 * REFILL_GAP / 10), ending
            # And a whole batch or a stopped reader is not waited on at all.
            client.answer_all()
            client.send()
            assert await client.lingered() == 0, ending

    _run(main)


def test_no_wait_for_one_request_in_flight_a_full_queue_or_a_write_long_after() -> None:
    async def main() -> None:
        alone = _queue_of(1)
        for _ in range(10):
            alone.send()
            assert await alone.lingered() == 0
            alone.answer_all()

        full = _queue_of(16)
        full.send(16)
        assert await full.lingered() == 0

        later = _queue_of(16)
        await trio.sleep(REFILL_WINDOW)
        later.send()
        assert await later.lingered() == 0

    _run(main)
