"""The Markdown summary of a soak run (``benchmarks/results/soak-*.md``)."""

from __future__ import annotations

from typing import Any


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _kib(value: object) -> str:
    return "-" if value is None else f"{value:,}"


def _trend_row(name: str, trend: dict[str, Any]) -> list[str]:
    flat = trend.get("flat")
    return [
        name,
        str(trend.get("samples", 0)),
        _kib(trend.get("first_kib")),
        _kib(trend.get("last_kib")),
        _kib(trend.get("slope_kib_per_min")),
        _kib(trend.get("max_minus_min_kib")),
        _kib(trend.get("growth_kib")),
        "-" if flat is None else ("yes" if flat else "**no**"),
    ]


def render(results: dict[str, Any]) -> str:
    """The run as tables: memory at rest, per stream, over the soak, after closing."""
    machine, settings, memory = results["machine"], results["settings"], results["memory"]
    commit = machine["git_commit"] + (" (with uncommitted changes)" if machine["git_dirty"] else "")
    rest, loaded, after = memory["at_rest"], memory["with_streams"], memory["after_close"]
    streams = memory["streams_opened"]
    metrics = results.get("proxy_metrics", {})
    log = results.get("proxy_log", {})
    lines = [
        f"# lb soak benchmark, {results['date']}",
        "",
        "Memory of one proxy process (`python -m lb`, one worker) holding idle SSE streams, "
        "made by `python -m benchmarks.soak`; its module docstring and "
        "`benchmarks/README.md` describe the method.",
        "",
        *_table(
            ["", ""],
            [
                ["CPU", f"{machine['cpu_model']}, {machine['cpu_count']} cores"],
                ["Memory", f"{machine['memory_gib']} GiB"],
                ["Kernel, Python", f"{machine['kernel']}, {machine['python']}"],
                ["Packages", ", ".join(f"{k} {v}" for k, v in machine["packages"].items())],
                ["Commit", commit],
                [
                    "Run",
                    f"{settings['streams']:,} streams, an event every "
                    f"{settings['event_interval_s']:g} s; held {settings['duration_s']} s, read "
                    f"every {settings['sample_s']:g} s, judged after {settings['settle_s']:g} s; "
                    f"{settings['rate_per_s']:g} small requests/s; {settings['churn']} streams "
                    f"dropped and reopened every {settings['churn_every_s']:g} s",
                ],
            ],
        ),
        "",
        "## Memory per idle stream",
        "",
        *_table(
            ["", "RSS KiB", "anonymous RSS KiB", "PSS KiB", "open fds"],
            [
                [
                    label,
                    _kib(r.get("rss_kib")),
                    _kib(r.get("rss_anon_kib")),
                    _kib(r.get("pss_kib")),
                    _kib(r.get("fds")),
                ]
                for label, r in (
                    ("at rest, after warm-up", rest),
                    (f"{streams:,} streams open", loaded),
                    ("after the soak, streams closed", after),
                )
            ],
        ),
        "",
        f"**{memory['per_stream_kib']} KiB per idle stream** "
        f"(RSS with the streams minus at rest, over {streams:,}): "
        f"{_kib(memory['per_1000_streams_kib'])} KiB per 1,000 streams.",
        "",
        "## Over the soak",
        "",
        *_table(
            [
                "series",
                "readings",
                "first KiB",
                "last KiB",
                "slope KiB/min",
                "max - min KiB",
                "growth KiB",
                "flat (growth < 1 MiB)",
            ],
            [
                _trend_row("RSS", memory["trend_rss"]),
                _trend_row("anonymous RSS", memory["trend_rss_anon"]),
            ],
        ),
        "",
        "Readings from the end of settling on; growth is the highest reading minus the first.",
        "",
        *_table(
            ["t s", "RSS KiB", "anonymous KiB", "PSS KiB", "fds", "streams open", "requests"],
            [
                [
                    f"{s['t_s']:g}",
                    _kib(s["rss_kib"]),
                    _kib(s["rss_anon_kib"]),
                    _kib(s["pss_kib"]),
                    _kib(s["fds"]),
                    _kib(s["open_streams"]),
                    _kib(s["requests"]),
                ]
                for s in memory["samples"]
            ],
        ),
        "",
        "## Traffic and the proxy's account",
        "",
        f"- small requests by status: {memory['requests']}",
        f"- streams dropped and reopened: {memory['streams_churned']:,}; failures reopening: "
        f"{memory['churn_errors'] or 'none'}; streams broken at the end: "
        f"{memory['stream_errors_at_end'] or 'none'}",
        f"- proxy metrics: {metrics}",
        f"- proxy log lines at warning level: {log.get('lines', 0)}",
        "",
    ]
    return "\n".join(lines)
