"""The operator's delaying work queue (kubetune.workqueue): ordering, coalescing, one worker per key."""

from __future__ import annotations

import asyncio

from kubetune.workqueue import WorkQueue


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def _get_now(queue: WorkQueue[str]) -> str | None:
    """The key `get` returns without waiting, or None if it would wait."""
    try:
        return await asyncio.wait_for(queue.get(), timeout=0.05)
    except TimeoutError:
        return None


def test_keys_come_out_in_due_order_and_only_when_due() -> None:
    async def scenario() -> None:
        clock = Clock()
        queue: WorkQueue[str] = WorkQueue(clock)
        queue.add("late", 30)
        queue.add("soon", 5)
        queue.add("now")
        assert await _get_now(queue) == "now"
        assert await _get_now(queue) is None  # "soon" is 5 s away
        clock.now += 5
        assert await _get_now(queue) == "soon"
        clock.now += 25
        assert await _get_now(queue) == "late"
        assert len(queue) == 3  # all three handed out, none done yet

    asyncio.run(scenario())


def test_adding_again_keeps_the_earlier_time() -> None:
    async def scenario() -> None:
        clock = Clock()
        queue: WorkQueue[str] = WorkQueue(clock)
        queue.add("job", 60)
        queue.add("job", 0.5)  # a watch event: sooner wins
        queue.add("job", 120)  # a later requeue does not postpone it
        assert await _get_now(queue) is None
        clock.now += 0.5
        assert await _get_now(queue) == "job"
        queue.done("job")
        assert await _get_now(queue) is None  # one entry, not three
        clock.now += 1000
        assert await _get_now(queue) is None
        assert len(queue) == 0

    asyncio.run(scenario())


def test_a_key_added_while_held_comes_back_after_done_and_never_twice_at_once() -> None:
    async def scenario() -> None:
        clock = Clock()
        queue: WorkQueue[str] = WorkQueue(clock)
        queue.add("job")
        assert await _get_now(queue) == "job"
        queue.add("job")  # an event while a worker reconciles it
        assert await _get_now(queue) is None  # not handed to a second worker
        queue.done("job", requeue=60)
        assert await _get_now(queue) == "job"  # the event's time, not the 60 s requeue
        queue.done("job", requeue=60)
        assert await _get_now(queue) is None
        clock.now += 60
        assert await _get_now(queue) == "job"

    asyncio.run(scenario())


def test_forget_drops_a_waiting_key() -> None:
    async def scenario() -> None:
        clock = Clock()
        queue: WorkQueue[str] = WorkQueue(clock)
        queue.add("gone")
        queue.add("kept", 1)
        queue.forget("gone")
        assert "gone" not in queue
        clock.now += 1
        assert await _get_now(queue) == "kept"
        queue.add("gone", 5)  # added again after forget: a normal entry
        clock.now += 5
        assert await _get_now(queue) == "gone"

    asyncio.run(scenario())


def test_a_waiting_worker_wakes_when_an_earlier_key_arrives() -> None:
    async def scenario() -> None:
        queue: WorkQueue[str] = WorkQueue()
        queue.add("resync", 3600)
        getter = asyncio.ensure_future(queue.get())
        await asyncio.sleep(0.01)
        assert not getter.done()
        queue.add("event")
        assert await asyncio.wait_for(getter, timeout=1) == "event"

    asyncio.run(scenario())


def test_many_workers_share_keys_without_overlap() -> None:
    async def scenario() -> None:
        queue: WorkQueue[int] = WorkQueue()
        held: set[int] = set()
        handled: list[int] = []

        async def worker() -> None:
            while True:
                key = await queue.get()
                assert key not in held
                held.add(key)
                await asyncio.sleep(0)
                held.discard(key)
                handled.append(key)
                queue.done(key)

        for key in range(200):
            queue.add(key)
            queue.add(key % 7)  # duplicates coalesce or come back after done
        workers = [asyncio.ensure_future(worker()) for _ in range(8)]
        for _ in range(100):
            await asyncio.sleep(0.001)
            if len(queue) == 0:
                break
        for task in workers:
            task.cancel()
        assert len(queue) == 0
        assert set(handled) == set(range(200))

    asyncio.run(scenario())
