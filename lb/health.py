"""Active health checks: probe each backend on an interval and report when its verdict flips.

A backend changes state only after a streak of like results: ``unhealthy_threshold``
consecutive failures take a healthy backend out, ``healthy_threshold`` consecutive passes bring
it back (HAProxy's ``fall``/``rise``, Envoy's ``unhealthy_threshold``/``healthy_threshold``).
One result of the other kind resets the streak. A backend that starts unhealthy (the pool's
``initial_state: unhealthy``) is waiting for its first pass and comes in on it, as Envoy does
for new hosts.

Each backend has its own task. The first probe comes after a random delay in
``[0, interval_s)``, so that many backends do not fire together; after that the task sleeps
``interval_s`` between the end of one probe and the start of the next, or the shorter
``transition_interval_s`` while a streak is under way or the backend is out, so a flip is
confirmed (and a dead backend noticed coming back) sooner. Every sleep is spread by
``jitter_percent``, uniformly in both directions.

An ``http`` probe is a GET of ``path`` that passes when the status is one of
``expected_statuses`` (redirects are not followed); a ``tcp`` probe passes when a connection
opens. Any error, and anything slower than ``timeout_s``, is a failure.

This module does I/O but never touches pool internals: it sets ``Backend.healthy`` and tells a
:class:`HealthListener`, which decides what the verdict means for traffic.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from lb.backend import Backend
from lb.config_resilience import HealthCheck, parse_status_ranges
from lb.probing import ProbeTasks, describe_failure, probe_session
from lb.tls import aiohttp_tls

log = logging.getLogger("lb.health")

USER_AGENT = "lb-health-check"
# A probe reads at most this much of a response body. A body read to its end lets the
# connection be kept alive; a longer one is cut, and aiohttp closes that connection.
MAX_BODY_BYTES = 64 << 10


class HealthListener(Protocol):
    """What a :class:`HealthChecker` reports to (the pool); calls are synchronous."""

    def health_changed(self, backend: Backend, healthy: bool) -> None:
        """Called once per transition, after ``backend.healthy`` was set to ``healthy``."""
        ...

    def health_probe_passed(self, backend: Backend) -> None:
        """Called on every passing probe (Envoy ends an outlier ejection early on one:
        ``successful_active_health_check_uneject_host``)."""
        ...


class HealthState:
    """The rise/fall counter of one backend: pure, synchronous, no I/O.

    ``healthy`` is the current verdict. A backend created unhealthy flips on its first pass;
    after that, and for a backend created healthy, a flip takes ``healthy_threshold``
    consecutive passes or ``unhealthy_threshold`` consecutive failures. Thresholds below 1
    raise ``ValueError``.
    """

    def __init__(self, healthy: bool, healthy_threshold: int, unhealthy_threshold: int) -> None:
        if healthy_threshold < 1 or unhealthy_threshold < 1:
            raise ValueError("thresholds must be at least 1")
        self.healthy = healthy
        self.healthy_threshold = healthy_threshold
        self.unhealthy_threshold = unhealthy_threshold
        # Consecutive results that disagree with `healthy`; reset by one that agrees.
        self._streak = 0
        self._awaiting_first_pass = not healthy

    def record(self, passed: bool) -> bool:
        """Count one probe result; True when it flips ``healthy`` (which it then has done)."""
        if passed == self.healthy:
            self._streak = 0
            return False
        self._streak += 1
        if self._streak < self._threshold():
            return False
        self.healthy = passed
        self._streak = 0
        self._awaiting_first_pass = False
        return True

    @property
    def transitioning(self) -> bool:
        """True while a streak towards the other state is under way but not yet complete."""
        return 0 < self._streak < self._threshold()

    def _threshold(self) -> int:
        """Results in a row that flip the current state."""
        if self.healthy:
            return self.unhealthy_threshold
        return 1 if self._awaiting_first_pass else self.healthy_threshold


@dataclass(slots=True)
class ProbeStats:
    """Counters of one backend's probes, for metrics and the admin API."""

    passed_total: int = 0
    failed_total: int = 0
    last_duration_s: float = 0.0  # 0.0 until the first probe ends
    last_reason: str = ""  # e.g. "status 200", "connection refused", "timeout after 2s"


def next_probe_delay_s(config: HealthCheck, state: HealthState, rng: random.Random) -> float:
    """Seconds to sleep before the next probe: ``transition_interval_s`` while ``state`` is
    transitioning or unhealthy, else ``interval_s``, times ``1 ± jitter_percent/100``."""
    base = config.interval_s
    if state.transitioning or not state.healthy:
        base = config.transition_interval_s
    spread = config.jitter_percent / 100.0
    return max(0.0, base * (1.0 + rng.uniform(-spread, spread)))


class HealthChecker:
    """Probes the backends of one pool and reports flips to ``listener``.

    Nothing runs until :meth:`start`, which needs a running loop; :meth:`stop` ends it. With
    ``config.enabled`` false, ``start`` does nothing and the verdicts stay as they were.
    ``rng`` (default: a fresh ``random.Random``) spreads the probes in time. ``previous``
    is the checker this one replaces on a reload: its counters carry over.
    """

    def __init__(
        self,
        pool_name: str,
        backends: Sequence[Backend],
        config: HealthCheck,
        listener: HealthListener,
        *,
        rng: random.Random | None = None,
        previous: HealthChecker | None = None,
    ) -> None:
        self.pool_name = pool_name
        self.backends = tuple(backends)
        self.config = config
        self.listener = listener
        self._rng = rng if rng is not None else random.Random()
        self._statuses = parse_status_ranges(config.expected_statuses)
        # The pool set `healthy` from `initial_state` already; the checker starts from it.
        self._states = {
            b: HealthState(b.healthy, config.healthy_threshold, config.unhealthy_threshold)
            for b in self.backends
        }
        # A reload's new checker carries the probe counters of the backends that stay, so
        # they never go backwards.
        kept: dict[Backend, ProbeStats] = previous._stats if previous is not None else {}
        self._stats: dict[Backend, ProbeStats] = {
            b: kept.get(b) or ProbeStats() for b in self.backends
        }
        self._probes = ProbeTasks()
        self._started = False

    def state(self, backend: Backend) -> HealthState:
        """The rise/fall state of ``backend``; ``KeyError`` if it is not one of this checker's."""
        return self._states[backend]

    def has(self, backend: Backend) -> bool:
        """True if ``backend`` is one this checker probes."""
        return backend in self._states

    def stats(self, backend: Backend) -> ProbeStats:
        """The probe counters of ``backend``; ``KeyError`` if it is not one of this checker's."""
        return self._stats[backend]

    def start(self) -> None:
        """Start one probe task per backend; call once, inside a running loop."""
        if self._started:
            raise RuntimeError("health checker already started")
        self._started = True
        if not self.config.enabled or not self.backends:
            return
        timeout_s = self.config.timeout_s
        open_session = None
        if self.config.type == "http":
            open_session = functools.partial(probe_session, timeout_s, {"User-Agent": USER_AGENT})
        self._probes.start("health", self.pool_name, self.backends, self._run, open_session)

    async def stop(self) -> None:
        """Cancel and await every probe task, then close the HTTP session; idempotent."""
        await self._probes.stop()

    async def _run(self, backend: Backend) -> None:
        state = self._states[backend]
        await asyncio.sleep(self._rng.random() * self.config.interval_s)
        while True:
            passed, reason = await self._probe(backend)
            self._record(backend, state, passed, reason)
            await asyncio.sleep(next_probe_delay_s(self.config, state, self._rng))

    def _record(self, backend: Backend, state: HealthState, passed: bool, reason: str) -> None:
        stats = self._stats[backend]
        if passed:
            stats.passed_total += 1
        else:
            stats.failed_total += 1
        stats.last_reason = reason
        changed = state.record(passed)
        if changed:
            # The flag first: the listener reads it when it recomputes availability.
            backend.healthy = state.healthy
            if state.healthy:
                backend.awaiting_check = False  # passed: panic may count it from now on
            verdict = "healthy" if state.healthy else "unhealthy"
            level = logging.INFO if state.healthy else logging.WARNING
            log.log(level, "health: pool=%s backend=%s is now %s (%s)",
                    self.pool_name, backend.name, verdict, reason,
                    extra={"event": "health_changed", "pool": self.pool_name,
                           "backend": backend.name, "state": verdict,
                           "reason": reason})  # fmt: skip
            try:
                self.listener.health_changed(backend, state.healthy)
            except Exception:
                log.exception("health: pool=%s backend=%s: listener failed on health_changed",
                              self.pool_name, backend.name)  # fmt: skip
        if passed:
            try:
                self.listener.health_probe_passed(backend)
            except Exception:
                log.exception("health: pool=%s backend=%s: listener failed on probe_passed",
                              self.pool_name, backend.name)  # fmt: skip

    async def _probe(self, backend: Backend) -> tuple[bool, str]:
        """One probe: (passed, reason). Never raises, except ``CancelledError``."""
        started = time.monotonic()
        try:
            if self.config.type == "http":
                return await self._probe_http(backend)
            return await self._probe_tcp(backend)
        except Exception as exc:
            reason = describe_failure(exc, self.config.timeout_s)
            log.debug("health: pool=%s backend=%s probe failed: %s",
                      self.pool_name, backend.name, reason)  # fmt: skip
            return False, reason
        finally:
            self._stats[backend].last_duration_s = time.monotonic() - started

    async def _probe_http(self, backend: Backend) -> tuple[bool, str]:
        assert self._probes.session is not None  # set by start() for http checks
        url = backend.origin + self.config.path
        # The session's total timeout covers connecting, the head and the body read.
        async with self._probes.session.get(
            url, allow_redirects=False, **aiohttp_tls(backend)
        ) as resp:
            budget = MAX_BODY_BYTES
            while budget > 0:
                chunk = await resp.content.read(budget)
                if not chunk:
                    break
                budget -= len(chunk)
            status = resp.status
        passed = any(low <= status <= high for low, high in self._statuses)
        return passed, f"status {status}"

    async def _probe_tcp(self, backend: Backend) -> tuple[bool, str]:
        async with asyncio.timeout(self.config.timeout_s):
            _, writer = await asyncio.open_connection(backend.host, backend.port)
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass  # the connection opened, which is all a tcp check asks
        return True, "connected"
