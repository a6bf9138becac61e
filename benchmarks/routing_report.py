"""Numbers of the routing benchmark: one row per segment, a summary per target, the report files.

A segment is one target in one round. Its row holds what the client measured for the requests
that *started* in the measured window, and what the replicas counted between the two
snapshots that bound the window (``/sim/stats``). A target's summary pools the requests of all
its rounds for percentiles and sums the replicas' counters, so rates are over the total time.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

from benchmarks.routing_client import RequestResult
from benchmarks.streams import percentile

CHAT_PATH = "/v1/chat/completions"
# Requests a router sends the replicas besides the chats it forwards, per request: paths the
# simulator does not serve, and its tokenizer endpoints (vllm-router's cache_aware asks every
# worker to render each chat into token ids before placing it).
EXTRA_PATHS = (
    "<unmatched>",
    "/tokenize",
    "/v1/chat/completions/render",
    "/v1/completions/render",
)
DASH = "-"


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000.0, 1)


def _ratio(num: float, den: float, digits: int = 3) -> float | None:
    return round(num / den, digits) if den else None


def _delta(before: dict[str, Any], after: dict[str, Any], key: str) -> int:
    return int(after[key]) - int(before[key])


def _path_delta(before: dict[str, Any], after: dict[str, Any], path: str) -> int:
    return int(after["requests_by_path"].get(path, 0)) - int(
        before["requests_by_path"].get(path, 0)
    )


def client_figures(results: list[RequestResult]) -> dict[str, Any]:
    """Counts, time to first token and latency (of complete requests), and affinity figures.

    ``sticky_turns``: of the turns after a session's first whose previous turn is among
    ``results``, the share served by the replica that served the previous turn.
    ``replicas_per_tenant``: distinct replicas that served a tenant, averaged over tenants.
    Both ``None`` when the target does not pass the replica's ``x-sim-instance`` header on.
    """
    ok = [r for r in results if r.error is None]
    errors = Counter(r.error for r in results if r.error is not None)
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    latency = [r.latency_s for r in ok if r.latency_s is not None]
    by_turn = {(r.session_id, r.turn): r.replica for r in results}
    same = moved = 0
    for r in results:
        previous = by_turn.get((r.session_id, r.turn - 1))
        if r.turn > 0 and previous is not None and r.replica is not None:
            same += previous == r.replica
            moved += previous != r.replica
    tenants: dict[int, set[str]] = {}
    for r in ok:
        if r.tenant is not None and r.replica is not None:
            tenants.setdefault(r.tenant, set()).add(r.replica)
    return {
        "requests": len(results),
        "ok": len(ok),
        "errors": dict(errors),
        "ttft_ms_mean": _ms(statistics.fmean(ttft)) if ttft else None,
        "ttft_ms_p50": _ms(percentile(ttft, 50)),
        "ttft_ms_p90": _ms(percentile(ttft, 90)),
        "ttft_ms_p99": _ms(percentile(ttft, 99)),
        "latency_ms_p50": _ms(percentile(latency, 50)),
        "latency_ms_p90": _ms(percentile(latency, 90)),
        "latency_ms_p99": _ms(percentile(latency, 99)),
        "client_tokens": sum(r.tokens for r in results),
        "sticky_turns": _ratio(same, same + moved),
        "replicas_per_tenant": (
            round(statistics.fmean(len(v) for v in tenants.values()), 2) if tenants else None
        ),
    }


def segment_row(
    marks: dict[str, Any], measured: list[RequestResult], names: list[str]
) -> dict[str, Any]:
    """The row of one segment from its window's ``marks`` and its measured requests."""
    before, after = marks["before"], marks["after"]
    cpu0, cpu1 = marks["cpu_before"], marks["cpu_after"]
    window_s = cpu1["wall"] - cpu0["wall"]
    pairs = list(zip(before, after, strict=True))
    chats = [_path_delta(b, a, CHAT_PATH) for b, a in pairs]
    queues: list[list[int]] = marks["queues"]
    lag: list[float] = marks["lag_s"]
    row: dict[str, Any] = {
        **client_figures(measured),
        "window_s": round(window_s, 3),
        "replicas": names,
        "replica_chats": chats,
        "extra_requests": sum(_path_delta(b, a, path) for b, a in pairs for path in EXTRA_PATHS),
        "hit_tokens": sum(_delta(b, a, "prefix_cache_hit_tokens") for b, a in pairs),
        "query_tokens": sum(_delta(b, a, "prefix_cache_query_tokens") for b, a in pairs),
        "generated_tokens": sum(_delta(b, a, "generation_tokens_total") for b, a in pairs),
        "max_waiting": [max((q[i] for q in queues), default=0) for i in range(len(names))],
        "mean_waiting": [
            round(statistics.fmean(q[i] for q in queues), 2) if queues else 0.0
            for i in range(len(names))
        ],
        "target_cpu_busy": _ratio(cpu1["target"] - cpu0["target"], window_s),
        "fleet_cpu_busy": _ratio(cpu1["fleet"] - cpu0["fleet"], window_s),
        "client_cpu_busy": _ratio(cpu1["client"] - cpu0["client"], window_s),
        "client_lag_ms_p99": _ms(percentile(lag, 99)),
        "client_lag_ms_max": _ms(max(lag)) if lag else None,
    }
    return _derived(row)


