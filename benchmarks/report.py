"""Summaries of a benchmark run: medians over rounds, the JSON file and the Markdown table."""

from __future__ import annotations

import json
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

# How rounds combine into one number per target: counts add up, worst cases keep the worst,
# everything else takes the median round.
SUMMED = frozenset({"requests", "non_2xx", "socket_errors", "streams", "events", "failed_streams"})
WORST = frozenset({"latency_ms_max", "gap_ms_max_dev"})
DASH = "-"


def aggregate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from several rounds: sums for counts, maxima for worst cases, else medians."""
    out: dict[str, Any] = {}
    for key in rows[0]:
        values = [row[key] for row in rows if row.get(key) is not None]
        if key == "round":
            continue
        if key == "errors":
            merged: Counter[str] = Counter()
            for value in values:
                merged.update(value)
            out[key] = dict(merged)
        elif not values or not all(isinstance(v, int | float) for v in values):
            out[key] = values[0] if len(values) == 1 else None
        elif key in SUMMED:
            out[key] = sum(values)
        elif key in WORST:
            out[key] = max(values)
        else:
            out[key] = round(statistics.median(values), 3)
    return out


def _num(value: Any, digits: int = 2, thousands: bool = False) -> str:
    if value is None:
        return DASH
    if thousands:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _machine(results: dict[str, Any]) -> list[str]:
    machine, settings = results["machine"], results["settings"]
    packages = ", ".join(f"{k} {v}" for k, v in machine["packages"].items())
    commit = machine["git_commit"]
    if machine["git_dirty"]:
        commit += " (with uncommitted changes)"
    memory = machine["memory_gib"]
    rows = [
        ["CPU", f"{machine['cpu_model']}, {machine['cpu_count']} cores"],
        ["Memory", f"{memory} GiB" if memory is not None else "unknown"],
        ["Kernel", machine["kernel"]],
        ["Python", machine["python"]],
        ["Packages", packages],
        ["Load generator", machine["wrk"]],
        ["Commit", commit],
        ["Pinning", ("pinned: " if settings["pinned"] else "") + settings["pinning"]],
    ]
    return _table(["", ""], rows)


def _small(results: dict[str, Any]) -> list[str]:
    small, settings = results["small_requests"], results["settings"]
    targets = small["targets"]
    direct_rps = targets["direct"]["median"]["requests_per_s"]
    rows = []
    for name, target in targets.items():
        m = target["median"]
        share = f"{m['requests_per_s'] / direct_rps:.0%}" if direct_rps else DASH
        rows.append(
            [
                name,
                _num(m["requests_per_s"], thousands=True),
                share,
                _num(m["p50_ms"]),
                _num(m["p99_ms"]),
                _num(m["latency_ms_max"]),
                str(m["non_2xx"]),
                str(m["socket_errors"]),
                _num(m["proxy_cpu_us_per_request"], 1),
                _num(m["proxy_cpu_busy"]),
                _num(m["backend_cpu_us_per_request"], 1),
            ]
        )
    command = next(iter(small["wrk_commands"].values())).rsplit(" ", 1)[0]
    lines = [
        "## Small requests",
        "",
        f"POST of a {small['body_bytes']}-byte OpenAI-style JSON body, "
        f"{settings['connections']} keep-alive connections, {settings['duration_s']} s per run, "
        f"{settings['rounds']} interleaved rounds. Medians over rounds, column by column; "
        "error counts are summed and the maximum latency is the worst round's.",
        "",
    ]
    lines += _table(
        [
            "target",
            "req/s",
            "vs direct",
            "p50 ms",
            "p99 ms",
            "max ms",
            "non-2xx",
            "socket errors",
            "proxy CPU µs/req",
            "proxy CPU busy",
            "backend CPU µs/req",
        ],
        rows,
    )
    lines += [
        "",
        f"Command (URL per target in the JSON file): `{command} <url>`, with this script:",
        "",
        "```lua",
        small["lua_script"].rstrip("\n"),
        "```",
        "",
    ]
    return lines


def _streams(results: dict[str, Any]) -> list[str]:
    settings = results["settings"]
    rows = []
    for name, target in results["streams"]["targets"].items():
        m = target["median"]
        rows.append(
            [
                name,
                _num(m["ttfb_ms_mean"]),
                _num(m["ttfb_ms_p50"]),
                _num(m["ttfb_ms_p99"]),
                _num(m["gap_ms_mean"]),
                _num(m["gap_ms_p99"]),
                _num(m["gap_ms_max_dev"]),
                _num(m["proxy_cpu_us_per_chunk"], 1),
                f"{m['failed_streams']} of {m['streams']}",
            ]
        )
    interval = settings["interval_ms"]
    lines = [
        "## Streams",
        "",
        f"{settings['streams']} concurrent SSE streams of {settings['chunks']} events "
        f"{interval} ms apart (then `data: [DONE]`), {settings['stream_waves']} waves per round, "
        f"{settings['rounds']} interleaved rounds; the proxy uses "
        f"{settings['stream_strategy']}. Medians over rounds, column by column; the maximum "
        "deviation is the worst round's.",
        "",
    ]
    lines += _table(
        [
            "target",
            "TTFB mean ms",
            "TTFB p50 ms",
            "TTFB p99 ms",
            "gap mean ms",
            "gap p99 ms",
            f"max abs(gap - {interval}) ms",
            "proxy CPU µs/chunk",
            "failed streams",
        ],
        rows,
    )
    return [*lines, ""]


def _health(results: dict[str, Any]) -> list[str]:
    settings = results["settings"]
    connections, runs = settings["connections"], settings["rounds"] + 1
    rows = []
    for name, metrics in results["proxy_metrics"].items():
        log = results["proxy_logs"].get(name, {"lines": 0})
        if "error" in metrics:
            rows.append([name, f"scrape failed: {metrics['error']}", "", "", "", str(log["lines"])])
            continue
        rows.append(
            [
                name,
                ", ".join(f"{k} {v:,}" for k, v in metrics["requests_by_class"].items()),
                ", ".join(f"{k} {v:,}" for k, v in metrics["upstream_responses_by_class"].items()),
                f"{metrics['upstream_connections_opened']:,}",
                f"{metrics['client_disconnects']:,}",
                str(log["lines"]),
            ]
        )
    lines = [
        "## What the proxies report",
        "",
        "From each proxy's `/metrics` at the end (warm-ups included) and its log at warning "
        "level. Class `none` is a request whose client left before its answer ended: wrk stops "
        "with up to one request in flight per connection, so up to "
        f"{connections * runs} per proxy ({connections} per wrk run) are the load generator's "
        "doing; the proxy then ends the upstream attempt too (upstream `none`, and a new "
        "upstream connection later). Anything else (5xx, more `none`, log lines) is the "
        "proxy's.",
        "",
    ]
    lines += _table(
        [
            "proxy",
            "answers by class",
            "upstream answers by class",
            "upstream connections opened",
            "client disconnects",
            "log lines",
        ],
        rows,
    )
    for name, log in results["proxy_logs"].items():
        if log["first"]:
            lines += ["", f"First log lines of {name}:", "", "```", *log["first"], "```"]
    return [*lines, ""]


def _rounds(results: dict[str, Any]) -> list[str]:
    rows = []
    for name, target in results["small_requests"]["targets"].items():
        for r in target["rounds"]:
            rows.append(
                [
                    name,
                    str(r["round"]),
                    _num(r["requests_per_s"], thousands=True),
                    _num(r["p99_ms"]),
                    _num(r["proxy_cpu_us_per_request"], 1),
                ]
            )
    lines = ["## Every round", ""]
    lines += _table(["small requests", "round", "req/s", "p99 ms", "proxy CPU µs/req"], rows)
    rows = []
    for name, target in results["streams"]["targets"].items():
        for r in target["rounds"]:
            rows.append(
                [
                    name,
                    str(r["round"]),
                    _num(r["ttfb_ms_p99"]),
                    _num(r["gap_ms_p99"]),
                    _num(r["gap_ms_max_dev"]),
                    _num(r["proxy_cpu_us_per_chunk"], 1),
                ]
            )
    lines += [""]
    lines += _table(
        ["streams", "round", "TTFB p99 ms", "gap p99 ms", "max dev ms", "proxy CPU µs/chunk"],
        rows,
    )
    return [*lines, ""]


def render(results: dict[str, Any]) -> str:
    """The Markdown report of ``results``."""
    lines = [
        f"# lb benchmark, {results['date']} on {results['host']}",
        "",
        "The proxy (`python -m lb`) against direct-to-backend (`python -m backends.fast`), "
        "made by `make bench`. `benchmarks/README.md` explains every number.",
        "",
        *_machine(results),
        "",
        *_small(results),
        *_streams(results),
        *_health(results),
        *_rounds(results),
    ]
    return "\n".join(lines)


def write_results(results: dict[str, Any], directory: Path) -> tuple[Path, Path, Path]:
    """Write ``<date>-<host>.json`` and ``.md`` into ``directory`` and copy the Markdown to
    ``latest.md``; returns the three paths. A same-day run on the same host overwrites."""
    directory.mkdir(parents=True, exist_ok=True)
    stem = f"{results['date']}-{results['host']}"
    json_path = directory / f"{stem}.json"
    md_path = directory / f"{stem}.md"
    latest_path = directory / "latest.md"
    json_path.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    text = render(results)
    md_path.write_text(text)
    latest_path.write_text(text)
    return json_path, md_path, latest_path
