"""Deadline: a due time that moves freely and fires once, on time, on the real event loop."""

from __future__ import annotations

import asyncio

import pytest

from lb.timers import Deadline


class Calls:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.at: list[float] = []

    def __call__(self) -> None:
        self.at.append(self.loop.time())


async def test_a_deadline_fires_once_at_its_due_time() -> None:
    loop = asyncio.get_running_loop()
    calls = Calls(loop)
    deadline = Deadline(loop, calls)
    start = loop.time()
    deadline.set_in(0.05)
    await asyncio.sleep(0.2)
    assert len(calls.at) == 1
    assert calls.at[0] - start >= 0.05 - 0.002
    assert deadline.due is None


async def test_moving_a_deadline_later_delays_the_callback_to_the_new_time() -> None:
    loop = asyncio.get_running_loop()
    calls = Calls(loop)
    deadline = Deadline(loop, calls)
    start = loop.time()
    deadline.set_in(0.05)
    await asyncio.sleep(0.03)
    deadline.set_in(0.1)  # now due at about start + 0.13
    await asyncio.sleep(0.05)
    assert calls.at == []  # the first timer fired and re-armed itself
    await asyncio.sleep(0.15)
    assert len(calls.at) == 1
    assert calls.at[0] - start >= 0.13 - 0.002


async def test_moving_a_deadline_earlier_fires_at_the_earlier_time() -> None:
    loop = asyncio.get_running_loop()
    calls = Calls(loop)
    deadline = Deadline(loop, calls)
    start = loop.time()
    deadline.set_in(5.0)
    deadline.set_in(0.05)
    await asyncio.sleep(0.2)
    assert len(calls.at) == 1
    assert calls.at[0] - start < 1.0
    deadline.cancel()


async def test_a_disarmed_or_cancelled_deadline_never_calls_back() -> None:
    loop = asyncio.get_running_loop()
    calls = Calls(loop)
    disarmed = Deadline(loop, calls)
    disarmed.set_in(0.03)
    disarmed.set(None)
    cancelled = Deadline(loop, calls)
    cancelled.set_in(0.03)
    cancelled.cancel()
    await asyncio.sleep(0.15)
    assert calls.at == []


async def test_a_deadline_disarmed_then_set_again_fires_for_the_new_time_only() -> None:
    loop = asyncio.get_running_loop()
    calls = Calls(loop)
    deadline = Deadline(loop, calls)
    deadline.set_in(0.03)
    deadline.set(None)
    await asyncio.sleep(0.06)  # the armed timer fires once, with nothing due
    start = loop.time()
    deadline.set_in(0.05)
    await asyncio.sleep(0.2)
    assert len(calls.at) == 1
    assert calls.at[0] - start >= 0.05 - 0.002


async def test_moving_a_deadline_later_many_times_arms_one_loop_timer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    loop = asyncio.get_running_loop()
    armed: list[float] = []
    real_call_at = loop.call_at

    def counting_call_at(when: float, callback: object, *args: object) -> asyncio.TimerHandle:
        armed.append(when)
        return real_call_at(when, callback, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(loop, "call_at", counting_call_at)
    deadline = Deadline(loop, Calls(loop))
    for _ in range(1000):
        deadline.set_in(30.0)
        deadline.set(None)
    deadline.cancel()
    assert len(armed) == 1
