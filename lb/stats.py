"""Cheap counters and histograms written on the hot path and read at scrape time.

The data plane only bumps integers in plain lists; :mod:`lb.metrics` turns them into
Prometheus samples when scraped, so recording a request costs a few list operations.
"""

from __future__ import annotations

from collections import deque
from typing import Final, NamedTuple

from lb.histogram import LATENCY_BUCKETS_S, Histogram
from lb.inference import InferenceStats

__all__ = ["LATENCY_BUCKETS_S", "Decision", "ErrorRecord", "Histogram", "PoolStats"]


class ErrorRecord(NamedTuple):
    """One failure worth showing an operator: when, which request, which backend, what."""

    time: float  # Unix time
    request_id: str
    backend: str | None
    status: int
    type: str
    message: str


RECENT_ERRORS: Final = 50
RECENT_DECISIONS: Final = 100


class Decision(NamedTuple):
    """One routing decision: which backend a request went to, and why (a tuple: one is made
    per request)."""

    time: float  # Unix time
    request_id: bytes  # as on the wire; decoded when read
    backend: str
    reason: str


class PoolStats:
    """What clients of one pool saw: answers by status class and time to answer them."""

    __slots__ = (
        "client_disconnects",
        "decisions",
        "duration",
        "inference",
        "recent_errors",
        "responses_by_class",
        "retries",
        "shadow_agree",
        "shadow_disagree",
        "ttfb",
    )

    def __init__(self) -> None:
        # index 1..5 for 1xx..5xx; index 0 for requests that got no response (client gone)
        self.responses_by_class = [0] * 6
        self.duration = Histogram()
        self.ttfb = Histogram()  # request headers in -> response headers out
        self.client_disconnects = 0
        self.retries: dict[str, int] = {}  # by reason: connect_error, reset, timeout, a status
        self.recent_errors: deque[ErrorRecord] = deque(maxlen=RECENT_ERRORS)
        self.decisions: deque[Decision] = deque(maxlen=RECENT_DECISIONS)
        self.inference = InferenceStats()
        self.shadow_agree = 0  # the shadow strategy would have chosen the same backend
        self.shadow_disagree = 0

    def count_shadow(self, agree: bool) -> None:
        if agree:
            self.shadow_agree += 1
        else:
            self.shadow_disagree += 1

    def count_retry(self, reason: str) -> None:
        self.retries[reason] = self.retries.get(reason, 0) + 1
