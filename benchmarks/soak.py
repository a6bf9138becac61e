"""``make bench-soak``: the proxy's memory per idle open stream, and whether it stays flat.

One ``backends.fast`` process and one proxy (``python -m lb``, one worker). After a warm-up
(small requests and a wave of short streams, so what the proxy builds lazily exists), the
proxy's memory is read at rest; then ``--streams`` SSE streams are opened through it, each an
event every ``--event-interval-s`` (idle connections that stay open), and read again: the
difference over the streams is the memory one idle stream costs. The streams are then held
for ``--duration`` seconds under a light load (``--rate`` small chat completions a second,
and every ``--churn-every-s`` the ``--churn`` oldest streams are dropped by the client,
mid-stream, and replaced), reading the proxy's memory every ``--sample-s``. Readings after
``--settle-s`` give the slope and the spread; the run is *flat* when memory never rises more
than 1 MiB above its level at the end of settling. Last, every stream is closed and memory read
once more. Results go to ``benchmarks/results/soak-<date>-<host>.json`` and ``.md``, copied to
``soak-latest.md``. Every child process is stopped on the way out, Ctrl-C included.

With ``--tracemalloc`` the proxy runs under :mod:`benchmarks.soak_trace`, and the allocation
sites that grew most between the start and the end of the soak are added to the results.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import resource
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path
from typing import Any

import uvloop
import yaml

from benchmarks.bench import Progress, proxy_log
from benchmarks.machine import describe, host_label
from benchmarks.processes import (
    HOST,
    BenchError,
    Service,
    Stopped,
    free_ports,
    run_guarded,
    scrape_metrics,
    stop_all,
)
from benchmarks.soak_client import (
    IdleStream,
    LoadCounts,
    open_streams,
    request_load,
    stream_request,
)
from benchmarks.soak_memory import Sample, per_stream_kib, read_memory, trend
from benchmarks.soak_report import render
from benchmarks.soak_trace import top_differences

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benchmarks" / "results"
LOAD_CONNECTIONS = 4
REST_READINGS = 3  # readings a second apart; their median is the level
FD_MARGIN = 256


@dataclass(frozen=True)
class Settings:
    """What one run does; see ``--help`` for each option."""

    streams: int
    duration_s: int
    sample_s: float
    settle_s: float
    event_interval_s: float
    rate_per_s: float
    churn: int
    churn_every_s: float
    tracemalloc: bool = False

    @property
    def chunks(self) -> int:
        """Events per stream: enough to outlast the run with a margin."""
        return math.ceil((self.duration_s + 300) / self.event_interval_s) + 1


def proxy_config(port: int, admin_port: int, backend_port: int, settings: Settings) -> str:
    """Library defaults except ports, a short drain and no access log, with room checked."""
    config = {
        "listen": {"host": HOST, "port": port},
        "admin": {"host": HOST, "port": admin_port},
        "pools": [{"name": "chat", "backends": [{"url": f"http://{HOST}:{backend_port}"}]}],
        # Defaults that matter here: max_connections 10,000 (> streams + load), no
        # max_concurrency, and timeouts.idle_s 300 s, longer than the gap between events.
        "limits": {"max_connections": max(10_000, 2 * settings.streams)},
        "access_log": {"enabled": False},
        "shutdown": {"grace_s": 1},
        "workers": 1,
    }
    return yaml.safe_dump(config, sort_keys=False)


def raise_fd_limit(needed: int) -> int:
    """Raise this process's soft fd limit (children inherit it) to the hard limit; raise
    :class:`BenchError` if even that is below ``needed``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, needed)
    if target < needed:
        raise BenchError(f"need {needed} file descriptors, the hard limit is {hard}")
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


async def level(pid: int) -> dict[str, int]:
    """The median of ``REST_READINGS`` readings a second apart, field by field."""
    readings = []
    for i in range(REST_READINGS):
        if i:
            await asyncio.sleep(1.0)
        readings.append(read_memory(pid))
    return {k: int(statistics.median(r[k] for r in readings)) for k in readings[0]}


async def warm_up(port: int) -> None:
    """Small requests and a wave of short streams, so the proxy's lazy state exists."""
    counts = LoadCounts()
    load = asyncio.create_task(request_load(HOST, port, 500.0, LOAD_CONNECTIONS, counts))
    streams, _ = await open_streams(HOST, port, 100, stream_request(HOST, port, 3, 10))
    await asyncio.sleep(1.0)
    load.cancel()
    await asyncio.gather(load, return_exceptions=True)
    for stream in streams:
        stream.close()
    if not counts.statuses.get(200):
        raise BenchError(f"warm-up requests failed: {dict(counts.statuses)}")


