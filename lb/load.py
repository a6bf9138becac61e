"""Load accounting: the one place that writes a backend's in-flight count, latency and outcomes
(and its pool's in-flight total, :class:`lb.backend.PoolLoad`).

Every upstream attempt is wrapped in an :class:`Attempt`. It takes the in-flight slot when it
is created and gives it back exactly once, in :meth:`Attempt.finish`, whichever path ends the
attempt (success, error, timeout, cancellation, client gone): ``finish`` is idempotent and the
context-manager exit calls it, so an error path cannot skip it.

Latency is a peak-EWMA of the time to the response (tower's ``load::peak_ewma``, after Finagle's
``PeakEwma``): to its headers, or for a token stream to its first token, since a model server
sends a stream's headers at once, before queueing and prefill have been paid
(:meth:`Attempt.response_started` with ``deferred``, then :meth:`Attempt.first_token`). A sample
above the estimate replaces it at once, a sample below it is blended in with weight ``1 -
exp(-elapsed / decay_s)``. The estimate it is blended with is the current one as
:meth:`lb.backend.Backend.rtt_at` gives it, already relaxed towards the default
guess during the time without samples, so an idle backend's old estimate weighs less. A failed
attempt is recorded as a slow one (at least twice the current estimate), so a backend that
fails fast (an immediate 503 or 429, a refused connection) looks loaded rather than fast to
latency-aware strategies. Failures are also kept as a decaying ``failure_score`` that
``least_connections`` counts as phantom in-flight requests, for the same reason.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from types import TracebackType
from typing import Final

from lb.backend import DEFAULT_DECAY_S, Backend

Clock = Callable[[], float]

# A failure counts as a latency sample of at least this much, and at least twice the estimate.
FAILURE_FLOOR_S: Final = 0.25
# The estimate never grows past this: a dead backend must still be retried once it decays.
MAX_RTT_S: Final = 60.0


def record_rtt(backend: Backend, sample_s: float, now_s: float, decay_s: float) -> None:
    """Fold one latency sample into ``backend``'s peak-EWMA estimate."""
    current = backend.rtt_at(now_s, decay_s)
    if sample_s >= current:
        estimate = sample_s
    else:
        elapsed = max(now_s - backend.rtt_stamp_s, 0.0)
        w = math.exp(-elapsed / decay_s)
        estimate = current * w + sample_s * (1.0 - w)
    backend.rtt_estimate_s = min(estimate, MAX_RTT_S)
    backend.rtt_stamp_s = now_s


def is_failure_status(status: int) -> bool:
    """A response that says the backend could not do the work: 5xx, or 429 (overloaded)."""
    return status >= 500 or status == 429


class Attempt:
    """Guard around one upstream attempt on ``backend``.

    Creating it takes an in-flight slot. Call :meth:`response_started` when the response
    headers arrive (records the latency sample) and :meth:`finish` when the attempt ends.
    """

    __slots__ = ("_clock", "_decay_s", "_deferred", "_done", "_started_s", "_status", "backend")

    def __init__(
        self, backend: Backend, clock: Clock = time.monotonic, decay_s: float = DEFAULT_DECAY_S
    ) -> None:
        self.backend = backend
        self._clock = clock
        self._decay_s = decay_s
        self._started_s = clock()
        self._status: int | None = None
        self._done = False
        self._deferred = False  # the latency sample waits for the first token
        backend.in_flight += 1
        backend.requests_total += 1
        pool_load = backend.pool_load
        if pool_load is not None:
            pool_load.in_flight += 1
            limit = backend.max_concurrency
            if limit is not None and backend.in_flight >= limit:
                pool_load.full.add(backend)

    @property
    def done(self) -> bool:
        return self._done

    def response_started(self, status: int, *, deferred: bool = False) -> None:
        """Record the response status and the time it took to arrive; with ``deferred`` (a
        token stream) the latency sample is taken at :meth:`first_token` instead (or, if no
        token comes, when a successful attempt finishes)."""
        self._status = status
        if is_failure_status(status):
            return  # recorded as a failure sample in finish()
        if deferred:
            self._deferred = True
            return
        now = self._clock()
        record_rtt(self.backend, now - self._started_s, now, self._decay_s)

    def first_token(self) -> None:
        """The stream's first token arrived: take the deferred latency sample now."""
        if self._deferred and not self._done:
            self._deferred = False
            now = self._clock()
            record_rtt(self.backend, now - self._started_s, now, self._decay_s)

    def finish(self, *, failed: bool = False, abandoned: bool = False) -> None:
        """Release the in-flight slot and count the outcome; only the first call counts.

        ``failed`` marks an attempt that ended badly after (or without) its headers: a reset,
        a timeout, a truncated body. A 5xx or 429 status counts as a failure by itself.
        ``abandoned`` marks an attempt cut short because the client went away: it counts
        neither as a failure nor as a success of the backend.
        """
        if self._done:
            return
        self._done = True
        backend = self.backend
        backend.in_flight -= 1
        pool_load = backend.pool_load
        if pool_load is not None:
            pool_load.in_flight -= 1
            if pool_load.full and backend in pool_load.full and backend.has_room:
                pool_load.full.discard(backend)
        status = self._status
        if status is None and abandoned:
            return  # the client went away before any answer: says nothing about the backend
        backend.responses_by_class[0 if status is None else min(status // 100, 5)] += 1
        backend.latency.observe(self._clock() - self._started_s)
        if abandoned and not is_failure_status(status or 0):
            return  # the client went away mid-answer: says nothing about the backend
        if failed or status is None or is_failure_status(status):
            backend.failures_total += 1
            backend.consecutive_failures += 1
            now = self._clock()
            backend.failure_score = backend.failure_score_at(now, self._decay_s) + 1.0
            backend.failure_stamp_s = now
            penalty = max(
                now - self._started_s, 2.0 * backend.rtt_at(now, self._decay_s), FAILURE_FLOOR_S
            )
            record_rtt(backend, penalty, now, self._decay_s)
        else:
            backend.consecutive_failures = 0
            if self._deferred:  # a stream that ended without a token: its whole time
                self._deferred = False
                now = self._clock()
                record_rtt(backend, now - self._started_s, now, self._decay_s)
            if backend.failure_score:
                now = self._clock()
                backend.failure_score = backend.failure_score_at(now, self._decay_s) / 2.0
                backend.failure_stamp_s = now

    def __enter__(self) -> Attempt:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None and issubclass(exc_type, asyncio.CancelledError):
            self.finish(abandoned=True)
        else:
            self.finish(failed=exc_type is not None)