def _derived(row: dict[str, Any]) -> dict[str, Any]:
    chats = row["replica_chats"]
    total = sum(chats)
    row["hit_rate"] = _ratio(row["hit_tokens"], row["query_tokens"])
    row["tokens_per_s"] = round(row["generated_tokens"] / row["window_s"], 1)
    row["replica_shares"] = [round(c / total, 3) if total else 0.0 for c in chats]
    row["extra_requests_per_chat"] = _ratio(row["extra_requests"], total, 2)
    return row


def summarise(rows: list[dict[str, Any]], pooled: list[RequestResult]) -> dict[str, Any]:
    """One target over all rounds: pooled requests, summed counters, worst queues and lag."""
    summary: dict[str, Any] = client_figures(pooled)
    summary["window_s"] = round(sum(r["window_s"] for r in rows), 3)
    for key in ("extra_requests", "hit_tokens", "query_tokens", "generated_tokens"):
        summary[key] = sum(r[key] for r in rows)
    summary["replicas"] = rows[0]["replicas"]
    summary["replica_chats"] = [
        sum(c) for c in zip(*(r["replica_chats"] for r in rows), strict=True)
    ]
    summary["max_waiting"] = [max(c) for c in zip(*(r["max_waiting"] for r in rows), strict=True)]
    summary["mean_waiting"] = [
        round(statistics.fmean(c), 2) for c in zip(*(r["mean_waiting"] for r in rows), strict=True)
    ]
    for key in ("target_cpu_busy", "fleet_cpu_busy", "client_cpu_busy"):
        values = [r[key] for r in rows if r[key] is not None]
        summary[key] = round(statistics.fmean(values), 3) if values else None
    for key in ("client_lag_ms_p99", "client_lag_ms_max"):
        values = [r[key] for r in rows if r[key] is not None]
        summary[key] = max(values) if values else None
    return _derived(summary)


# --- Markdown -------------------------------------------------------------------------------


