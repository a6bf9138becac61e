"""Passive outlier detection: eject a backend that fails real traffic, for a growing time.

After ``consecutive_failures`` failed attempts in a row (connect errors, resets, timeouts,
or a status in ``failure_statuses``) a backend is ejected for ``base_ejection_s`` times the
number of ejections in its current streak, capped at ``max_ejection_s`` (Envoy's outlier
detection). A backend that serves cleanly for as long as its last ejection lasted starts a new
streak. Ejection never takes more than ``max_ejection_percent`` of a pool (but always allows one
of two or more), so it cannot empty a pool. Pure logic: the pool applies the verdicts.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from lb.backend import Backend
from lb.config_resilience import OutlierDetection


class OutlierDetector:
    """Counts failures in a row per backend and decides ejections."""

    def __init__(self, config: OutlierDetection) -> None:
        self.enabled = config.enabled
        self.threshold = config.consecutive_failures
        self.failure_statuses = frozenset(config.failure_statuses)
        self.base_s = config.base_ejection_s
        self.max_s = config.max_ejection_s
        self.max_percent = config.max_ejection_percent
        self._streak: dict[Backend, int] = {}

    def max_ejected(self, pool_size: int) -> int:
        """How many backends of a pool of ``pool_size`` may be ejected at once."""
        if pool_size < 2:
            return 0
        # Multiply before dividing: 0.29 * 100 is 28.999999999999996 in floats.
        return max(1, math.floor(pool_size * self.max_percent / 100.0))

    def is_failure_status(self, status: int) -> bool:
        return status in self.failure_statuses

    def observe(
        self,
        backend: Backend,
        failed: bool,
        now_s: float,
        pool_size: int,
        ejected_now: int | Callable[[], int],
    ) -> bool:
        """Record one attempt's outcome; returns True if ``backend`` is ejected by it.

        ``ejected_now`` (how many of the pool are ejected) may be a callable, asked only when
        an ejection is due.
        """
        if not self.enabled:
            return False
        if not failed:
            self._streak[backend] = 0
            if backend.ejections and now_s >= backend.ejected_until_s + self._duration(backend):
                backend.ejections = 0  # served cleanly for as long as it was out: forgiven
            return False
        streak = self._streak.get(backend, 0) + 1
        self._streak[backend] = streak
        if streak < self.threshold or backend.ejected_until_s > now_s:
            return False
        if callable(ejected_now):
            ejected_now = ejected_now()
        if ejected_now >= self.max_ejected(pool_size):
            return False
        self._streak[backend] = 0
        backend.ejections += 1
        backend.ejections_total += 1
        backend.ejected_until_s = now_s + self._duration(backend)
        return True

    def _duration(self, backend: Backend) -> float:
        return min(self.base_s * max(backend.ejections, 1), self.max_s)
