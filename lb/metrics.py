"""Prometheus exposition: reads the live numbers the data plane keeps, at scrape time.

Nothing here runs per request. The collector walks the current pools and backends and reports
the very counters and estimates the strategies read (in-flight, latency estimate, health), so
what a dashboard shows is what the balancer used.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from lb import __version__
from lb.pool import Pool
from lb.stats import Histogram

CODE_CLASSES = ("none", "1xx", "2xx", "3xx", "4xx", "5xx")


def _histogram_buckets(h: Histogram) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    total = 0
    for bound, count in zip(h.buckets, h.counts, strict=False):
        total += count
        out.append((repr(float(bound)), total))
    total += h.counts[-1]
    out.append(("+Inf", total))
    return out


class ProxyCollector(Collector):
    """Collects from whatever pools ``pools()`` returns at scrape time."""

    def __init__(
        self, pools: Callable[[], Mapping[str, Pool]], client_connections: Callable[[], int]
    ) -> None:
        self._pools = pools
        self._client_connections = client_connections

    def collect(self) -> Iterable[Metric]:
        pools = self._pools()
        requests = CounterMetricFamily(
            "lb_requests", "Client requests answered, by pool and status class.",
            labels=["pool", "code_class"],
        )  # fmt: skip
        duration = HistogramMetricFamily(
            "lb_request_duration_seconds",
            "Time from request headers to the end of the response, by pool.",
            labels=["pool"],
        )
        disconnects = CounterMetricFamily(
            "lb_client_disconnects", "Requests whose client went away before the answer ended.",
            labels=["pool"],
        )  # fmt: skip
        responses = CounterMetricFamily(
            "lb_upstream_responses",
            "Upstream attempts by backend and status class (none: no response).",
            labels=["pool", "backend", "code_class"],
        )
        in_flight = GaugeMetricFamily(
            "lb_upstream_in_flight", "Attempts in flight to each backend.",
            labels=["pool", "backend"],
        )  # fmt: skip
        rtt = GaugeMetricFamily(
            "lb_upstream_latency_estimate_seconds",
            "Peak-EWMA latency estimate to response headers, as the strategies see it.",
            labels=["pool", "backend"],
        )
        healthy = GaugeMetricFamily(
            "lb_backend_healthy", "1 if the backend may receive requests, else 0.",
            labels=["pool", "backend"],
        )  # fmt: skip
        weight = GaugeMetricFamily(
            "lb_backend_weight", "Configured weight of the backend.", labels=["pool", "backend"]
        )
        connects = CounterMetricFamily(
            "lb_upstream_connections_opened", "Connections opened to each backend.",
            labels=["pool", "backend"],
        )  # fmt: skip
        idle = GaugeMetricFamily(
            "lb_upstream_idle_connections", "Pooled keep-alive connections to each backend.",
            labels=["pool", "backend"],
        )  # fmt: skip
        for name, pool in pools.items():
            stats = pool.stats
            for cls, count in zip(CODE_CLASSES, stats.responses_by_class, strict=True):
                requests.add_metric([name, cls], count)
            h = stats.duration
            duration.add_metric([name], _histogram_buckets(h), h.sum)
            disconnects.add_metric([name], stats.client_disconnects)
            for b in pool.backends:
                labels = [name, b.name]
                for cls, count in zip(CODE_CLASSES, b.responses_by_class, strict=True):
                    responses.add_metric([*labels, cls], count)
                in_flight.add_metric(labels, b.in_flight)
                rtt.add_metric(labels, b.rtt_estimate_s)
                healthy.add_metric(labels, 1.0 if b.healthy else 0.0)
                weight.add_metric(labels, b.weight)
                up = pool.upstreams[b]
                connects.add_metric(labels, up.connects_total)
                idle.add_metric(labels, up.idle_count)
        clients = GaugeMetricFamily("lb_client_connections", "Open client connections.")
        clients.add_metric([], self._client_connections())
        info = GaugeMetricFamily("lb_build_info", "Build information.", labels=["version"])
        info.add_metric([__version__], 1.0)
        yield from (
            requests, duration, disconnects, responses, in_flight, rtt, healthy, weight,
            connects, idle, clients, info,
        )  # fmt: skip


def make_registry(collector: ProxyCollector) -> CollectorRegistry:
    """The project's own registry (no process-global default collectors)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry
