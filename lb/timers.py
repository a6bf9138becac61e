"""A deadline that can be moved on every request without touching the event loop's timers.

Arming and cancelling a loop timer costs a few microseconds each (uvloop allocates a libuv
timer handle per ``call_later`` and closes it on ``cancel``). A keep-alive connection moves its
deadlines several times per request (keep-alive idle, header timeout, response timeout), so at
tens of thousands of requests per second that alone would be a sizeable share of the proxy's
CPU. :class:`Deadline` keeps one loop timer and a due time: moving the due time later is an
attribute write, and when the timer fires early it re-arms itself for the current due time. Only
moving the due time *earlier* than the armed timer touches the loop (the same lazy re-arming
as Netty's and pingora's idle timeouts).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Final

# A timer that fires this close to its due time counts as due: libuv's clock has millisecond
# resolution, so re-arming for a remainder below it would spin.
SLACK_S: Final = 0.001


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


def _nothing() -> None:
    pass