async def snapshot(pid: int, directory: Path, n: int, *, collect: bool = False) -> Path:
    """Ask the traced proxy for allocation snapshot ``n`` (after a full garbage collection if
    ``collect``); return its path once written."""
    path = directory / f"snapshot-{n}{'-collected' if collect else ''}.pickle"
    os.kill(pid, signal.SIGUSR2 if collect else signal.SIGUSR1)
    for _ in range(600):
        await asyncio.sleep(0.1)
        if path.exists() and path.stat().st_size:
            await asyncio.sleep(0.5)  # let the dump finish
            return path
    raise BenchError(f"the proxy wrote no {path.name}")


async def soak(
    proxy: Service, port: int, settings: Settings, progress: Progress, trace_dir: Path | None
) -> dict[str, Any]:
    """Warm up, read memory at rest, open the streams, hold them, close them."""
    pid = proxy.pid
    await warm_up(port)
    await asyncio.sleep(3.0)
    rest = await level(pid)
    progress(f"at rest: RSS {rest['rss_kib']:,} KiB, {rest.get('fds')} fds")

    request = stream_request(HOST, port, settings.chunks, round(settings.event_interval_s * 1000))
    streams, open_errors = await open_streams(HOST, port, settings.streams, request)
    if len(streams) < settings.streams:
        raise BenchError(f"{len(streams)} of {settings.streams} streams opened: {open_errors}")
    await asyncio.sleep(3.0)
    with_streams = await level(pid)
    per_stream = per_stream_kib(rest["rss_kib"], with_streams["rss_kib"], len(streams))
    progress(
        f"{len(streams)} streams open: RSS {with_streams['rss_kib']:,} KiB, "
        f"{per_stream:.1f} KiB per stream, {with_streams.get('fds')} fds"
    )

    first_snapshot = await snapshot(pid, trace_dir, 0) if trace_dir is not None else None
    counts = LoadCounts()
    load = asyncio.create_task(
        request_load(HOST, port, settings.rate_per_s, LOAD_CONNECTIONS, counts)
    )
    samples: list[Sample] = []
    churned = 0
    churn_errors: dict[str, int] = {}
    started = time.monotonic()
    next_churn = started + settings.churn_every_s
    try:
        for tick in range(int(settings.duration_s // settings.sample_s) + 1):
            delay = started + tick * settings.sample_s - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            # A timer may wake a little early: a churn due within 50 ms is done now.
            if settings.churn and time.monotonic() >= next_churn - 0.05:
                next_churn += settings.churn_every_s
                streams, errors = await churn(port, streams, settings.churn, request)
                churned += settings.churn
                for kind, n in errors.items():
                    churn_errors[kind] = churn_errors.get(kind, 0) + n
            reading = read_memory(pid)
            sample = Sample(
                t_s=round(time.monotonic() - started, 1),
                rss_kib=reading["rss_kib"],
                rss_anon_kib=reading["rss_anon_kib"],
                pss_kib=reading.get("pss_kib"),
                fds=reading.get("fds"),
                open_streams=sum(1 for s in streams if s.is_open),
                requests=counts.requests,
            )
            samples.append(sample)
            progress(
                f"t={sample.t_s:5.0f}s RSS {sample.rss_kib:,} KiB anon {sample.rss_anon_kib:,} "
                f"KiB, {sample.open_streams} streams open, {sample.requests:,} requests"
            )
    finally:
        load.cancel()
        await asyncio.gather(load, return_exceptions=True)
    grown: dict[str, list[dict[str, object]]] | None = None
    if trace_dir is not None and first_snapshot is not None:
        last = await snapshot(pid, trace_dir, 1)
        collected = await snapshot(pid, trace_dir, 2, collect=True)
        grown = {
            "by_traceback": top_differences(first_snapshot, last),
            "by_line_after_full_gc": top_differences(first_snapshot, collected, key="lineno"),
        }
    stream_errors: dict[str, int] = {}
    for stream in streams:
        if stream.error is not None:
            stream_errors[stream.error] = stream_errors.get(stream.error, 0) + 1
        stream.close()
    await asyncio.sleep(5.0)
    after = await level(pid)
    progress(f"streams closed: RSS {after['rss_kib']:,} KiB, {after.get('fds')} fds")
    return {
        "at_rest": rest,
        "with_streams": with_streams,
        "streams_opened": len(streams),
        "per_stream_kib": round(per_stream, 2) if per_stream is not None else None,
        "per_1000_streams_kib": round(per_stream * 1000) if per_stream is not None else None,
        "per_stream_anon_kib": per_stream_kib(
            rest["rss_anon_kib"], with_streams["rss_anon_kib"], len(streams)
        ),
        "samples": [asdict(s) for s in samples],
        "trend_rss": trend(samples, settings.settle_s, "rss_kib"),
        "trend_rss_anon": trend(samples, settings.settle_s, "rss_anon_kib"),
        "after_close": after,
        "requests": dict(sorted((str(k), v) for k, v in counts.statuses.items())),
        "streams_churned": churned,
        "churn_errors": churn_errors,
        "stream_errors_at_end": stream_errors,
        "tracemalloc_top_growth": grown,
    }


async def churn(
    port: int, streams: list[IdleStream], count: int, request: bytes
) -> tuple[list[IdleStream], dict[str, int]]:
    """Drop the ``count`` oldest streams mid-stream and open as many new ones."""
    for stream in streams[:count]:
        stream.close()
    fresh, errors = await open_streams(HOST, port, count, request)
    return streams[count:] + fresh, dict(errors)


def run(settings: Settings, progress: Progress) -> dict[str, Any]:
    """Start the backend and the proxy, soak, stop everything; returns the results document."""
    limit = raise_fd_limit(2 * settings.streams + settings.churn + FD_MARGIN)
    results: dict[str, Any] = {
        "benchmark": "soak",
        "date": date.today().isoformat(),
        "host": host_label(),
        "machine": describe(ROOT),
        "settings": {**asdict(settings), "chunks": settings.chunks, "fd_limit": limit},
    }
    with tempfile.TemporaryDirectory(prefix="lb-soak-") as tmp_name:
        tmp = Path(tmp_name)
        services: list[Service] = []
        proxy: Service | None = None
        try:
            (backend_port,) = free_ports(1)
            argv = [sys.executable, "-m", "backends.fast", "--port", str(backend_port)]
            backend = Service("backends.fast", argv, tmp / "fast.log", ROOT)
            services.append(backend)
            backend.wait_ready([backend_port])
            port, admin_port = free_ports(2)
            config_path = tmp / "soak.yaml"
            config_path.write_text(proxy_config(port, admin_port, backend_port, settings))
            argv = [sys.executable, "-m", "lb", "--config", str(config_path)]
            trace_dir = tmp if settings.tracemalloc else None
            if trace_dir is not None:
                argv[2:3] = ["benchmarks.soak_trace", str(trace_dir)]
            proxy = Service("proxy", [*argv, "--log-level", "warning"], tmp / "lb.log", ROOT)
            services.append(proxy)
            proxy.wait_ready([port, admin_port])
            progress(f"backend on {backend_port}, proxy on {port} (pid {proxy.pid})")
            results["config"] = yaml.safe_load(config_path.read_text())
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                results["memory"] = runner.run(soak(proxy, port, settings, progress, trace_dir))
            results["proxy_metrics"] = scrape_metrics(HOST, admin_port)
        finally:
            progress(f"stopping {len(services)} processes")
            stop_all(services)
        if proxy is not None:
            results["proxy_log"] = proxy_log(proxy)
    return results


def write_results(results: dict[str, Any], output: Path) -> tuple[Path, Path, Path]:
    """``soak-<date>-<host>.json`` and ``.md`` in ``output``, and ``soak-latest.md``."""
    output.mkdir(parents=True, exist_ok=True)
    stem = f"soak-{results['date']}-{results['host']}"
    json_path, md_path = output / f"{stem}.json", output / f"{stem}.md"
    latest = output / "soak-latest.md"
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    text = render(results)
    md_path.write_text(text)
    latest.write_text(text)
    return json_path, md_path, latest


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.soak", description=__doc__.split("\n", 1)[0]
    )
    add = parser.add_argument
    add("--streams", type=int, default=1000, help="idle streams held open (1000)")
    add("--duration", type=int, default=600, help="seconds the streams are held (600)")
    add("--sample-s", type=float, default=10.0, help="seconds between readings (10)")
    add("--settle-s", type=float, default=60.0, help="readings before this are not judged (60)")
    add("--event-interval-s", type=float, default=30.0, help="seconds between events (30)")
    add("--rate", type=float, default=200.0, help="small requests per second meanwhile (200)")
    add("--churn", type=int, default=50, help="streams dropped and reopened each time (50)")
    add("--churn-every-s", type=float, default=30.0, help="seconds between churns (30)")
    add("--tracemalloc", action="store_true", help="trace the proxy's allocations (slow)")
    add("--output", type=Path, default=RESULTS_DIR, help="results directory")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the soak; exit code 0 on success, 1 on a failure, 130 when interrupted."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.streams < 1 or args.duration < 1 or args.sample_s <= 0 or args.rate <= 0:
        parser.error("--streams, --duration, --sample-s and --rate must be positive")
    if not 0 < args.event_interval_s < 300:
        parser.error("--event-interval-s must be between 0 and the proxy's idle timeout (300)")
    if not 0 <= args.churn <= args.streams or args.churn_every_s <= 0:
        parser.error("--churn must be 0..streams and --churn-every-s positive")
    settings = Settings(
        streams=args.streams,
        duration_s=args.duration,
        sample_s=args.sample_s,
        settle_s=args.settle_s,
        event_interval_s=args.event_interval_s,
        rate_per_s=args.rate,
        churn=args.churn,
        churn_every_s=args.churn_every_s,
        tracemalloc=args.tracemalloc,
    )
    progress = Progress()
    try:
        results = run_guarded(lambda: run(settings, progress), progress)
    except Stopped as stopped:
        return stopped.code
    paths = write_results(results, args.output)
    progress(f"wrote {', '.join(str(p) for p in paths)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
