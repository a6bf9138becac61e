"""Merging what several workers report into one answer: their ``/metrics`` and admin JSON.

Pure functions over already-fetched data; :mod:`lb.worker_admin` does the fetching.

Metrics: every worker's families are merged by name (HELP and TYPE from the first worker that
has the family) and each series gets a ``worker="i"`` label, so nothing is summed here and
Prometheus can ``sum without (worker)``.

Admin JSON: pools are matched by name and backends by name, in the first worker's order.

- counters, ``in_flight``, ``queue_depth``, ``responses_by_class``, retries, the latency
  histogram's counts and sum: summed (each worker counts its own share of the traffic);
- ``healthy``, ``available``: true if true in any worker (the backend is taking traffic from
  some worker); ``drained``, ``ejected``, ``panicking``: true if true in any worker (an
  operator sees the abnormal state wherever it is); ``ejected_for_s``, ``held_for_s``: the
  longest;
- ``latency_estimate_s``, ``effective_weight``: the mean (each worker's estimate of its own
  traffic; the mean is what the traffic as a whole sees);
- ``weight``, ``max_concurrency``, ``url``, ``strategy``: the first worker's (they agree; note
  that ``max_concurrency`` and the admission queue apply per worker);
- ``recent_errors`` and routing decisions: every worker's, newest first, each with its
  ``worker``, cut to the longest single worker's list.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

WORKER_LABEL = "worker"

Json = dict[str, Any]

_SUMMED_BACKEND = ("in_flight", "requests_total", "failures_total", "ejections_total")
_ANY_BACKEND = ("healthy", "available", "drained", "ejected")
_MEAN_BACKEND = ("latency_estimate_s", "effective_weight")


def merge_metrics(scrapes: Iterable[tuple[int, str]]) -> list[Metric]:
    """Families of every ``(worker index, exposition text)``, each series labelled with its
    worker; raises ``ValueError`` if a text cannot be parsed."""
    families: dict[str, Metric] = {}
    for index, text in scrapes:
        worker = str(index)
        for family in text_string_to_metric_families(text):
            merged = families.get(family.name)
            if merged is None:
                merged = Metric(family.name, family.documentation, family.type, family.unit)
                families[family.name] = merged
            elif merged.type != family.type:
                continue  # a worker mid-upgrade disagreeing on a type: keep the first
            merged.samples.extend(
                Sample(s.name, {**s.labels, WORKER_LABEL: worker}, s.value, s.timestamp)
                for s in family.samples
            )
    return list(families.values())


def _sum_maps(maps: Sequence[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for m in maps:
        for key, value in m.items():
            out[key] = out.get(key, 0) + value
    return out


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _histogram(parts: Sequence[Json]) -> Json:
    first = parts[0]
    counts = [0] * len(first["counts"])
    for h in parts:
        if len(h["counts"]) == len(counts):  # same buckets: always, short of a version skew
            counts = [a + b for a, b in zip(counts, h["counts"], strict=True)]
    return {"buckets": first["buckets"], "counts": counts, "sum": sum(h["sum"] for h in parts)}


def merge_backend(parts: Sequence[Json]) -> Json:
    """One backend's state from each worker that has it (``parts`` is not empty)."""
    out = dict(parts[0])
    for key in _SUMMED_BACKEND:
        out[key] = sum(p[key] for p in parts)
    for key in _ANY_BACKEND:
        out[key] = any(p[key] for p in parts)
    for key in _MEAN_BACKEND:
        out[key] = _mean([p[key] for p in parts])
    out["ejected_for_s"] = max(p["ejected_for_s"] for p in parts)
    out["held_for_s"] = max(p["held_for_s"] for p in parts)
    out["responses_by_class"] = _sum_maps([p["responses_by_class"] for p in parts])
    out["latency"] = _histogram([p["latency"] for p in parts])
    return out


def _newest_first(lists: Sequence[tuple[int, list[Json]]]) -> list[Json]:
    entries = [{**e, WORKER_LABEL: index} for index, items in lists for e in items]
    entries.sort(key=lambda e: e["time"], reverse=True)
    return entries[: max((len(items) for _, items in lists), default=0)]


def merge_pool(parts: Sequence[tuple[int, Json]]) -> Json:
    """One pool's state from each ``(worker index, pool state)`` that has it (not empty)."""
    pools = [p for _, p in parts]
    out = dict(pools[0])
    out["panicking"] = any(p["panicking"] for p in pools)
    for key in ("queue_depth", "retries_total", "client_disconnects"):
        out[key] = sum(p[key] for p in pools)
    out["responses_by_class"] = _sum_maps([p["responses_by_class"] for p in pools])
    out["retries"] = _sum_maps([p["retries"] for p in pools])
    out["recent_errors"] = _newest_first([(i, p["recent_errors"]) for i, p in parts])
    out["backends"] = _merge_backend_lists([p["backends"] for p in pools])
    shadows = [p["shadow"] for p in pools if p.get("shadow") is not None]
    if shadows:
        out["shadow"] = {
            "strategy": shadows[0]["strategy"],
            "agree": sum(s["agree"] for s in shadows),
            "disagree": sum(s["disagree"] for s in shadows),
        }
    return out


def merge_pools(parts: Sequence[tuple[int, list[Json]]]) -> list[Json]:
    """Every pool of every worker, merged by name, in first-seen order."""
    by_name: dict[str, list[tuple[int, Json]]] = {}
    for index, pools in parts:
        for p in pools:
            by_name.setdefault(p["name"], []).append((index, p))
    return [merge_pool(same) for same in by_name.values()]


def merge_backends(parts: Sequence[tuple[int, Json]]) -> Json:
    """A pool's backend list from each worker: each backend merged over the workers."""
    return {
        "pool": parts[0][1]["pool"],
        "backends": _merge_backend_lists([answer["backends"] for _, answer in parts]),
    }


def _merge_backend_lists(lists: Sequence[list[Json]]) -> list[Json]:
    """Backends of one pool as each worker sees them, merged by name, in first-seen order."""
    by_name: dict[str, list[Json]] = {}
    for backends in lists:
        for b in backends:
            by_name.setdefault(b["name"], []).append(b)
    return [merge_backend(same) for same in by_name.values()]


def merge_decisions(parts: Sequence[tuple[int, Json]]) -> Json:
    """A pool's routing decisions from each worker, newest first."""
    return {
        "pool": parts[0][1]["pool"],
        "decisions": _newest_first([(i, d["decisions"]) for i, d in parts]),
    }
