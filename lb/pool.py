"""A pool: a named set of backends, the strategy that chooses among them, their connections.

The pool answers one question for the proxy: which backends may take this attempt. It filters
out unhealthy backends and those already tried for the request, so strategies see only
candidates. Discovery (the backend list), health and selection stay three separate things.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lb.backend import DEFAULT_DECAY_S, Backend
from lb.stats import PoolStats
from lb.strategies import Strategy
from lb.upstream import ConnectionPool


@dataclass(slots=True)
class PoolTimeouts:
    """Per-pool upstream timeouts in seconds; ``None`` means no limit."""

    connect_s: float = 5.0
    response_headers_s: float | None = 600.0
    idle_s: float | None = 300.0


class Pool:
    """Backends of one pool with their strategy and keep-alive connection pools."""

    def __init__(
        self,
        name: str,
        backends: Sequence[Backend],
        strategy: Strategy,
        upstreams: dict[Backend, ConnectionPool],
        timeouts: PoolTimeouts,
        rtt_decay_s: float = DEFAULT_DECAY_S,
    ) -> None:
        self.name = name
        self.backends = tuple(backends)
        self.strategy = strategy
        self.upstreams = upstreams
        self.timeouts = timeouts
        self.rtt_decay_s = rtt_decay_s  # the latency estimate's decay, shared with the strategy
        self.stats = PoolStats()
        # Header lines naming each backend, built once: b"x-lb-backend: name\r\n".
        self.backend_lines: dict[Backend, bytes] = {}
        self.healthy: tuple[Backend, ...] = ()
        self.refresh_health()

    def refresh_health(self) -> None:
        """Recompute the healthy set after a backend's health changed."""
        self.healthy = tuple(b for b in self.backends if b.healthy)

    def candidates(self, tried: Sequence[Backend]) -> Sequence[Backend]:
        """Backends eligible for the next attempt: healthy and not yet tried."""
        healthy = self.healthy
        if not tried:
            return healthy
        return [b for b in healthy if b not in tried]

    def close(self) -> None:
        for upstream in self.upstreams.values():
            upstream.close()