def intro(results: dict[str, Any]) -> list[str]:
    """The setup in a few sentences, for the top of the report."""
    st, wl = results["settings"], results["workload"]
    k, sh, lo, he = st["knobs"], wl["shared"], wl["loaded"], wl["hetero"]
    p1, p2, p3 = st["shared"], st["loaded"], st["hetero"]
    return [
        f"Fleet: {st['replicas']} `backends.sim` processes (one per replica): prefill "
        f"{k['ttft_ms']:g} ms + {k['prefill_ms_per_token']:g} ms per uncached prompt token, "
        f"{k['decode_ms']:g} ms per output token, batches of {k['max_batch']}, prefix cache of "
        f"{k['cache_capacity_blocks']} blocks of {k['block_size']} tokens per replica. "
        f"{st['rounds']} interleaved round(s); each segment empties the caches, warms up, then "
        "measures the requests that start in its window. Client: this process, asyncio on "
        "uvloop, raw sockets, one connection per streamed request.",
        "",
        f"1. Shared prefixes: {sh['tenants']} tenants with system prompts of "
        f"{sh['system_chars'][0]:,}-{sh['system_chars'][1]:,} characters (Zipf "
        f"s={sh['zipf_s']:g} popularity); sessions arrive as a Poisson process at "
        f"{sh['sessions_per_s']:g}/s with {sh['turns'][0]}-{sh['turns'][1]} turns (each turn "
        f"sends the whole conversation plus {sh['user_chars'][0]}-{sh['user_chars'][1]} new "
        f"characters, asks for {sh['max_tokens'][0]}-{sh['max_tokens'][1]} tokens, then "
        f"thinks ~{sh['think_mean_s']:g} s); warm-up {p1['warmup_s']:g} s, measured "
        f"{p1['measure_s']:g} s per segment.",
        f"2. Shared prefixes under load: the same tenants, sessions at "
        f"{lo['sessions_per_s']:g}/s and Zipf s={lo['zipf_s']:g} (the most popular tenant "
        f"has {zipf_top_share(lo['tenants'], lo['zipf_s']):.0%} of the sessions), so the hot "
        f"tenants' replica saturates under strict affinity; warm-up {p2['warmup_s']:g} s, "
        f"measured {p2['measure_s']:g} s per segment.",
        f"3. Heterogeneous fleet: {results.get('slow_replica', 'the last replica')} at speed "
        f"{st['slow_speed']:g}; single-turn chats with unique prompts of "
        f"{he['prompt_chars'][0]:,}-{he['prompt_chars'][1]:,} characters and "
        f"{he['max_tokens'][0]}-{he['max_tokens'][1]} output tokens, Poisson at "
        f"{he['requests_per_s']:g}/s; warm-up {p3['warmup_s']:g} s, measured "
        f"{p3['measure_s']:g} s per segment.",
    ]


def _num(value: Any, digits: int = 1) -> str:
    if value is None:
        return DASH
    return f"{value:,.{digits}f}"


def _pct(value: float | None) -> str:
    return DASH if value is None else f"{value:.0%}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _errors(summary: dict[str, Any]) -> str:
    errors: dict[str, int] = summary["errors"]
    return ", ".join(f"{v} {k}" for k, v in errors.items()) if errors else "0"


def _shares(summary: dict[str, Any]) -> str:
    return " / ".join(f"{s:.0%}" for s in summary["replica_shares"])


def _machine(results: dict[str, Any]) -> list[str]:
    m = results["machine"]
    commit = m["git_commit"] + (" (with uncommitted changes)" if m["git_dirty"] else "")
    packages = ", ".join(f"{k} {v}" for k, v in m["packages"].items())
    peers = ", ".join(f"{k} {v}" for k, v in results["peer_versions"].items()) or "none"
    rows = [
        ["CPU", f"{m['cpu_model']}, {m['cpu_count']} cores"],
        ["Memory", f"{m['memory_gib']} GiB"],
        ["Kernel", m["kernel"]],
        ["Python", m["python"]],
        ["Packages", packages],
        ["Peers", peers],
        ["Commit", commit],
        ["Pinning", results["settings"]["pinning"]],
    ]
    return _table(["", ""], rows)


def zipf_top_share(tenants: int, s: float) -> float:
    """The most popular tenant's share of sessions under Zipf exponent ``s``."""
    return 1.0 / sum(math.pow(rank, -s) for rank in range(1, tenants + 1))


def _shared(results: dict[str, Any], scenario: str, title: str) -> list[str]:
    rows = []
    for name, target in results[scenario].items():
        s = target["summary"]
        rows.append(
            [
                name,
                f"{s['ok']:,}",
                _errors(s),
                _num(s["ttft_ms_mean"]),
                _num(s["ttft_ms_p50"]),
                _num(s["ttft_ms_p90"]),
                _num(s["ttft_ms_p99"]),
                _num(s["latency_ms_p50"], 0),
                _num(s["tokens_per_s"], 0),
                _pct(s["hit_rate"]),
                _shares(s),
                " / ".join(str(w) for w in s["max_waiting"]),
                " / ".join(f"{w:.1f}" for w in s["mean_waiting"]),
                _pct(s["sticky_turns"]),
                _num(s["replicas_per_tenant"], 2),
            ]
        )
    header = [
        "target", "requests", "errors", "TTFT mean ms", "TTFT p50 ms", "TTFT p90 ms",
        "TTFT p99 ms", "latency p50 ms", "fleet output tok/s", "prefix-cache hit rate",
        "requests per replica", "max queue per replica", "mean queue per replica",
        "turns on previous turn's replica", "replicas per tenant",
    ]  # fmt: skip
    return [f"## {title}", "", *_table(header, rows), ""]


def _hetero(results: dict[str, Any]) -> list[str]:
    names: list[str] = results["replicas"]
    slow = names.index(results["slow_replica"])
    rows = []
    for name, target in results["hetero"].items():
        s = target["summary"]
        rows.append(
            [
                name,
                f"{s['ok']:,}",
                _errors(s),
                _num(s["latency_ms_p50"], 0),
                _num(s["latency_ms_p99"], 0),
                _num(s["ttft_ms_p50"]),
                _num(s["ttft_ms_p99"]),
                _pct(s["replica_shares"][slow]),
                _shares(s),
                " / ".join(str(w) for w in s["max_waiting"]),
            ]
        )
    header = [
        "target", "requests", "errors", "latency p50 ms", "latency p99 ms", "TTFT p50 ms",
        "TTFT p99 ms", "share to slow replica", "requests per replica",
        "max queue per replica",
    ]  # fmt: skip
    return ["## 3. Heterogeneous fleet", "", *_table(header, rows), ""]


def _rounds(results: dict[str, Any]) -> list[str]:
    rows = []
    for scenario in ("shared", "loaded", "hetero"):
        for name, target in results.get(scenario, {}).items():
            for r in target["rounds"]:
                rows.append(
                    [
                        scenario,
                        name,
                        str(r["round"]),
                        f"{r['ok']:,}",
                        _num(r["ttft_ms_p90"]),
                        _num(r["latency_ms_p99"], 0),
                        _pct(r["hit_rate"]),
                        _num(r["tokens_per_s"], 0),
                        _num(r["target_cpu_busy"], 2),
                        _num(r["fleet_cpu_busy"], 2),
                        _num(r["client_cpu_busy"], 2),
                        _num(r["client_lag_ms_p99"]),
                        _num(r["extra_requests_per_chat"], 2),
                    ]
                )
    header = [
        "scenario", "target", "round", "requests", "TTFT p90 ms", "latency p99 ms",
        "hit rate", "tok/s", "router CPU", "fleet CPU", "client CPU", "client lag p99 ms",
        "extra upstream req/chat",
    ]  # fmt: skip
    return ["## Every round", "", *_table(header, rows), ""]


def _notes(results: dict[str, Any]) -> list[str]:
    lines = ["## Peers and logs", ""]
    for name, note in results["peer_notes"].items():
        lines.append(f"- {name}: {note}")
    for name, metrics in results.get("lb_metrics", {}).items():
        if "error" in metrics:
            lines.append(f"- {name} `/metrics`: scrape failed: {metrics['error']}")
            continue
        answers = ", ".join(f"{k} {v:,}" for k, v in metrics["requests_by_class"].items())
        lines.append(f"- {name} answers by class (whole run): {answers}")
    for name, log in results["logs"].items():
        lines.append(f"- {name}: {log['lines']} log lines")
        if log["notable"]:
            lines += ["", "  ```", *(f"  {line[:240]}" for line in log["notable"]), "  ```", ""]
    return [*lines, ""]


def render(results: dict[str, Any], intro: list[str]) -> str:
    """The Markdown report: ``intro`` (the setup in words), then every table."""
    lines = [
        f"# lb routing benchmark, {results['date']} on {results['host']}",
        "",
        "Made by `make bench-routing` (`python -m benchmarks.routing`); "
        "`benchmarks/README.md` explains every number.",
        "",
        *_machine(results),
        "",
        *intro,
        "",
    ]
    if "shared" in results:
        lines += _shared(results, "shared", "1. Shared prefixes")
    if "loaded" in results:
        lines += _shared(results, "loaded", "2. Shared prefixes under load")
    if "hetero" in results:
        lines += _hetero(results)
    lines += _rounds(results) + _notes(results)
    return "\n".join(lines)


def write_results(
    results: dict[str, Any], directory: Path, intro: list[str]
) -> tuple[Path, Path, Path]:
    """Write ``routing-<date>.json`` and ``.md`` and copy the Markdown to ``routing-latest.md``."""
    directory.mkdir(parents=True, exist_ok=True)
    stem = f"routing-{results['date']}"
    json_path, md_path = directory / f"{stem}.json", directory / f"{stem}.md"
    latest = directory / "routing-latest.md"
    json_path.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    text = render(results, intro)
    md_path.write_text(text)
    latest.write_text(text)
    return json_path, md_path, latest
