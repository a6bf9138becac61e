"""A pool: a named set of backends, the strategy that chooses among them, their connections.

The pool answers one question for the proxy: which backends may take this attempt. A backend
is *available* when its health check passes and it is neither drained, ejected nor holding a
``Retry-After``. When fewer than ``panic_threshold`` of the serving backends are available, the
pool panics and balances over all of them (Envoy's panic threshold) rather than piling every
request onto the last one or two. Candidates exclude backends already tried for the request
and, with ``max_concurrency``, those that are full. Discovery (the backend list), health and
selection stay three separate things: health and ejection only flip flags here.

Cost. The eligible set is rebuilt only by :meth:`Pool.refresh`, which runs whenever a health
verdict, an ejection, a hold, a drain or slow start changes it; a first attempt gets that tuple
as it is, in O(1). A retry, or a call while some backends are at their ``max_concurrency``,
in a pool of more than 16 eligible backends gets a :class:`CandidateView` of it that leaves the
tried and the full backends out without copying the rest (in smaller pools a list is cheaper):
O(k log k) to build for k left out, O(1) ``len`` and membership, O(k) indexing. Which backends
are full is a set the attempts keep as they start and end (:class:`lb.backend.PoolLoad`,
written by :class:`lb.load.Attempt`), so no call scans the pool for it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Final, overload

from lb.admission import AdmissionQueue
from lb.backend import DEFAULT_DECAY_S, Backend, PoolLoad
from lb.outlier import OutlierDetector
from lb.retry import RetryBudget, RetryPolicy
from lb.stats import PoolStats
from lb.strategies import Strategy
from lb.upstream import ConnectionPool

log = logging.getLogger("lb.pool")

# Slow start: the weight ramps linearly from this share of the configured weight.
SLOW_START_FLOOR: Final = 0.1
SLOW_START_TICK_S: Final = 0.25
# A retry over more eligible backends than this gets a view; over fewer, a copy is cheaper.
VIEW_MIN_ELIGIBLE: Final = 16


class CandidateView(Sequence[Backend]):
    """The eligible backends minus a few positions left out (the tried ones), without copying.

    ``left_out`` holds sorted, distinct positions in ``base``; ``index`` maps each backend of
    ``base`` to its position. ``len`` and ``in`` are O(1), indexing is O(len(left_out)),
    iteration follows ``base``'s order, and a slice is a list.
    """

    __slots__ = ("_base", "_index", "_left_out", "_left_out_set")

    def __init__(
        self, base: tuple[Backend, ...], index: dict[Backend, int], left_out: list[int]
    ) -> None:
        self._base = base
        self._index = index
        self._left_out = left_out
        self._left_out_set = frozenset(left_out)

    def __len__(self) -> int:
        return len(self._base) - len(self._left_out)

    @overload
    def __getitem__(self, i: int) -> Backend: ...
    @overload
    def __getitem__(self, i: slice) -> list[Backend]: ...
    def __getitem__(self, i: int | slice) -> Backend | list[Backend]:
        if isinstance(i, slice):
            return list(self)[i]
        size = len(self)
        if i < 0:
            i += size
        if not 0 <= i < size:
            raise IndexError("candidate index out of range")
        for position in self._left_out:  # sorted: each one at or before i shifts i by one
            if position > i:
                break
            i += 1
        return self._base[i]

    def __iter__(self) -> Iterator[Backend]:
        left_out = self._left_out_set
        for position, backend in enumerate(self._base):
            if position not in left_out:
                yield backend

    def __contains__(self, backend: object) -> bool:
        position = self._index.get(backend)  # type: ignore[call-overload]  # any object may be asked
        return position is not None and position not in self._left_out_set

    def __repr__(self) -> str:
        return f"CandidateView({[b.name for b in self]!r})"


@dataclass(slots=True)
class PoolTimeouts:
    """Per-pool upstream timeouts in seconds; ``None`` means no limit."""

    connect_s: float = 5.0
    response_headers_s: float | None = 600.0
    idle_s: float | None = 300.0


class Pool:
    """Backends of one pool with their strategy, connection pools and eligibility state."""

    def __init__(
        self,
        name: str,
        backends: Sequence[Backend],
        strategy: Strategy,
        upstreams: dict[Backend, ConnectionPool],
        timeouts: PoolTimeouts,
        *,
        rtt_decay_s: float = DEFAULT_DECAY_S,
        retry: RetryPolicy | None = None,
        outliers: OutlierDetector | None = None,
        queue: AdmissionQueue | None = None,
        panic_threshold: float = 0.5,
        slow_start_s: float = 0.0,
        stats: PoolStats | None = None,
        clock: Callable[[], float] = time.monotonic,
        shadow_strategy: Strategy | None = None,
    ) -> None:
        self.name = name
        self.backends = tuple(backends)
        # Running totals for strategies; seeded with what backends kept by a reload carry.
        self.load = PoolLoad(self.backends)
        for b in self.backends:
            b.pool_load = self.load
        self.strategy = strategy
        self.shadow_strategy = shadow_strategy  # computed beside, to compare (never used)
        # What the strategies were built from (lb.build): a reload that would build the same
        # keeps them, with what they learnt (a prefix tree, a rotation's place).
        self.strategy_key: object = None
        self.shadow_key: object = None
        self.upstreams = upstreams
        self.timeouts = timeouts
        self.rtt_decay_s = rtt_decay_s  # the latency estimate's decay, shared with the strategy
        self.retry = retry or RetryPolicy()
        self.budget = RetryBudget()
        self.outliers = outliers
        self.queue = queue
        self.panic_threshold = panic_threshold
        self.slow_start_s = slow_start_s
        self.stats = stats or PoolStats()
        self.clock = clock
        # Header lines naming each backend, built once: b"x-lb-backend: name\r\n".
        self.backend_lines: dict[Backend, bytes] = {}
        self.eligible: tuple[Backend, ...] = ()
        self._eligible_index: dict[Backend, int] = {}  # backend -> its position in eligible
        self.panicking = False
        self._timer: asyncio.TimerHandle | None = None
        self._ramping: dict[Backend, float] = {}  # backend -> slow start began (clock)
        self._ramp_timer: asyncio.TimerHandle | None = None
        self._closed = False
        self._ejected: set[Backend] = set()  # ejected here, their return not yet logged
        self.successor: Pool | None = None  # the pool a reload replaced this one with
        self.refresh()

    # -- eligibility ------------------------------------------------------------------------

    def refresh(self) -> None:
        """Recompute availability and the eligible set; call after any flag changed."""
        if self._closed:
            return
        now = self.clock()
        next_change = float("inf")
        for b in self.backends:
            until = max(b.ejected_until_s, b.held_until_s)
            if until > now:
                next_change = min(next_change, until)
            available = b.healthy and not b.drained and until <= now
            if available and not b.available:
                self._begin_slow_start(b, now)
            b.available = available
            if b in self._ejected and b.ejected_until_s <= now:
                self._ejected.discard(b)
                log.info("pool=%s backend=%s back from ejection: its time ran out",
                         self.name, b.name,
                         extra={"event": "ejection_ended", "pool": self.name,
                                "backend": b.name, "reason": "expired"})  # fmt: skip
        available_set = tuple(b for b in self.backends if b.available)
        serving = tuple(b for b in self.backends if not b.drained)
        panicking = bool(serving) and len(available_set) < self.panic_threshold * len(serving)
        if panicking != self.panicking:
            log.warning(
                "pool=%s %s panic mode: %d of %d backends available",
                self.name,
                "entering" if panicking else "leaving",
                len(available_set),
                len(serving),
                extra={
                    "event": "panic_entered" if panicking else "panic_left",
                    "pool": self.name,
                    "available": len(available_set),
                    "backends": len(serving),
                },
            )
        self.panicking = panicking
        # Panic balances over backends that are down, but not over those that asked, with a
        # Retry-After, to be left alone: they said they cannot take the work.
        eligible = (
            tuple(b for b in serving if b.held_until_s <= now and not b.awaiting_check)
            if panicking
            else available_set
        )
        if eligible != self.eligible:
            self.eligible = eligible
            self._eligible_index = {b: i for i, b in enumerate(eligible)}
        self._sum_weights()
        self._schedule(next_change)
        if self.queue is not None and self.queue:
            self.queue.wake_one()

    def _schedule(self, when_s: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if when_s == float("inf"):
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # built outside a loop (a config check): nothing expires there
        delay = max(when_s - self.clock(), 0.0)
        self._timer = loop.call_later(delay, self.refresh)

    def candidates(self, tried: Sequence[Backend]) -> Sequence[Backend]:
        """Backends eligible for the next attempt: available (or all, in panic), not tried,
        and with room under ``max_concurrency``.

        The result is in pool order: the eligible tuple itself when nothing is left out, else
        a :class:`CandidateView` of it leaving out the tried and the full backends (a list in
        small pools). Fullness is the pool's running set (:class:`lb.backend.PoolLoad`), kept
        by the attempts as they start and end, so it is current at every call.
        """
        eligible = self.eligible
        full = self.load.full
        if not tried and not full:
            return eligible
        if len(eligible) <= VIEW_MIN_ELIGIBLE:
            return [b for b in eligible if b not in tried and b not in full]
        index = self._eligible_index
        left_out = sorted(
            {index[b] for b in tried if b in index} | {index[b] for b in full if b in index}
        )
        if not left_out:
            return eligible
        return CandidateView(eligible, index, left_out)

    def held_for_s(self) -> float | None:
        """When every backend still serving is held by a Retry-After, seconds until the first
        hold ends; otherwise None (something other than holds keeps them out)."""
        now = self.clock()
        serving = [b for b in self.backends if not b.drained]
        if not serving or any(b.held_until_s <= now for b in serving):
            return None
        return min(b.held_until_s for b in serving) - now

    def ejected_count(self) -> int:
        now = self.clock()
        return sum(1 for b in self.backends if b.ejected_until_s > now)

    # -- what the proxy reports -------------------------------------------------------------

    def attempt_ended(self, backend: Backend, failed: bool, observed: bool = True) -> None:
        """Feed passive outlier detection and hand a freed slot to the queue.

        ``observed`` is False for an attempt the client abandoned: it tells nothing about the
        backend, but its slot is free all the same. An attempt that began before a reload
        ends in the pool that replaced this one, if that one kept the backend.
        """
        if self._closed:
            live = self._successor_with(backend)
            if live is not None:
                live.attempt_ended(backend, failed, observed)
            return
        outliers = self.outliers
        if observed and outliers is not None and outliers.enabled:
            now = self.clock()
            if outliers.observe(backend, failed, now, len(self.backends), self.ejected_count):
                ejected_s = backend.ejected_until_s - now
                log.warning(
                    "pool=%s backend=%s ejected for %.1fs after %d failures in a row",
                    self.name,
                    backend.name,
                    ejected_s,
                    outliers.threshold,
                    extra={
                        "event": "ejected",
                        "pool": self.name,
                        "backend": backend.name,
                        "for_s": round(ejected_s, 3),
                        "failures": outliers.threshold,
                    },
                )
                self._ejected.add(backend)
                self.refresh()
        queue = self.queue
        if queue is not None and queue.waiters:
            queue.wake_one()

    def hold(self, backend: Backend, seconds: float) -> None:
        """Keep ``backend`` out for ``seconds``: it asked for that with ``Retry-After``."""
        if self._closed:
            live = self._successor_with(backend)
            if live is not None:
                live.hold(backend, seconds)
            return
        until = self.clock() + seconds
        if until > backend.held_until_s:
            backend.held_until_s = until
            self.refresh()

    # -- health listener (lb.health) ----------------------------------------------------------

    def health_changed(self, backend: Backend, healthy: bool) -> None:
        self.refresh()

    def health_probe_passed(self, backend: Backend) -> None:
        now = self.clock()
        if backend.ejected_until_s > now:
            # A passing active check ends an ejection early; the ejection still counts in the
            # backend's streak, so the next one lasts longer if real traffic keeps failing.
            backend.ejected_until_s = now
            self._ejected.discard(backend)
            log.info("pool=%s backend=%s back from ejection: health check passed",
                     self.name, backend.name,
                     extra={"event": "ejection_ended", "pool": self.name,
                            "backend": backend.name})  # fmt: skip
            self.refresh()

    def _sum_weights(self) -> None:
        self.load.eligible_weight = sum(b.effective_weight for b in self.eligible)

    # -- slow start -------------------------------------------------------------------------

    def begin_slow_start(self, backend: Backend) -> None:
        """Ramp ``backend``'s weight up from now (a backend added by a reload)."""
        self._begin_slow_start(backend, self.clock())

    def _begin_slow_start(self, backend: Backend, now: float) -> None:
        if self.slow_start_s <= 0:
            return
        self._ramping[backend] = now
        backend.effective_weight = backend.weight * SLOW_START_FLOOR
        self._sum_weights()
        if self._ramp_timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            self._ramp_timer = loop.call_later(SLOW_START_TICK_S, self._ramp)

    def _ramp(self) -> None:
        self._ramp_timer = None
        now = self.clock()
        for backend, began in list(self._ramping.items()):
            share = (now - began) / self.slow_start_s
            if share >= 1.0 or not backend.available:
                backend.effective_weight = float(backend.weight)
                del self._ramping[backend]
            else:
                backend.effective_weight = backend.weight * max(SLOW_START_FLOOR, share)
        self._sum_weights()
        if self._ramping and not self._closed:
            loop = asyncio.get_running_loop()
            self._ramp_timer = loop.call_later(SLOW_START_TICK_S, self._ramp)

    def retire(self, keep: set[Backend]) -> None:
        """Stop this pool's timers; close the connections of backends not in ``keep``.

        Used when a reload replaces the pool: requests in flight finish on the connections
        they hold, which close when released.
        """
        self._closed = True
        if self.queue is not None:
            self.queue.wake_all()  # queued requests move to the pool that replaced this one
        for timer in (self._timer, self._ramp_timer):
            if timer is not None:
                timer.cancel()
        self._timer = self._ramp_timer = None
        for backend, upstream in self.upstreams.items():
            if backend not in keep:
                upstream.close()

    def current(self) -> Pool:
        """This pool, or the live one that replaced it through any later reloads (this one
        again when it was closed without a successor: the proxy is stopping)."""
        pool = self
        while pool._closed and pool.successor is not None:
            pool = pool.successor
        return pool

    def _successor_with(self, backend: Backend) -> Pool | None:
        """The live pool that replaced this retired one, if it kept ``backend``."""
        pool = self.current()
        return pool if pool is not self and backend in pool.upstreams else None

    @property
    def retired(self) -> bool:
        """True once a reload replaced this pool (or it was closed)."""
        return self._closed

    def close(self) -> None:
        """Stop timers and close idle upstream connections."""
        self.retire(keep=set())
