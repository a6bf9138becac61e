"""Prometheus exposition: reads the live numbers the data plane keeps, at scrape time.

Nothing here runs per request. The collector walks the current pools and backends and reports
the very counters and estimates the strategies read (in-flight, latency estimate, health), so
what a dashboard shows is what the balancer used.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Final

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from lb import __version__
from lb.health import HealthChecker
from lb.load_report import LoadReporter
from lb.pool import Pool
from lb.stats import Histogram

CODE_CLASSES: Final = ("none", "1xx", "2xx", "3xx", "4xx", "5xx")


@dataclass(slots=True)
class ReloadStats:
    """Configuration reloads, as the app counts them."""

    succeeded: int = 0
    failed: int = 0
    last_success_epoch_s: float = 0.0


def _histogram_buckets(h: Histogram) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    total = 0
    for bound, count in zip(h.buckets, h.counts, strict=False):
        total += count
        out.append((repr(float(bound)), total))
    total += h.counts[-1]
    out.append(("+Inf", total))
    return out


class _Resilience:
    """Metric families of health, ejection, retries and admission, filled per scrape."""

    def __init__(self) -> None:
        pb = ["pool", "backend"]
        self.available = GaugeMetricFamily(
            "lb_backend_available",
            "1 if the backend may take new requests (healthy, not drained, ejected or held).",
            labels=pb,
        )
        self.ejected = GaugeMetricFamily(
            "lb_backend_ejected", "1 while the backend is ejected by outlier detection.",
            labels=pb,
        )  # fmt: skip
        self.drained = GaugeMetricFamily(
            "lb_backend_drained", "1 while an operator has drained the backend.", labels=pb
        )
        self.ejections = CounterMetricFamily(
            "lb_ejections", "Outlier ejections of each backend.", labels=pb
        )
        self.effective_weight = GaugeMetricFamily(
            "lb_backend_effective_weight",
            "Weight the strategies use: the configured weight, ramped during slow start.",
            labels=pb,
        )
        self.checks = CounterMetricFamily(
            "lb_health_checks", "Active health probes by result.",
            labels=["pool", "backend", "result"],
        )  # fmt: skip
        self.check_duration = GaugeMetricFamily(
            "lb_health_check_duration_seconds", "Duration of the last health probe.", labels=pb
        )
        self.retries = CounterMetricFamily(
            "lb_retries", "Retries by reason (connect_error, reset, timeout, or a status).",
            labels=["pool", "reason"],
        )  # fmt: skip
        self.panic = GaugeMetricFamily(
            "lb_pool_panic", "1 while the pool balances over all backends (panic mode).",
            labels=["pool"],
        )  # fmt: skip
        self.queue_depth = GaugeMetricFamily(
            "lb_queue_depth", "Requests waiting for a free backend slot.", labels=["pool"]
        )
        self.queue_wait = HistogramMetricFamily(
            "lb_queue_wait_seconds", "Time requests waited in the admission queue.",
            labels=["pool"],
        )  # fmt: skip
        self.rejected = CounterMetricFamily(
            "lb_admission_rejected", "Requests refused by admission control.",
            labels=["pool", "reason"],
        )  # fmt: skip

    def families(self) -> list[Metric]:
        return [
            self.available, self.ejected, self.drained, self.ejections, self.effective_weight,
            self.checks, self.check_duration, self.retries, self.panic, self.queue_depth,
            self.queue_wait, self.rejected,
        ]  # fmt: skip


class ProxyCollector(Collector):
    """Collects from whatever pools ``pools()`` returns at scrape time."""

    def __init__(
        self,
        pools: Callable[[], Mapping[str, Pool]],
        client_connections: Callable[[], int],
        health: Callable[[], Mapping[str, HealthChecker]] = dict,
        reloads: Callable[[], ReloadStats] | None = None,
        load_reports: Callable[[], Mapping[str, LoadReporter]] = dict,
        mirror_skipped: Callable[[], Mapping[str, int]] = dict,
        route_responses: Callable[[], Mapping[str, list[int]]] = dict,
        error_responses: Callable[[], Mapping[tuple[int, str], int]] = dict,
    ) -> None:
        self._pools = pools
        self._client_connections = client_connections
        self._health = health
        self._reloads = reloads
        self._load_reports = load_reports
        self._mirror_skipped = mirror_skipped
        self._route_responses = route_responses
        self._error_responses = error_responses

    def collect(self) -> Iterable[Metric]:
        pools = self._pools()
        requests = CounterMetricFamily(
            "lb_requests", "Client requests answered, by pool and status class.",
            labels=["pool", "code_class"],
        )  # fmt: skip
        by_route = CounterMetricFamily(
            "lb_route_requests", "Client requests answered, by route and status class.",
            labels=["route", "code_class"],
        )  # fmt: skip
        for route, counts in self._route_responses().items():
            for cls, count in zip(CODE_CLASSES, counts, strict=True):
                by_route.add_metric([route, cls], count)
        errors = CounterMetricFamily(
            "lb_error_responses",
            "Error answers the proxy made itself, by status and type, at any stage: malformed "
            "or refused requests, missing keys, no route, no backend, upstream failures.",
            labels=["status", "type"],
        )
        for (status, kind), count in sorted(self._error_responses().items()):
            errors.add_metric([str(status), kind], count)
        duration = HistogramMetricFamily(
            "lb_request_duration_seconds",
            "Time from request headers to the end of the response, by pool.",
            labels=["pool"],
        )
        ttfb = HistogramMetricFamily(
            "lb_request_ttfb_seconds",
            "Time from request headers to response headers sent to the client, by pool.",
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
            "lb_backend_healthy", "1 if the active health check passes, else 0.",
            labels=["pool", "backend"],
        )  # fmt: skip
        weight = GaugeMetricFamily(
            "lb_backend_weight", "Configured weight of the backend.", labels=["pool", "backend"]
        )
        connects = CounterMetricFamily(
            "lb_upstream_connections_opened", "Connections opened to each backend.",
            labels=["pool", "backend"],
        )  # fmt: skip
        connect_failures = CounterMetricFamily(
            "lb_upstream_connect_failures",
            "Connects to each backend that failed: refused, timed out, or a failed TLS handshake.",
            labels=["pool", "backend"],
        )
        idle = GaugeMetricFamily(
            "lb_upstream_idle_connections", "Pooled keep-alive connections to each backend.",
            labels=["pool", "backend"],
        )  # fmt: skip
        resilience = self._resilience_families()
        for name, pool in pools.items():
            self._collect_resilience(name, pool, resilience)
            stats = pool.stats
            for cls, count in zip(CODE_CLASSES, stats.responses_by_class, strict=True):
                requests.add_metric([name, cls], count)
            h = stats.duration
            duration.add_metric([name], _histogram_buckets(h), h.sum)
            t = stats.ttfb
            ttfb.add_metric([name], _histogram_buckets(t), t.sum)
            disconnects.add_metric([name], stats.client_disconnects)
            now = pool.clock()
            for b in pool.backends:
                labels = [name, b.name]
                for cls, count in zip(CODE_CLASSES, b.responses_by_class, strict=True):
                    responses.add_metric([*labels, cls], count)
                in_flight.add_metric(labels, b.in_flight)
                rtt.add_metric(labels, b.rtt_at(now, pool.rtt_decay_s))  # as strategies see it
                healthy.add_metric(labels, 1.0 if b.healthy else 0.0)
                weight.add_metric(labels, b.weight)
                up = pool.upstreams[b]
                connects.add_metric(labels, up.connects_total)
                connect_failures.add_metric(labels, up.connect_failures_total)
                idle.add_metric(labels, up.idle_count)
        clients = GaugeMetricFamily("lb_client_connections", "Open client connections.")
        clients.add_metric([], self._client_connections())
        info = GaugeMetricFamily("lb_build_info", "Build information.", labels=["version"])
        info.add_metric([__version__], 1.0)
        yield from (
            requests, by_route, errors, duration, ttfb, disconnects, responses, in_flight, rtt,
            healthy, weight, connects, connect_failures, idle, clients, info,
        )  # fmt: skip
        yield from resilience.families()
        yield from _inference_families(pools)
        yield from _load_report_families(pools, self._load_reports())
        yield from self._reload_families()
        skipped = CounterMetricFamily(
            "lb_mirror_skipped",
            "Mirrored copies not sent (too many in flight, body too large or incomplete), "
            "by shadow pool.",
            labels=["pool"],
        )
        for pool_name, count in sorted(self._mirror_skipped().items()):
            skipped.add_metric([pool_name], count)
        yield skipped

    def _resilience_families(self) -> _Resilience:
        return _Resilience()

    def _collect_resilience(self, name: str, pool: Pool, f: _Resilience) -> None:
        now = pool.clock()
        checker = self._health().get(name)
        for b in pool.backends:
            labels = [name, b.name]
            f.available.add_metric(labels, 1.0 if b.available else 0.0)
            f.ejected.add_metric(labels, 1.0 if b.ejected_until_s > now else 0.0)
            f.drained.add_metric(labels, 1.0 if b.drained else 0.0)
            f.ejections.add_metric(labels, b.ejections_total)
            f.effective_weight.add_metric(labels, b.effective_weight)
            if checker is not None and checker.has(b):
                probe = checker.stats(b)
                f.checks.add_metric([*labels, "pass"], probe.passed_total)
                f.checks.add_metric([*labels, "fail"], probe.failed_total)
                f.check_duration.add_metric(labels, probe.last_duration_s)
        for reason, count in sorted(pool.stats.retries.items()):
            f.retries.add_metric([name, reason], count)
        f.panic.add_metric([name], 1.0 if pool.panicking else 0.0)
        queue = pool.queue
        if queue is not None:
            f.queue_depth.add_metric([name], len(queue))
            h = queue.waits
            f.queue_wait.add_metric([name], _histogram_buckets(h), h.sum)
            f.rejected.add_metric([name, "queue_full"], queue.rejected_full)
            f.rejected.add_metric([name, "queue_timeout"], queue.rejected_timeout)

    def _reload_families(self) -> Iterable[Metric]:
        if self._reloads is None:
            return
        r = self._reloads()
        reloads = CounterMetricFamily(
            "lb_config_reloads", "Configuration reloads by result.", labels=["result"]
        )
        reloads.add_metric(["success"], r.succeeded)
        reloads.add_metric(["failure"], r.failed)
        yield reloads
        last = GaugeMetricFamily(
            "lb_config_last_reload_success_timestamp_seconds",
            "When the running configuration was loaded (Unix time).",
        )
        last.add_metric([], r.last_success_epoch_s)
        yield last


def _inference_families(pools: Mapping[str, Pool]) -> Iterable[Metric]:
    ttft = HistogramMetricFamily(
        "lb_inference_ttft_seconds",
        "Time to first token: request in to the first SSE data event of a stream.",
        labels=["pool"],
    )
    tbt = HistogramMetricFamily(
        "lb_inference_tbt_seconds", "Time between tokens (SSE data events) of streams.",
        labels=["pool"],
    )  # fmt: skip
    prompt = CounterMetricFamily(
        "lb_inference_prompt_tokens", "Prompt tokens, from the responses' usage.",
        labels=["pool"],
    )  # fmt: skip
    completion = CounterMetricFamily(
        "lb_inference_completion_tokens",
        "Completion tokens: from usage, or counted as stream chunks when a stream had none.",
        labels=["pool", "source"],
    )
    streams = CounterMetricFamily(
        "lb_inference_streams", "Streamed (SSE) responses.", labels=["pool"]
    )
    by_model = CounterMetricFamily(
        "lb_inference_requests",
        "Requests by the model their body named (at most 64 names, then 'other').",
        labels=["pool", "model"],
    )
    shadow = CounterMetricFamily(
        "lb_shadow_decisions",
        "Picks of the pool's shadow strategy, by whether they agreed with the real one.",
        labels=["pool", "agree"],
    )
    for name, pool in pools.items():
        inf = pool.stats.inference
        ttft.add_metric([name], _histogram_buckets(inf.ttft), inf.ttft.sum)
        tbt.add_metric([name], _histogram_buckets(inf.tbt), inf.tbt.sum)
        prompt.add_metric([name], inf.prompt_tokens)
        completion.add_metric([name, "usage"], inf.completion_tokens)
        completion.add_metric([name, "chunks"], inf.completion_tokens_estimated)
        streams.add_metric([name], inf.streams)
        for model, count in sorted(inf.requests_by_model.items()):
            by_model.add_metric([name, model], count)
        if pool.shadow_strategy is not None:
            shadow.add_metric([name, "true"], pool.stats.shadow_agree)
            shadow.add_metric([name, "false"], pool.stats.shadow_disagree)
    return [ttft, tbt, prompt, completion, streams, by_model, shadow]


def _load_report_families(
    pools: Mapping[str, Pool], reporters: Mapping[str, LoadReporter]
) -> Iterable[Metric]:
    pb = ["pool", "backend"]
    scrapes = CounterMetricFamily(
        "lb_load_report_scrapes", "Scrapes of the backends' own /metrics, by result.",
        labels=[*pb, "result"],
    )  # fmt: skip
    waiting = GaugeMetricFamily(
        "lb_backend_reported_waiting", "Requests queued, as the backend reports.", labels=pb
    )
    running = GaugeMetricFamily(
        "lb_backend_reported_running", "Requests running, as the backend reports.", labels=pb
    )
    kv = GaugeMetricFamily(
        "lb_backend_reported_kv_usage", "KV-cache usage (0-1), as the backend reports.",
        labels=pb,
    )  # fmt: skip
    age = GaugeMetricFamily(
        "lb_backend_report_age_seconds", "Age of the backend's last load report.", labels=pb
    )
    now = time.monotonic()
    for name, pool in pools.items():
        reporter = reporters.get(name)
        if reporter is None:
            continue
        for b in pool.backends:
            labels = [name, b.name]
            if reporter.has(b):
                st = reporter.stats(b)
                scrapes.add_metric([*labels, "ok"], st.ok_total)
                scrapes.add_metric([*labels, "failed"], st.failed_total)
            for family, value in (
                (waiting, b.reported_waiting),
                (running, b.reported_running),
                (kv, b.reported_kv_usage),
            ):
                if value is not None:
                    family.add_metric(labels, value)
            if b.reported_at_s > 0:
                age.add_metric(labels, now - b.reported_at_s)
    return [scrapes, waiting, running, kv, age]


def make_registry(collector: ProxyCollector) -> CollectorRegistry:
    """The project's own registry (no process-global default collectors)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry
