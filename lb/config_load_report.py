"""The configuration of load reports: scraping each backend's own /metrics for its queue and KV use.

Model servers know their load better than the proxy does: requests queued inside the engine,
the running batch, the share of the KV cache in use. ``LoadReport`` says where to read them,
how often, and how old a reading may get before strategies stop trusting it.
"""

from __future__ import annotations

import re
from typing import Literal, Self

from pydantic import Field, field_validator, model_validator

from lb.config_base import ConfigModel

Preset = Literal["vllm", "sglang", "tgi", "triton", "custom"]

# A Prometheus metric name (the exposition format's grammar; ':' is allowed, vLLM uses it).
_METRIC_NAME = re.compile(r"^[A-Za-z_:][A-Za-z0-9_:]*$")


class LoadMetricNames(ConfigModel):
    """Metric names to read; with a preset, a name given here replaces the preset's."""

    waiting: str | None = Field(
        default=None, description="Gauge of requests queued in the server, not yet running."
    )
    running: str | None = Field(
        default=None, description="Gauge of requests in the server's running batch."
    )
    kv_usage: str | None = Field(
        default=None,
        description="Gauge of KV-cache usage, a 0..1 fraction after kv_usage_scale.",
    )

    @field_validator("waiting", "running", "kv_usage")
    @classmethod
    def _check_name(cls, value: str | None) -> str | None:
        if value is not None and not _METRIC_NAME.match(value):
            raise ValueError(f"{value!r} is not a Prometheus metric name")
        return value


class LoadReport(ConfigModel):
    """Scrape each backend's Prometheus endpoint on an interval for the load it reports."""

    enabled: bool = Field(default=False, description="Scrape backends for their reported load.")
    path: str = Field(default="/metrics", description="Path of the Prometheus text endpoint.")
    interval_s: float = Field(default=0.25, gt=0, description="Seconds between scrape starts.")
    timeout_s: float = Field(default=1.0, gt=0, description="A scrape slower than this fails.")
    preset: Preset = Field(
        default="vllm",
        description="Metric names of a known server: vllm, sglang, tgi, triton, or custom.",
    )
    metrics: LoadMetricNames = Field(
        default_factory=LoadMetricNames,
        description="Metric names for custom, or overrides of the preset's.",
    )
    max_age_s: float = Field(
        default=1.0,
        gt=0,
        description="A report older than this is stale: strategies treat it as unknown.",
    )
    kv_usage_scale: float = Field(
        default=1.0,
        gt=0,
        description="Multiplies the KV metric into a 0..1 fraction (0.01 for a percentage).",
    )

    @field_validator("path")
    @classmethod
    def _check_path(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError(f"must start with '/' (got {value!r})")
        return value

    @model_validator(mode="after")
    def _check_consistency(self) -> Self:
        if self.preset == "custom":
            m = self.metrics
            if m.waiting is None and m.running is None and m.kv_usage is None:
                raise ValueError("preset 'custom' needs at least one name under 'metrics'")
        # A report must survive until the next scrape lands, or every backend would look stale
        # between scrapes and least_loaded would fall back to in-flight counts half the time.
        if self.max_age_s <= self.interval_s:
            raise ValueError(
                f"max_age_s ({self.max_age_s:g}) must be longer than interval_s "
                f"({self.interval_s:g}), or reports go stale between scrapes"
            )
        return self
