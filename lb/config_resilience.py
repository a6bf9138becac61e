"""The configuration of resilience: health checks, outlier ejection, retries, admission control.

Defaults suit inference: generations are long and expensive, model servers answer 503 or 429
when their batch is full, and a replica that crashed usually refuses connections.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from lb.config_base import ConfigModel

RetryCondition = Literal["connect_error", "reset", "timeout"]


def parse_status_ranges(items: list[int | str]) -> tuple[tuple[int, int], ...]:
    """``[200, "300-399"]`` as inclusive ranges; raises ``ValueError`` on a bad item."""
    ranges: list[tuple[int, int]] = []
    for item in items:
        text = str(item).strip()
        low_text, dash, high_text = text.partition("-")
        try:
            low = int(low_text)
            high = int(high_text) if dash else low
        except ValueError:
            raise ValueError(f"{item!r} is not a status or a range like 200-299") from None
        if not 100 <= low <= high <= 599:
            raise ValueError(f"{item!r} is not within 100-599")
        ranges.append((low, high))
    return tuple(ranges)


class HealthCheck(ConfigModel):
    """Active health checks: each backend probed on an interval, with rise and fall counts."""

    enabled: bool = Field(default=True, description="Probe backends actively.")
    type: Literal["http", "tcp"] = Field(
        default="http", description="http: GET `path`; tcp: a connection that opens."
    )
    path: str = Field(default="/health", description="Path probed by http checks.")
    interval_s: float = Field(default=5.0, gt=0, description="Seconds between probes.")
    timeout_s: float = Field(default=2.0, gt=0, description="A probe slower than this fails.")
    healthy_threshold: int = Field(
        default=2, ge=1, description="Consecutive passes that bring a backend back (rise)."
    )
    unhealthy_threshold: int = Field(
        default=3, ge=1, description="Consecutive failures that take a backend out (fall)."
    )
    expected_statuses: list[int | str] = Field(
        default_factory=lambda: list[int | str](["200-299"]),
        min_length=1,
        description="Statuses that pass an http probe: codes or ranges like 200-299.",
    )
    jitter_percent: float = Field(
        default=10.0, ge=0, le=100, description="Random spread of each interval, in percent."
    )
    transition_interval_s: float = Field(
        default=1.0, gt=0, description="Seconds between probes while a backend changes state."
    )
    initial_state: Literal["healthy", "unhealthy"] = Field(
        default="healthy",
        description="healthy: a new backend serves at once; unhealthy: after its first pass.",
    )

    @field_validator("path")
    @classmethod
    def _check_path(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError(f"must start with '/' (got {value!r})")
        return value

    @field_validator("expected_statuses")
    @classmethod
    def _check_statuses(cls, value: list[int | str]) -> list[int | str]:
        parse_status_ranges(value)
        return value


class OutlierDetection(ConfigModel):
    """Passive ejection of backends that fail real traffic."""

    enabled: bool = Field(default=True, description="Eject backends on consecutive failures.")
    consecutive_failures: int = Field(
        default=5, ge=1, description="Failures in a row (errors, timeouts, failure statuses)."
    )
    failure_statuses: list[int] = Field(
        default_factory=lambda: [500, 502, 503, 504],
        description="Statuses that count as failures (429 is load, not sickness).",
    )
    base_ejection_s: float = Field(
        default=10.0, gt=0, description="First ejection; each further one lasts longer."
    )
    max_ejection_s: float = Field(default=300.0, gt=0, description="Longest ejection.")
    max_ejection_percent: float = Field(
        default=50.0,
        ge=0,
        le=100,
        description="Most of the pool ejected at once (at least one backend of two or more).",
    )

    @field_validator("failure_statuses")
    @classmethod
    def _check_failure_statuses(cls, value: list[int]) -> list[int]:
        for item in value:
            if not 100 <= item <= 599:
                raise ValueError(f"{item} is not an HTTP status")
            if item < 400:
                raise ValueError(
                    f"{item} is no error status: a backend answering it is not failing"
                )
        return value

    @model_validator(mode="after")
    def _check_ejection_times(self) -> OutlierDetection:
        # Only when both are written: a long base alone is capped by the default maximum,
        # as it always was.
        written = self.model_fields_set
        if (
            "max_ejection_s" in written
            and "base_ejection_s" in written
            and self.max_ejection_s < self.base_ejection_s
        ):
            raise ValueError(
                f"max_ejection_s ({self.max_ejection_s:g}) is shorter than base_ejection_s "
                f"({self.base_ejection_s:g})"
            )
        return self


class Retry(ConfigModel):
    """When a failed attempt is tried again on another backend."""

    max_retries: int = Field(default=2, ge=0, description="Tries after the first.")
    retry_on: list[RetryCondition | int] = Field(
        default_factory=lambda: list[RetryCondition | int](
            ["connect_error", "reset", 502, 503, 504, 429]
        ),
        description="Failures that retry: connect_error, reset, timeout, or statuses.",
    )
    per_try_timeout_s: float | None = Field(
        default=None,
        gt=0,
        description="Time to response headers for each try; default timeouts.response_headers_s.",
    )
    deadline_s: float | None = Field(
        default=None,
        gt=0,
        description="No new try starts this long after the request came, and the wait for "
        "response headers ends there.",
    )
    backoff_base_s: float = Field(
        default=0.025, ge=0, description="Backoff before retry n: random in [0, base * 2^n]."
    )
    backoff_max_s: float = Field(default=0.5, ge=0, description="Cap of the backoff.")
    retry_after_max_s: float = Field(
        default=30.0, ge=0, description="Longest Retry-After from a backend that is honoured."
    )
    budget_percent: float = Field(
        default=20.0, ge=0, le=100, description="Retries in flight, as a share of requests."
    )
    budget_min_concurrent: int = Field(
        default=3, ge=0, description="Retries always allowed in flight, whatever the share."
    )
    replay_max_bytes: int = Field(
        default=1 << 20, ge=0, description="Request bodies up to this size are kept for retries."
    )

    @field_validator("retry_on")
    @classmethod
    def _check_statuses(cls, value: list[RetryCondition | int]) -> list[RetryCondition | int]:
        for item in value:
            if isinstance(item, int) and not 100 <= item <= 599:
                raise ValueError(f"{item} is not an HTTP status")
            if isinstance(item, int) and item < 400:
                raise ValueError(f"{item} is no error status: an answer that worked is not retried")
        return value


class Admission(ConfigModel):
    """Concurrency limits per backend and the queue in front of a full pool."""

    max_concurrency: int | None = Field(
        default=None, ge=1, description="Requests in flight per backend; null means no limit."
    )
    max_queue: int = Field(default=1000, ge=0, description="Requests waiting for a free slot.")
    queue_timeout_s: float = Field(default=30.0, gt=0, description="Longest wait in the queue.")
    reject_status: Literal[429, 503] = Field(
        default=503, description="Status when the queue is full or the wait expires."
    )
    retry_after_s: int = Field(
        default=1, ge=0, description="Retry-After sent with a rejection, in seconds."
    )
