"""Retry decisions: which failures retry, how long to back off, and the budget that caps them.

A retry goes to a backend not yet tried for the request when one exists, after a backoff with
full jitter (AWS Architecture Blog, "Exponential Backoff and Jitter": a uniform draw in
``[0, min(cap, base * 2**n)]``). The budget keeps a sick fleet from a retry storm, as Envoy's
retry budget does: retries in flight may be at most ``budget_percent`` of the requests in
flight in the pool, but always ``budget_min_concurrent``. Nothing is retried once a byte of the
response has reached the client, nor when the request body was too large to keep for replay.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Final

from lb.config_resilience import Retry
from lb.errors import (
    ProxyError,
    UpstreamFailed,
    UpstreamStatus,
    UpstreamTimeout,
    UpstreamUnreachable,
)


def failure_kind(error: ProxyError) -> str | None:
    """The retry condition an upstream error falls under, or ``None`` if it is no such error."""
    if isinstance(error, UpstreamUnreachable):
        return "connect_error"
    if isinstance(error, UpstreamFailed):
        return "reset"
    if isinstance(error, UpstreamTimeout):
        return "timeout"
    return None


def retry_reason(error: ProxyError) -> str:
    """The label a retry is counted under: a failure kind, or the status that was retried."""
    if isinstance(error, UpstreamStatus):
        return str(error.status)
    return failure_kind(error) or "other"


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """A pool's (or route's) retry settings in the form the proxy uses per request."""

    max_retries: int = 2
    conditions: frozenset[str] = frozenset({"connect_error", "reset"})
    statuses: frozenset[int] = frozenset({502, 503, 504, 429})
    per_try_timeout_s: float | None = None
    deadline_s: float | None = None
    backoff_base_s: float = 0.025
    backoff_max_s: float = 0.5
    retry_after_max_s: float = 30.0
    budget_percent: float = 20.0
    budget_min: int = 3
    replay_max_bytes: int = 1 << 20

    @classmethod
    def from_config(cls, retry: Retry) -> RetryPolicy:
        conditions = {c for c in retry.retry_on if isinstance(c, str)}
        if retry.per_try_timeout_s is not None and "retry_on" not in retry.model_fields_set:
            # A per-try timeout is there to move a hung try elsewhere (as Envoy's is): with the
            # default conditions, its expiry retries too.
            conditions.add("timeout")
        return cls(
            max_retries=retry.max_retries,
            conditions=frozenset(conditions),
            statuses=frozenset(c for c in retry.retry_on if isinstance(c, int)),
            per_try_timeout_s=retry.per_try_timeout_s,
            deadline_s=retry.deadline_s,
            backoff_base_s=retry.backoff_base_s,
            backoff_max_s=retry.backoff_max_s,
            retry_after_max_s=retry.retry_after_max_s,
            budget_percent=retry.budget_percent,
            budget_min=retry.budget_min_concurrent,
            replay_max_bytes=retry.replay_max_bytes,
        )

    def retries_error(self, error: ProxyError) -> bool:
        """True if ``error`` (which ended an attempt before any response byte) may retry."""
        kind = failure_kind(error)
        return kind is not None and kind in self.conditions

    def backoff_s(self, retry_number: int, rng: random.Random) -> float:
        """Full-jitter backoff before retry ``retry_number`` (1 for the first retry)."""
        ceiling = min(self.backoff_max_s, self.backoff_base_s * (2.0 ** (retry_number - 1)))
        return rng.uniform(0.0, ceiling) if ceiling > 0 else 0.0


class RetryBudget:
    """Requests and retries in flight in one pool; retries only while under the budget."""

    __slots__ = ("requests", "retries")

    def __init__(self) -> None:
        self.requests = 0
        self.retries = 0

    def allows(self, policy: RetryPolicy) -> bool:
        """True if one more retry may start now."""
        retries = self.retries
        # Compared in percent, not as a ratio: 0.07 * 100 is 7.000000000000001 in floats.
        return retries < policy.budget_min or retries * 100 < policy.budget_percent * self.requests


# A Retry-After beyond this (a day) is treated as this; the policy caps it further.
MAX_RETRY_AFTER_S: Final = 86_400


def parse_retry_after(value: bytes, now_epoch_s: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (delay-seconds or an HTTP date), or ``None``."""
    text = value.strip().decode("latin-1")
    if text.isascii() and text.isdigit():
        return float(min(int(text), MAX_RETRY_AFTER_S))
    from email.utils import parsedate_to_datetime

    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    return max(when.timestamp() - now_epoch_s, 0.0)
