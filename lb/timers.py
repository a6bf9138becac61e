"""A deadline that can be moved on every request without touching the event loop's timers.

Arming and cancelling a loop timer costs a few microseconds each (uvloop allocates a libuv
timer handle per ``call_later`` and closes it on ``cancel``). A keep-alive connection moves its
deadlines several times per request (keep-alive idle, header timeout, response timeout), so at
tens of thousands of requests per second that alone would be a sizeable share of the proxy's
CPU. :class:`Deadline` keeps one loop timer and a due time: moving the due time later is an
attribute write, and when the timer fires early it re-arms itself for the current due time. Only
moving the due time *earlier* than the armed timer touches the loop (the same lazy re-arming
as Netty's and pingora's idle timeouts).

Client connections come and go far more often than that: each one would still arm and close a
loop timer of its own. :class:`WheelDeadline` has the same interface but shares a
:class:`TimerWheel`: due times are grouped into ticks of ``TICK_S``, one loop timer per tick
that has any, so arming a new connection's deadline is a set insertion (a timer wheel, as
HAProxy's and the kernel's timeouts are kept). It fires up to one tick late.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
from collections.abc import Callable
from typing import Final

log = logging.getLogger("lb.timers")

# A timer that fires this close to its due time counts as due: libuv's clock has millisecond
# resolution, so re-arming for a remainder below it would spin.
SLACK_S: Final = 0.001

# A wheel's tick: its deadlines fire at the first tick boundary at or after their due time.
TICK_S: Final = 0.01


class Deadline:
    """Calls ``callback`` once the loop time passes the due time set by :meth:`set`.

    ``set(None)`` disarms; the underlying timer, if armed, fires once more and does nothing.
    The callback runs at most once per due time and is not called after :meth:`cancel`.
    """

    __slots__ = ("_callback", "_due", "_handle", "_loop", "_when")

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
        self._loop = loop
        self._callback = callback
        self._due: float | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._when = 0.0

    @property
    def due(self) -> float | None:
        """The loop time at which the callback runs, or ``None`` when disarmed."""
        return self._due

    def set_in(self, delay_s: float | None) -> None:
        """Due ``delay_s`` seconds from now (``None``: disarmed)."""
        self.set(None if delay_s is None else self._loop.time() + delay_s)

    def set(self, due: float | None) -> None:
        """Due at loop time ``due`` (``None``: disarmed), replacing any earlier due time."""
        self._due = due
        if due is None:
            return
        handle = self._handle
        if handle is None or self._when > due:
            if handle is not None:
                handle.cancel()
            self._when = due
            self._handle = self._loop.call_at(due, self._fire)

    def cancel(self) -> None:
        """Disarm and release the loop timer."""
        self._due = None
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def close(self) -> None:
        """Cancel for good and let go of the callback, so an owner that holds this deadline
        and whose method is its callback is not kept alive by the pair (a reference cycle)."""
        self.cancel()
        self._callback = _nothing

    def _fire(self) -> None:
        self._handle = None
        due = self._due
        if due is None:
            return
        if self._loop.time() + SLACK_S < due:
            self._when = due
            self._handle = self._loop.call_at(due, self._fire)
            return
        self._due = None
        self._callback()


class TimerWheel:
    """Due times of many :class:`WheelDeadline` on one event loop, one loop timer per tick.

    A tick's deadlines are kept in a set (``_buckets``), the ticks that have any in a heap, and
    the loop timer is armed for the earliest of them only.
    """

    __slots__ = ("_armed", "_buckets", "_handle", "_ticks", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._buckets: dict[int, set[WheelDeadline]] = {}
        self._ticks: list[int] = []  # a heap of the buckets' ticks
        self._handle: asyncio.TimerHandle | None = None
        self._armed = 0  # the tick the loop timer is set for, while _handle is not None

    def __len__(self) -> int:
        """Deadlines held (due or disarmed since, until their tick comes)."""
        return sum(len(bucket) for bucket in self._buckets.values())

    def add(self, deadline: WheelDeadline, due: float) -> int:
        """Hold ``deadline`` until the first tick at or after ``due``; returns that tick."""
        tick = math.ceil(due / TICK_S)
        bucket = self._buckets.get(tick)
        if bucket is None:
            bucket = self._buckets[tick] = set()
            heapq.heappush(self._ticks, tick)
            if self._handle is None or tick < self._armed:
                self._arm(tick)
        bucket.add(deadline)
        return tick

    def discard(self, deadline: WheelDeadline, tick: int) -> None:
        bucket = self._buckets.get(tick)
        if bucket is not None:
            bucket.discard(deadline)

    def _arm(self, tick: int) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._armed = tick
        self._handle = self.loop.call_at(tick * TICK_S, self._fire)

    def _fire(self) -> None:
        self._handle = None
        now = self.loop.time()
        ticks = self._ticks
        buckets = self._buckets
        while ticks and ticks[0] * TICK_S <= now + SLACK_S:
            tick = heapq.heappop(ticks)
            for deadline in buckets.pop(tick, ()):
                if deadline.tick != tick:
                    continue  # moved to another tick by a callback run before it in this one
                try:
                    deadline.expire(tick)
                except Exception:  # one owner's bug must not stop the others' deadlines
                    log.exception("a deadline's callback failed")
        self._rearm()

    def _rearm(self) -> None:
        # Apart from _fire: there the type checker (and the compiled build, which trusts it)
        # takes _handle for the None assigned on entry, though a callback may have armed it.
        ticks = self._ticks
        if ticks and (self._handle is None or ticks[0] < self._armed):
            self._arm(ticks[0])


class WheelDeadline:
    """A :class:`Deadline` kept on a shared :class:`TimerWheel` (fires up to ``TICK_S`` late)."""

    __slots__ = ("_callback", "_due", "_wheel", "tick")

    def __init__(self, wheel: TimerWheel, callback: Callable[[], None]) -> None:
        self._wheel = wheel
        self._callback = callback
        self._due: float | None = None
        self.tick = 0  # the wheel tick holding this deadline; 0: not held

    @property
    def due(self) -> float | None:
        """The loop time at which the callback runs, or ``None`` when disarmed."""
        return self._due

    def set_in(self, delay_s: float | None) -> None:
        """Due ``delay_s`` seconds from now (``None``: disarmed)."""
        self.set(None if delay_s is None else self._wheel.loop.time() + delay_s)

    def set(self, due: float | None) -> None:
        """Due at loop time ``due`` (``None``: disarmed), replacing any earlier due time.

        Moving it later leaves it in its tick, which re-files it when it comes."""
        self._due = due
        if due is None:
            return
        tick = self.tick
        if tick == 0 or due <= (tick - 1) * TICK_S:
            if tick:
                self._wheel.discard(self, tick)
            self.tick = self._wheel.add(self, due)

    def cancel(self) -> None:
        """Disarm and leave the wheel."""
        self._due = None
        if self.tick:
            self._wheel.discard(self, self.tick)
            self.tick = 0

    def close(self) -> None:
        """Cancel for good and let go of the callback (see :meth:`Deadline.close`)."""
        self.cancel()
        self._callback = _nothing

    def expire(self, tick: int) -> None:
        """Called by the wheel when ``tick``, which held this deadline, comes: due by then, it
        fires; moved later meanwhile, it is filed in its later tick. (Judged by ticks, not by
        comparing times: a due time a rounding error past its own tick would be re-filed into
        that same tick, over and over.)"""
        self.tick = 0
        due = self._due
        if due is None:
            return
        if math.ceil(due / TICK_S) > tick:
            self.tick = self._wheel.add(self, due)
            return
        self._due = None
        self._callback()


def _nothing() -> None:
    pass
