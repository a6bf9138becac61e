"""PNG plots of a ``make bench-peers`` run: throughput with tail latency, and stream TTFB.

matplotlib (Agg backend, no display) is a benchmark-only tool: ``make bench-peers`` installs
it into the venv, the package does not depend on it. It is imported by name at run time, so
the rest of the benchmark works, and type-checks, without it.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from benchmarks.peers_report import BASELINE

THROUGHPUT_PNG = "peers-throughput.png"
STREAMING_PNG = "peers-streaming.png"


def _pyplot() -> Any:
    matplotlib = importlib.import_module("matplotlib")
    matplotlib.use("Agg")
    return importlib.import_module("matplotlib.pyplot")


def series(targets: dict[str, Any], keys: tuple[str, ...]) -> tuple[list[str], list[list[float]]]:
    """Target names with a median, and for each of ``keys`` the values in that order (missing
    values as 0)."""
    names = [name for name, t in targets.items() if t["median"] is not None]
    values = [[float(targets[n]["median"].get(key) or 0.0) for n in names] for key in keys]
    return names, values


def plot_throughput(results: dict[str, Any], path: Path) -> None:
    """Req/s per target (left) and p50/p99 latency per target (right, log scale)."""
    plt = _pyplot()
    names, (rps, p50, p99) = series(
        results["small_requests"]["targets"], ("requests_per_s", "p50_ms", "p99_ms")
    )
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 0.5 * len(names) + 2.5))
    ys = list(range(len(names)))
    left.barh(ys, rps, color="tab:blue")
    left.set_yticks(ys, names)
    left.invert_yaxis()
    left.set_xlabel("requests per second (median round)")
    left.set_xlim(0, max(rps, default=1.0) * 1.45)  # room for the labels
    left.set_title("Small POST throughput")
    ratio = results["ratios"]
    for y, name, value in zip(ys, names, rps, strict=True):
        label = f"{value:,.0f}"
        if ratio.get(name) is not None and name != BASELINE:
            label += f"  ({BASELINE} ÷ {name}: {ratio[name]:.2f})"
        left.annotate(label, (value, y), xytext=(3, 0), textcoords="offset points",
                      va="center", fontsize=8)  # fmt: skip
    height = 0.4
    right.barh([y - height / 2 for y in ys], p50, height, label="p50", color="tab:green")
    right.barh([y + height / 2 for y in ys], p99, height, label="p99", color="tab:red")
    right.set_yticks(ys, names)
    right.invert_yaxis()
    right.set_xscale("log")
    right.set_xlabel("latency, ms (log scale)")
    right.set_title("Latency under the same load")
    right.legend()
    settings = results["settings"]
    fig.suptitle(
        f"wrk -t1 -c{settings['connections']}, {settings['duration_s']} s x "
        f"{settings['rounds']} rounds; {settings['pinning']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_streaming(results: dict[str, Any], path: Path) -> None:
    """Time to first event, p50 and p99, per target (log scale)."""
    plt = _pyplot()
    names, (p50, p99) = series(results["streams"]["targets"], ("ttfb_ms_p50", "ttfb_ms_p99"))
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(names) + 2.0))
    ys = list(range(len(names)))
    height = 0.4
    ax.barh([y - height / 2 for y in ys], p50, height, label="TTFB p50", color="tab:green")
    ax.barh([y + height / 2 for y in ys], p99, height, label="TTFB p99", color="tab:red")
    ax.set_yticks(ys, names)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("time to first event, ms (log scale)")
    settings = results["settings"]
    ax.set_title(
        f"{settings['streams']} concurrent chat streams, {settings['chunks']} chunks "
        f"{settings['interval_ms']} ms apart",
        fontsize=10,
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(results: dict[str, Any], directory: Path) -> list[Path]:
    """Both plots into ``directory``; raises ``ImportError`` without matplotlib."""
    paths = [directory / THROUGHPUT_PNG, directory / STREAMING_PNG]
    plot_throughput(results, paths[0])
    plot_streaming(results, paths[1])
    return paths
