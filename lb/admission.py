"""Admission control: the bounded first-come-first-served queue in front of a full pool.

When every candidate backend holds ``max_concurrency`` requests, a request waits here until
an attempt somewhere in the pool ends (``wake_one``), for at most ``queue_timeout_s``. A full
queue, or a wait that runs out, is answered with the configured status and ``Retry-After``.
A client that disconnects while queued is cancelled out of the queue.
"""

from __future__ import annotations

import asyncio
from collections import deque

from lb.errors import Rejected
from lb.stats import Histogram


class AdmissionQueue:
    """FIFO of requests waiting for a free slot in one pool."""

    def __init__(
        self, *, max_queue: int, timeout_s: float, reject_status: int, retry_after_s: int
    ) -> None:
        self.max_queue = max_queue
        self.timeout_s = timeout_s
        self.reject_status = reject_status
        self.retry_after_s = retry_after_s
        # The requests in line, first first; read (never changed) by the proxy's hot path,
        # which tests it for emptiness without a Python-level __len__ call.
        self.waiters: deque[asyncio.Future[None]] = deque()
        self.rejected_full = 0
        self.rejected_timeout = 0
        self.admitted = 0
        self.waits = Histogram()  # seconds each queued request waited, admitted or not
        self.closed = False  # the proxy is shutting down: nobody waits any more

    def carry_counters(self, previous: AdmissionQueue) -> None:
        """Continue the counters of the queue this one replaces on a reload."""
        self.rejected_full = previous.rejected_full
        self.rejected_timeout = previous.rejected_timeout
        self.admitted = previous.admitted
        self.waits = previous.waits

    def __len__(self) -> int:
        return len(self.waiters)

    def _reject(self, message: str) -> Rejected:
        return Rejected(message, status=self.reject_status, retry_after_s=self.retry_after_s)

    async def wait(self, *, front: bool = False, timeout_s: float | None = None) -> None:
        """Wait for a turn; raises :class:`Rejected` if the queue is full or the wait expires.

        ``front`` puts the request first in line: one that was woken but found its slot gone.
        ``timeout_s``: a shorter wait than the queue's own (the request's deadline is nearer).
        """
        limit_s = self.timeout_s if timeout_s is None else min(timeout_s, self.timeout_s)
        if self.closed:
            raise self._closing()
        if not front and len(self.waiters) >= self.max_queue:
            self.rejected_full += 1
            raise self._reject(f"all backends are busy and the queue is full ({self.max_queue})")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        if front:
            self.waiters.appendleft(fut)
        else:
            self.waiters.append(fut)
        started = loop.time()
        try:
            async with asyncio.timeout(limit_s):
                await fut
        except TimeoutError:
            if not (fut.done() and not fut.cancelled()):
                self.rejected_timeout += 1
                raise self._reject(
                    f"all backends stayed busy for {limit_s:g}s (queue timeout)"
                ) from None
            # woken in the same turn the wait ran out: take the turn
        except BaseException:
            if fut.done() and not fut.cancelled():
                self.wake_one()  # woken, but leaving anyway (client gone): pass the turn on
            raise
        finally:
            self.waits.observe(loop.time() - started)
            if not fut.done():
                fut.cancel()
            try:
                self.waiters.remove(fut)
            except ValueError:
                pass
        if self.closed:
            raise self._closing()
        self.admitted += 1

    def close(self) -> None:
        """The grace period is over: every request still waiting is answered 503 now."""
        self.closed = True
        self.wake_all()

    def _closing(self) -> Rejected:
        return Rejected("the proxy is shutting down", status=503, retry_after_s=self.retry_after_s)

    def wake_all(self) -> None:
        """Wake every waiter (the pool was replaced by a reload: they wait in the new one)."""
        waiters = self.waiters
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(None)

    def wake_one(self) -> None:
        """Give the turn to the longest waiter, if any."""
        waiters = self.waiters
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return
