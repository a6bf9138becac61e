"""Summaries of a ``make bench-peers`` run: ratios, the Markdown tables and the results files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

BASELINE = "lb"  # the ratio column divides this target's req/s by each target's
DASH = "-"


def round_ratios(small: dict[str, Any], baseline: str = BASELINE) -> dict[str, list[float]]:
    """Per target, ``baseline``'s req/s over the target's in each round both completed."""
    targets = small["targets"]
    base = {r["round"]: r["requests_per_s"] for r in targets.get(baseline, {}).get("rounds", [])}
    out: dict[str, list[float]] = {}
    for name, target in targets.items():
        out[name] = [
            round(base[r["round"]] / r["requests_per_s"], 3)
            for r in target.get("rounds", [])
            if base.get(r["round"]) and r["requests_per_s"]
        ]
    return out


def ratios(small: dict[str, Any], baseline: str = BASELINE) -> dict[str, float | None]:
    """``baseline``'s req/s over each target's: the median of the per-round ratios, or the
    ratio of the medians where no round has both; ``None`` where either is missing.

    A round runs every target back to back, so a slow spell of a shared host weighs on both
    sides of a round's ratio; medians taken apart can come from different spells.
    """
    per_round = round_ratios(small, baseline)
    medians = {name: t["median"] for name, t in small["targets"].items()}
    base = medians.get(baseline)
    base_rps = base["requests_per_s"] if base else None
    out: dict[str, float | None] = {}
    for name, median in medians.items():
        found = sorted(per_round.get(name, []))
        if found:
            mid = len(found) // 2
            value = found[mid] if len(found) % 2 else (found[mid - 1] + found[mid]) / 2
            out[name] = round(value, 3)
            continue
        rps = median["requests_per_s"] if median else None
        out[name] = round(base_rps / rps, 3) if base_rps and rps else None
    return out


def _spread(values: list[float]) -> str:
    """``low-high`` of the per-round ratios (one value alone as is)."""
    if not values:
        return DASH
    low, high = min(values), max(values)
    return f"{low:.2f}" if low == high else f"{low:.2f}-{high:.2f}"


def _num(value: Any, digits: int = 2, thousands: bool = False) -> str:
    if value is None:
        return DASH
    return f"{value:,.0f}" if thousands else f"{value:.{digits}f}"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _machine(results: dict[str, Any]) -> list[str]:
    machine, settings = results["machine"], results["settings"]
    commit = machine["git_commit"] + (" (with uncommitted changes)" if machine["git_dirty"] else "")
    rows = [
        ["CPU", f"{machine['cpu_model']}, {machine['cpu_count']} cores"],
        ["Memory", f"{machine['memory_gib']} GiB"],
        ["Kernel", machine["kernel"]],
        ["Python", machine["python"]],
        ["Load generator", machine["wrk"]],
        ["Commit", commit],
        ["Pinning", settings["pinning"]],
    ]
    rows += [[name, version] for name, version in results["versions"].items()]
    return table(["", ""], rows)


def _small(results: dict[str, Any]) -> list[str]:
    small, settings = results["small_requests"], results["settings"]
    ratio = results["ratios"]
    per_round = round_ratios(small)
    rows = []
    for name, target in small["targets"].items():
        m = target["median"]
        info = results["targets"][name]
        if m is None:
            rows.append([name, info["placement"], "failed", *[DASH] * 9])
            continue
        rows.append(
            [
                name,
                info["placement"],
                _num(m["requests_per_s"], thousands=True),
                _num(ratio.get(name)),
                _spread(per_round.get(name, [])),
                _num(m["p50_ms"]),
                _num(m["p99_ms"]),
                str(m["non_2xx"]),
                str(m["socket_errors"]),
                _num(m["proxy_cpu_us_per_request"], 1),
                _num(m["proxy_cpu_busy"]),
                str(info["connections"]),
            ]
        )
    header = ["target", "runs on", "req/s", f"{BASELINE} ÷ target", "per round"]
    header += ["p50 ms", "p99 ms"]
    header += ["non-2xx", "socket errors", "proxy CPU µs/req", "proxy CPU busy", "connections"]
    lines = [
        "## Small requests",
        "",
        f"`wrk -t1 -c<connections> -d{settings['duration_s']}s --latency` POSTing a "
        f"{small['body_bytes']}-byte OpenAI-style body to `/v1/chat/completions`; interleaved "
        f"rounds: {settings['rounds']}; medians over rounds, column by column, error counts "
        f"summed. `{BASELINE} ÷ target` is {BASELINE}'s req/s over the target's in the same "
        "round (a round runs every target back to back, so a slow spell of the host weighs on "
        "both), the median over rounds; `per round` gives the lowest and highest: above 1, "
        f"{BASELINE} served more.",
        "",
        *table(header, rows),
        "",
    ]
    return lines


def _streams(results: dict[str, Any], *, reused: bool = False) -> list[str]:
    settings = results["settings"]
    measured = results.get("streams_reused" if reused else "streams")
    if measured is None:
        return []  # a results file from before reused connections were measured
    rows = []
    for name, target in measured["targets"].items():
        m = target["median"]
        if m is None:
            rows.append([name, *[DASH] * 6])
            continue
        rows.append(
            [
                name,
                _num(m["ttfb_ms_p50"]),
                _num(m["ttfb_ms_p99"]),
                _num(m["gap_ms_p99"]),
                _num(m["gap_ms_max_dev"]),
                _num(m["proxy_cpu_us_per_chunk"], 1),
                f"{m['failed_streams']} / {m['streams']}",
            ]
        )
    header = ["target", "TTFB p50 ms", "TTFB p99 ms", "gap p99 ms", "max abs(gap - interval) ms"]
    header += ["proxy CPU µs/chunk", "failed / streams"]
    if reused:
        title = "## Streams on reused connections"
        how = (
            f"The same streams, but over {settings['streams']} connections opened once per "
            "round and reused by each of its waves, as an HTTP client's connection pool (the "
            "OpenAI SDKs') does: no connection is set up between a request and its first byte."
        )
    else:
        title = "## Streams"
        how = (
            f'{settings["streams"]} concurrent `POST /v1/chat/completions` with `"stream": '
            f"true`, each on a new connection; the backend answers {settings['chunks']} "
            f"`chat.completion.chunk` events {settings['interval_ms']} ms apart, then "
            f"`data: [DONE]`. Waves of streams per round: {settings['stream_waves']} (fewer "
            f"where a note says so); rounds: {settings['rounds']}; medians over rounds, failed "
            "streams summed."
        )
    return [
        title,
        "",
        how,
        "",
        *table(header, rows),
        "",
    ]


def _notes(results: dict[str, Any]) -> list[str]:
    lines = ["## Notes", ""]
    lines += [f"- **{name}**: {note}" for name, note in results["notes"].items()]
    return [*lines, ""]


def _rounds(results: dict[str, Any]) -> list[str]:
    rows = []
    streams = results["streams"]["targets"]
    for name, target in results["small_requests"]["targets"].items():
        stream_rounds = {r["round"]: r for r in streams.get(name, {}).get("rounds", [])}
        for r in target["rounds"]:
            s = stream_rounds.get(r["round"], {})
            rows.append(
                [
                    name,
                    str(r["round"]),
                    _num(r["requests_per_s"], thousands=True),
                    _num(r["p99_ms"]),
                    _num(r["proxy_cpu_us_per_request"], 1),
                    _num(r["idle_proxies_cpu_busy"]),
                    _num(s.get("ttfb_ms_p99")),
                    _num(s.get("gap_ms_p99")),
                ]
            )
        rows += [[name, DASH, f"failed: {f}", *[DASH] * 5] for f in target["failures"]]
    header = ["target", "round", "req/s", "p99 ms", "proxy CPU µs/req", "idle proxies' CPU busy"]
    header += ["stream TTFB p99 ms", "stream gap p99 ms"]
    return [
        "## Every round",
        "",
        "Spread across rounds is the noise to compare differences with. `idle proxies' CPU "
        "busy` is the CPU the proxies not under test used during the run, over its wall time "
        "(they share CPU 1 with the one under test).",
        "",
        *table(header, rows),
        "",
    ]


def render(results: dict[str, Any]) -> str:
    """The Markdown report of a results document."""
    lines = [f"# Proxies side by side, {results['date']} on {results['host']}", ""]
    lines += [*_machine(results), ""]
    lines += _small(results) + _streams(results) + _streams(results, reused=True)
    lines += _notes(results) + _rounds(results)
    lines += [
        "Exact command lines and generated configurations are in the JSON file next to this one.",
        "",
    ]
    return "\n".join(lines)


def write_results(results: dict[str, Any], directory: Path) -> tuple[Path, Path, Path]:
    """Write ``peers-<date>-<host>.json`` and ``.md`` into ``directory`` and copy the Markdown
    to ``peers-latest.md``; returns the three paths. A same-day run on the same host overwrites.
    """
    directory.mkdir(parents=True, exist_ok=True)
    stem = f"peers-{results['date']}-{results['host']}"
    json_path = directory / f"{stem}.json"
    md_path = directory / f"{stem}.md"
    latest_path = directory / "peers-latest.md"
    json_path.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    text = render(results)
    md_path.write_text(text)
    latest_path.write_text(text)
    return json_path, md_path, latest_path
