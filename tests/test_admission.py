"""Tests for lb.admission: the bounded FIFO queue in front of a full pool."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from lb.admission import AdmissionQueue
from lb.errors import Rejected

# Loop turns granted for queued tasks to reach their next await; far more than any test needs.
MAX_TURNS = 50


def make_queue(
    *,
    max_queue: int = 10,
    timeout_s: float = 30.0,
    reject_status: int = 503,
    retry_after_s: int = 1,
) -> AdmissionQueue:
    return AdmissionQueue(
        max_queue=max_queue,
        timeout_s=timeout_s,
        reject_status=reject_status,
        retry_after_s=retry_after_s,
    )


async def turns_until(predicate: Callable[[], bool]) -> bool:
    """Let the loop run until ``predicate`` holds, for at most ``MAX_TURNS`` turns."""
    for _ in range(MAX_TURNS):
        if predicate():
            return True
        await asyncio.sleep(0)
    return predicate()


class Waiters:
    """Named tasks waiting in one queue, and the order in which they got their turn."""

    def __init__(self, queue: AdmissionQueue) -> None:
        self.queue = queue
        self.woken: list[str] = []
        self.tasks: dict[str, asyncio.Task[None]] = {}

    async def add(self, name: str, *, front: bool = False) -> asyncio.Task[None]:
        """Start a waiter and return once it stands in the queue."""
        before = len(self.queue)
        task = asyncio.create_task(self._wait(name, front))
        self.tasks[name] = task
        assert await turns_until(lambda: len(self.queue) == before + 1)
        return task

    async def _wait(self, name: str, front: bool) -> None:
        await self.queue.wait(front=front)
        self.woken.append(name)

    async def until_woken(self, count: int) -> bool:
        """Let the loop run until ``count`` waiters have had their turn (bounded)."""
        return await turns_until(lambda: len(self.woken) >= count)

    async def cancel_all(self) -> None:
        for task in self.tasks.values():
            task.cancel()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)


async def test_waiters_are_woken_one_by_one_in_arrival_order() -> None:
    """Three waiters get their turns in the order they arrived, one per wake_one."""
    queue = make_queue()
    waiters = Waiters(queue)
    for name in ("a", "b", "c"):
        await waiters.add(name)
    for expected in (["a"], ["a", "b"], ["a", "b", "c"]):
        queue.wake_one()
        assert await waiters.until_woken(len(expected))
        await asyncio.sleep(0)  # give any wrongly woken waiter the chance to show itself
        assert waiters.woken == expected
    assert len(queue) == 0
    assert queue.admitted == 3


async def test_wake_one_on_an_empty_queue_does_nothing() -> None:
    """Waking an empty queue neither fails nor lets the next arrival straight through."""
    queue = make_queue()
    queue.wake_one()
    waiters = Waiters(queue)
    await waiters.add("a")
    await asyncio.sleep(0)
    assert waiters.woken == []
    await waiters.cancel_all()


async def test_full_queue_rejects_with_the_configured_status_and_retry_after() -> None:
    """A request arriving at a full queue is rejected at once with status and Retry-After."""
    queue = make_queue(max_queue=2, reject_status=429, retry_after_s=7)
    waiters = Waiters(queue)
    await waiters.add("a")
    await waiters.add("b")
    with pytest.raises(Rejected) as caught:
        await queue.wait()
    assert caught.value.status == 429
    assert caught.value.headers == [b"retry-after: 7\r\n"]
    assert queue.rejected_full == 1
    assert len(queue) == 2
    await waiters.cancel_all()


async def test_queue_of_size_zero_rejects_every_request() -> None:
    """With max_queue 0 nothing may wait: every wait is rejected."""
    queue = make_queue(max_queue=0)
    with pytest.raises(Rejected):
        await queue.wait()
    assert len(queue) == 0


async def test_wait_that_expires_is_rejected_and_leaves_the_queue() -> None:
    """A waiter not woken within queue_timeout_s is rejected and no longer queued."""
    queue = make_queue(timeout_s=0.05, reject_status=503, retry_after_s=2)
    with pytest.raises(Rejected) as caught:
        await queue.wait()
    assert caught.value.status == 503
    assert caught.value.headers == [b"retry-after: 2\r\n"]
    assert queue.rejected_timeout == 1
    assert len(queue) == 0
    assert queue.admitted == 0


async def test_cancelled_waiter_leaves_the_queue() -> None:
    """Cancelling a queued request (client gone) takes it out of the queue."""
    queue = make_queue()
    waiters = Waiters(queue)
    task = await waiters.add("a")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(queue) == 0


async def test_cancelled_waiter_is_never_woken_and_its_turn_goes_to_the_next() -> None:
    """After the first waiter is cancelled, the next wake_one goes to the second."""
    queue = make_queue()
    waiters = Waiters(queue)
    first = await waiters.add("a")
    await waiters.add("b")
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    assert len(queue) == 1
    queue.wake_one()
    assert await turns_until(lambda: waiters.woken == ["b"])
    assert len(queue) == 0


async def test_waiter_cancelled_after_being_woken_passes_its_turn_on() -> None:
    """A waiter woken but cancelled before it ran hands its turn to the next waiter."""
    queue = make_queue()
    waiters = Waiters(queue)
    first = await waiters.add("a")
    await waiters.add("b")
    queue.wake_one()  # the turn is given to "a"...
    first.cancel()  # ...whose client goes away before "a" runs again
    with pytest.raises(asyncio.CancelledError):
        await first
    woken = await turns_until(lambda: waiters.woken == ["b"])
    await waiters.cancel_all()
    assert woken, "the freed slot was lost: 'b' is still waiting"


async def test_front_waiter_jumps_the_line() -> None:
    """A waiter queued with front=True is woken before those already waiting."""
    queue = make_queue()
    waiters = Waiters(queue)
    await waiters.add("a")
    await waiters.add("b")
    await waiters.add("c", front=True)
    queue.wake_one()
    assert await turns_until(lambda: len(waiters.woken) == 1)
    assert waiters.woken == ["c"]
    await waiters.cancel_all()


async def test_front_waiter_is_queued_even_when_the_queue_is_full() -> None:
    """A request re-queued at the front (it was woken once already) is never rejected as full."""
    queue = make_queue(max_queue=1)
    waiters = Waiters(queue)
    await waiters.add("a")
    await waiters.add("b", front=True)
    assert len(queue) == 2
    assert queue.rejected_full == 0
    await waiters.cancel_all()
