"""Deadlines: a due time that moves freely and fires once, on time, on the real event loop;
on a loop timer of its own (Deadline) or on a timer wheel shared by many (WheelDeadline)."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable

import pytest

from lb.timers import SLACK_S, TICK_S, Deadline, TimerWheel, WheelDeadline

MakeDeadline = Callable[[asyncio.AbstractEventLoop, Callable[[], None]], Deadline | WheelDeadline]


@pytest.fixture(params=["own loop timer", "timer wheel"])
def make_deadline(request: pytest.FixtureRequest) -> MakeDeadline:
    if request.param == "own loop timer":
        return Deadline
    wheels: dict[int, TimerWheel] = {}

    def on_wheel(loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> WheelDeadline:
        wheel = wheels.setdefault(id(loop), TimerWheel(loop))
        return WheelDeadline(wheel, callback)

    return on_wheel


class Calls:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.at: list[float] = []

    def __call__(self) -> None:
        self.at.append(self.loop.time())


async def test_a_deadline_fires_once_at_its_due_time(make_deadline: MakeDeadline) -> None:
    loop = asyncio.get_running_loop()
    calls = Calls(loop)
    deadline = make_deadline(loop, calls)
    start = loop.time()
    deadline.set_in(0.05)
    await asyncio.sleep(0.2)
    assert len(calls.at) == 1
    assert calls.at[0] - start >= 0.05 - 0.002
    assert deadline.due is None


async def test_moving_a_deadline_later_delays_the_callback_to_the_new_time(
    make_deadline: MakeDeadline,
) -> None:
    loop = asyncio.get_running_loop()
    calls = Calls(loop)
    deadline = make_deadline(loop, calls)
    start = loop.time()
    deadline.set_in(0.05)
    await asyncio.sleep(0.03)
    deadline.set_in(0.1)  # now due at about start + 0.13
    await asyncio.sleep(0.05)
    assert calls.at == []  # the first timer fired and re-armed itself
    await asyncio.sleep(0.15)
    assert len(calls.at) == 1
    assert calls.at[0] - start >= 0.13 - 0.002


async def test_moving_a_deadline_earlier_fires_at_the_earlier_time(
    make_deadline: MakeDeadline,
) -> None:
    loop = asyncio.get_running_loop()
    calls = Calls(loop)
    deadline = make_deadline(loop, calls)
    start = loop.time()
    deadline.set_in(5.0)
    deadline.set_in(0.05)
    await asyncio.sleep(0.2)
    assert len(calls.at) == 1
    assert calls.at[0] - start < 1.0
    deadline.cancel()


async def test_a_disarmed_or_cancelled_deadline_never_calls_back(
    make_deadline: MakeDeadline,
) -> None:
    loop = asyncio.get_running_loop()
    calls = Calls(loop)
    disarmed = make_deadline(loop, calls)
    disarmed.set_in(0.03)
    disarmed.set(None)
    cancelled = make_deadline(loop, calls)
    cancelled.set_in(0.03)
    cancelled.cancel()
    await asyncio.sleep(0.15)
    assert calls.at == []


async def test_a_deadline_disarmed_then_set_again_fires_for_the_new_time_only(
    make_deadline: MakeDeadline,
) -> None:
    loop = asyncio.get_running_loop()
    calls = Calls(loop)
    deadline = make_deadline(loop, calls)
    deadline.set_in(0.03)
    deadline.set(None)
    await asyncio.sleep(0.06)  # the armed timer fires once, with nothing due
    start = loop.time()
    deadline.set_in(0.05)
    await asyncio.sleep(0.2)
    assert len(calls.at) == 1
    assert calls.at[0] - start >= 0.05 - 0.002


async def test_moving_a_deadline_later_many_times_arms_one_loop_timer(
    make_deadline: MakeDeadline, monkeypatch: pytest.MonkeyPatch
) -> None:
    loop = asyncio.get_running_loop()
    armed = counting_call_at(loop, monkeypatch)
    deadline = make_deadline(loop, Calls(loop))
    for _ in range(1000):
        deadline.set_in(30.0)
        deadline.set(None)
    deadline.cancel()
    assert len(armed) == 1


def counting_call_at(
    loop: asyncio.AbstractEventLoop, monkeypatch: pytest.MonkeyPatch
) -> list[float]:
    """Patches ``loop.call_at`` to note every loop timer armed; returns the notes."""
    armed: list[float] = []
    real_call_at = loop.call_at

    def call_at(when: float, callback: object, *args: object) -> asyncio.TimerHandle:
        armed.append(when)
        return real_call_at(when, callback, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(loop, "call_at", call_at)
    return armed


async def test_a_thousand_deadlines_due_in_one_tick_share_one_loop_timer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    loop = asyncio.get_running_loop()
    armed = counting_call_at(loop, monkeypatch)
    wheel = TimerWheel(loop)
    calls = Calls(loop)
    start = loop.time()
    deadlines = [WheelDeadline(wheel, calls) for _ in range(1000)]
    for deadline in deadlines:
        deadline.set(start + 0.05)
    assert len(armed) == 1
    await asyncio.sleep(0.2)
    assert len(calls.at) == 1000
    assert min(calls.at) - start >= 0.05 - 0.002
    assert len(wheel) == 0


async def test_a_cancelled_wheel_deadline_leaves_the_wheel_at_once() -> None:
    """A closed connection is not held by the wheel until its tick comes."""
    loop = asyncio.get_running_loop()
    wheel = TimerWheel(loop)
    deadlines = [WheelDeadline(wheel, Calls(loop)) for _ in range(100)]
    for deadline in deadlines:
        deadline.set_in(30.0)
    assert len(wheel) == 100
    for deadline in deadlines[:60]:
        deadline.cancel()
    for deadline in deadlines[60:]:
        deadline.close()
    assert len(wheel) == 0


async def test_wheel_deadlines_fire_in_order_each_at_or_after_its_due_time() -> None:
    loop = asyncio.get_running_loop()
    wheel = TimerWheel(loop)
    fired: list[tuple[str, float]] = []
    start = loop.time()
    for name, delay in (("b", 0.05), ("a", 0.02), ("c", 0.08)):
        deadline = WheelDeadline(wheel, lambda name=name: fired.append((name, loop.time())))
        deadline.set(start + delay)
    await asyncio.sleep(0.25)
    assert [name for name, _ in fired] == ["a", "b", "c"]
    for (_, at), delay in zip(fired, (0.02, 0.05, 0.08), strict=True):
        assert at - start >= delay - 0.002
        assert at - start < delay + 0.1  # late by about a tick (TICK_S), not by a timeout


async def test_a_failing_callback_does_not_stop_the_others_due_in_its_tick(
    caplog: pytest.LogCaptureFixture,
) -> None:
    loop = asyncio.get_running_loop()
    wheel = TimerWheel(loop)
    calls = Calls(loop)

    def fail() -> None:
        raise RuntimeError("owner bug")

    due = loop.time() + 0.02
    WheelDeadline(wheel, fail).set(due)
    WheelDeadline(wheel, calls).set(due)
    with caplog.at_level(logging.ERROR, logger="lb.timers"):
        await asyncio.sleep(0.1)
    assert len(calls.at) == 1
    assert "owner bug" in caplog.text


async def test_a_deadline_moved_by_a_callback_of_its_own_tick_keeps_its_new_time() -> None:
    """Two deadlines share a tick; whichever fires first moves the other 0.1 s later, then
    disarms it: the other does not fire, and closing it takes it out of the wheel."""
    loop = asyncio.get_running_loop()
    wheel = TimerWheel(loop)
    fired: list[str] = []
    deadlines: dict[str, WheelDeadline] = {}

    def fire(name: str) -> None:
        fired.append(name)
        other = deadlines["b" if name == "a" else "a"]
        other.cancel()
        other.set(loop.time() + 0.1)
        other.set(None)

    start = loop.time()
    for name in ("a", "b"):
        deadlines[name] = WheelDeadline(wheel, lambda name=name: fire(name))
        deadlines[name].set(start + 0.02)
    await asyncio.sleep(0.06)
    assert len(fired) == 1
    other = deadlines["b" if fired[0] == "a" else "a"]
    other.close()
    assert len(wheel) == 0
    await asyncio.sleep(0.15)
    assert len(fired) == 1


async def test_a_callback_arming_a_later_tick_leaves_the_earlier_ones_on_time() -> None:
    """A fires first and arms B far later; C, due between them, must still fire at its own
    tick, not wait for B's (the wheel re-arms for the earliest tick after its callbacks)."""
    loop = asyncio.get_running_loop()
    errors: list[dict[str, object]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    try:
        wheel = TimerWheel(loop)
        calls = Calls(loop)
        start = loop.time()
        late = WheelDeadline(wheel, calls)
        WheelDeadline(wheel, lambda: late.set(start + 0.5)).set(start + 0.02)
        WheelDeadline(wheel, calls).set(start + 0.06)
        await asyncio.sleep(0.2)
        assert len(calls.at) == 1  # C, long before B's 0.5 s
        assert errors == []
        late.close()
    finally:
        loop.set_exception_handler(previous)


async def test_a_due_time_a_rounding_error_past_its_tick_fires_with_that_tick(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A due time one float step above a tick boundary can round to that tick: the wheel
    fires it there instead of filing it into the same tick again and again."""
    loop = asyncio.get_running_loop()
    n = next(
        n for n in range(1, 10_000) if math.ceil(math.nextafter(n * TICK_S, math.inf) / TICK_S) == n
    )
    wheel = TimerWheel(loop)
    calls = Calls(loop)
    WheelDeadline(wheel, calls).set(math.nextafter(n * TICK_S, math.inf))
    monkeypatch.setattr(loop, "time", lambda: n * TICK_S - SLACK_S)
    wheel._fire()  # the tick's loop timer, run at the earliest moment it may
    assert len(calls.at) == 1
    assert len(wheel) == 0
