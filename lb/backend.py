"""Live state of one upstream backend: identity, weight and the load numbers strategies read.

The numbers here (in-flight count, latency estimate, outcome counters) are written only by
:class:`lb.load.Attempt`, the guard around each upstream attempt; strategies, metrics and the
admin side read them. What is read is what was used.
"""

from __future__ import annotations

import math
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import urlsplit

from lb.histogram import Histogram

# Peak-EWMA defaults (tower's `load::peak_ewma`, Finagle's `PeakEwma`): the estimate decays
# towards new samples with time constant `decay_s`, but jumps up to any sample above it at once.
DEFAULT_DECAY_S: Final = 10.0


def decay_seconds(options: Mapping[str, Any]) -> float:
    """The ``decay_s`` option of a pool's strategy, shared by the pool's latency estimates:
    ``DEFAULT_DECAY_S`` when unset; raises ``ValueError`` unless a positive, finite number."""
    value = options.get("decay_s", DEFAULT_DECAY_S)
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"must be a positive number of seconds (got {value!r})")
    return float(value)


# Below this, a decayed failure score counts as no failure at all.
FAILURE_SCORE_FLOOR: Final = 0.01
# Estimate for a backend that has never answered: a modest guess, so new backends get tried.
DEFAULT_RTT_S: Final = 0.030


class PoolLoad:
    """Running totals over one pool's backends, so a strategy need not sum them per pick.

    ``in_flight``: requests in flight on the pool's backends, and ``full``: the backends
    holding their ``max_concurrency``, both written only by :class:`lb.load.Attempt` beside
    each backend's own count. ``eligible_weight``: the summed ``effective_weight`` of the
    pool's eligible backends, written by :class:`lb.pool.Pool` whenever the eligible set or a
    weight changes.
    """

    __slots__ = ("eligible_weight", "full", "in_flight")

    def __init__(self, backends: tuple[Backend, ...] = ()) -> None:
        self.in_flight = sum(b.in_flight for b in backends)
        self.full: set[Backend] = {b for b in backends if not b.has_room}
        self.eligible_weight = 0.0


@dataclass(eq=False, slots=True)
class Backend:
    """One upstream server of a pool.

    ``name`` is the stable identifier used in logs, metrics labels and the response header;
    it defaults to ``host:port``. ``weight`` is a positive integer (default 1).
    Identity is the object itself (``eq=False``), so a backend can key dicts and sets.
    """

    url: str
    name: str
    scheme: str
    host: str
    port: int
    weight: int = 1
    max_concurrency: int | None = None  # requests in flight at most; None: no limit

    # Eligibility, written by the pool's health, ejection and drain logic (lb.pool).
    healthy: bool = True  # the active health check's verdict
    # New, with initial_state unhealthy, and not yet probed: not even panic mode sends to it.
    awaiting_check: bool = False
    drained: bool = False  # taken out by an operator: no new requests
    ejected_until_s: float = 0.0  # passive outlier ejection, on the monotonic clock
    ejections: int = 0  # ejections in the current streak; the next one lasts longer
    ejections_total: int = 0
    held_until_s: float = 0.0  # a Retry-After from the backend, on the monotonic clock
    available: bool = True  # healthy, not drained, not ejected, not held: may take requests
    # Slow start: the weight strategies use, ramped up after the backend comes back.
    effective_weight: float = 1.0

    # Load, written only by lb.load.Attempt.
    in_flight: int = 0
    rtt_estimate_s: float = DEFAULT_RTT_S
    rtt_stamp_s: float = 0.0  # clock reading when rtt_estimate_s was last updated
    requests_total: int = 0
    failures_total: int = 0
    consecutive_failures: int = 0
    # Recent failures as phantom load, decaying with decay_s: a backend that fails fast holds
    # few requests in flight, and must not look idle to least_connections because of it.
    failure_score: float = 0.0
    failure_stamp_s: float = 0.0
    # Responses by status class: index 1..5 for 1xx..5xx, index 0 for "no response".
    responses_by_class: list[int] = field(default_factory=lambda: [0] * 6)
    latency: Histogram = field(default_factory=Histogram)  # attempt durations, seconds

    # Load the backend reports about itself (its /metrics, scraped by lb.load_report): None
    # until a scrape succeeded. ``reported_at_s`` (monotonic clock) tells how fresh it is.
    reported_waiting: float | None = None  # requests queued in the model server
    reported_running: float | None = None  # requests in its running batch
    reported_kv_usage: float | None = None  # KV-cache usage, 0..1
    reported_at_s: float = 0.0

    # ``host:port`` as sent in a Host header, IPv6 literals in brackets (set from host, port).
    authority: bytes = field(default=b"", init=False, repr=False)

    # The totals of the pool this backend belongs to (None for a backend in no pool).
    pool_load: PoolLoad | None = None

    # TLS for https:// backends, set from the pool's ``tls`` settings (lb.tls): the client
    # context and the name checked in the certificate (None: the host).
    ssl_context: ssl.SSLContext | None = None
    server_name: str | None = None

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        weight: int = 1,
        name: str | None = None,
        max_concurrency: int | None = None,
    ) -> Backend:
        """Build a backend from ``http://host:port`` (or ``https://``); port defaults by scheme."""
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise ValueError(f"unsupported scheme {parts.scheme!r} (use http or https)")
        host = parts.hostname
        if not host:
            raise ValueError("URL has no host")
        port = parts.port or (443 if scheme == "https" else 80)
        return cls(
            url=url,
            name=name or f"{host}:{port}",
            scheme=scheme,
            host=host,
            port=port,
            weight=weight,
            max_concurrency=max_concurrency,
        )

    def __post_init__(self) -> None:
        self.effective_weight = float(self.weight)
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.authority = f"{host}:{self.port}".encode()

    @property
    def origin(self) -> str:
        """``scheme://host:port``, with an IPv6 literal in brackets: the base of URLs to it."""
        return f"{self.scheme}://{self.authority.decode()}"

    @property
    def has_room(self) -> bool:
        """True unless the backend holds ``max_concurrency`` requests already."""
        limit = self.max_concurrency
        return limit is None or self.in_flight < limit

    def failure_score_at(self, now_s: float, decay_s: float = DEFAULT_DECAY_S) -> float:
        """Recent failures, each weighing 1 when it happened and decaying with ``decay_s``."""
        score = self.failure_score
        if score == 0.0:
            return 0.0
        score *= math.exp(-max(now_s - self.failure_stamp_s, 0.0) / decay_s)
        # A faded remainder is dropped, so an idle backend ties its peers again exactly.
        return score if score >= FAILURE_SCORE_FLOOR else 0.0

    def rtt_at(self, now_s: float, decay_s: float = DEFAULT_DECAY_S) -> float:
        """The latency estimate as of ``now_s``, decayed towards the default guess.

        An estimate that is not refreshed by traffic relaxes towards ``DEFAULT_RTT_S``, so a
        backend that was once slow (or failed) is tried again after a while instead of being
        shunned forever.
        """
        age = now_s - self.rtt_stamp_s
        if age <= 0.0:
            return self.rtt_estimate_s
        w = math.exp(-age / decay_s)
        return self.rtt_estimate_s * w + DEFAULT_RTT_S * (1.0 - w)
