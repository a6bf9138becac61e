"""``make bench``: the proxy against direct-to-backend, for small requests and SSE streams.

One ``backends.fast`` process serves two ports; one proxy per strategy balances over both.
Small requests are driven by wrk, streams by :mod:`benchmarks.streams` in this process.
Rounds are interleaved (direct, proxy A, proxy B, ... then again) so drift in the machine
spreads over every target, and the median round is reported. Results go to
``benchmarks/results/``. Every child process is stopped on the way out, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path
from typing import Any

import uvloop
import yaml

from benchmarks.machine import describe, host_label
from benchmarks.processes import (
    CPU_LOAD,
    CPU_PROXY,
    HOST,
    Pinning,
    Service,
    Stopped,
    detect_pinning,
    free_ports,
    run_guarded,
    scrape_metrics,
    stop_all,
)
from benchmarks.report import aggregate, write_results
from benchmarks.streams import run_waves, summarise
from benchmarks.wrk import BODY, PATH, run_wrk, write_script, wrk_argv

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benchmarks" / "results"
STRATEGIES = ("round_robin", "least_connections", "latency_weighted")
STREAM_STRATEGY = "least_connections"
DIRECT = "direct"
WARMUP_S = 1


@dataclass(frozen=True)
class Settings:
    """What one run measures; see ``--help`` for each option."""

    duration_s: int
    rounds: int
    connections: int
    streams: int
    chunks: int
    interval_ms: int

    @property
    def stream_waves(self) -> int:
        """Waves of streams per round: enough proxy CPU time to beat the 10 ms tick."""
        return max(1, self.duration_s // 2)


@dataclass(frozen=True)
class Target:
    """Somewhere to send load: a backend directly, or a proxy in front of the backends."""

    name: str
    port: int
    proxy: Service | None = None
    admin_port: int | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}{PATH}"


class Progress:
    """One line per step on stderr, stamped with the seconds since the start."""

    def __init__(self) -> None:
        self.started = time.monotonic()

    def __call__(self, message: str) -> None:
        elapsed = time.monotonic() - self.started
        print(f"bench [{elapsed:6.1f}s] {message}", file=sys.stderr, flush=True)


def proxy_config(strategy: str, port: int, admin_port: int, backend_ports: list[int]) -> str:
    """The proxy's configuration: library defaults except ports, strategy and a short drain."""
    config = {
        "listen": {"host": HOST, "port": port},
        "admin": {"host": HOST, "port": admin_port},
        "pools": [
            {
                "name": "chat",
                "strategy": strategy,
                "backends": [{"url": f"http://{HOST}:{p}"} for p in backend_ports],
            }
        ],
        "shutdown": {"grace_s": 1},
    }
    return yaml.safe_dump(config, sort_keys=False)


def start_processes(
    tmp: Path, pinning: Pinning, services: list[Service], progress: Progress
) -> tuple[Service, list[Target]]:
    """Start the backend and one proxy per strategy; each is appended to ``services`` as soon
    as it exists, so the caller can stop it whatever happens next."""
    backend_ports = free_ports(2)
    argv = [*pinning.prefix(CPU_LOAD), sys.executable, "-m", "backends.fast"]
    for port in backend_ports:
        argv += ["--port", str(port)]
    backend = Service("backends.fast", argv, tmp / "fast.log", ROOT)
    services.append(backend)
    backend.wait_ready(backend_ports)
    progress(f"backend backends.fast listening on {backend_ports} (pid {backend.pid})")
    targets = [Target(DIRECT, backend_ports[0])]
    for strategy in STRATEGIES:
        port, admin_port = free_ports(2)
        config_path = tmp / f"{strategy}.yaml"
        config_path.write_text(proxy_config(strategy, port, admin_port, backend_ports))
        argv = [*pinning.prefix(CPU_PROXY), sys.executable, "-m", "lb"]
        argv += ["--config", str(config_path), "--log-level", "warning"]
        proxy = Service(f"proxy {strategy}", argv, tmp / f"{strategy}.log", ROOT)
        services.append(proxy)
        proxy.wait_ready([port, admin_port])
        progress(f"proxy {strategy} listening on {port}, admin {admin_port} (pid {proxy.pid})")
        targets.append(Target(f"proxy {strategy}", port, proxy, admin_port))
    return backend, targets


def measure_small(
    targets: list[Target],
    backend: Service,
    settings: Settings,
    pinning: Pinning,
    script: Path,
    progress: Progress,
) -> dict[str, Any]:
    """wrk against every target, rounds interleaved; proxy CPU read around each run."""
    prefix = pinning.prefix(CPU_LOAD)
    for target in targets:
        progress(f"small requests: warm-up {WARMUP_S}s, {target.name}")
        argv = wrk_argv(prefix, settings.connections, WARMUP_S, script, target.url)
        run_wrk(argv, WARMUP_S)
    rows: dict[str, list[dict[str, Any]]] = {target.name: [] for target in targets}
    commands: dict[str, str] = {}
    for round_no in range(1, settings.rounds + 1):
        for target in targets:
            argv = wrk_argv(prefix, settings.connections, settings.duration_s, script, target.url)
            commands[target.name] = " ".join(argv)
            proxy_before = target.proxy.cpu_s() if target.proxy else 0.0
            backend_before = backend.cpu_s()
            result = run_wrk(argv, settings.duration_s)
            backend_cpu_s = backend.cpu_s() - backend_before
            row: dict[str, Any] = {"round": round_no, **asdict(result)}
            requests = max(1, result.requests)
            if target.proxy is not None:
                proxy_cpu_s = target.proxy.cpu_s() - proxy_before
                row["proxy_cpu_us_per_request"] = round(proxy_cpu_s / requests * 1e6, 2)
                row["proxy_cpu_busy"] = round(proxy_cpu_s / result.duration_s, 3)
            else:
                row["proxy_cpu_us_per_request"] = None
                row["proxy_cpu_busy"] = None
            row["backend_cpu_us_per_request"] = round(backend_cpu_s / requests * 1e6, 2)
            rows[target.name].append(row)
            cpu = row["proxy_cpu_us_per_request"]
            progress(
                f"small requests: round {round_no}/{settings.rounds} {target.name}: "
                f"{result.requests_per_s:,.0f} req/s, p50 {result.p50_ms:.2f} ms, "
                f"p99 {result.p99_ms:.2f} ms, non-2xx {result.non_2xx}, "
                f"socket errors {result.socket_errors}"
                + (f", proxy {cpu:.1f} µs/req" if cpu is not None else "")
            )
    return {
        "wrk_commands": commands,
        "lua_script": script.read_text(),
        "body_bytes": len(BODY),
        "targets": {
            name: {"median": aggregate(target_rows), "rounds": target_rows}
            for name, target_rows in rows.items()
        },
    }


def measure_streams(
    targets: list[Target], backend: Service, settings: Settings, progress: Progress
) -> dict[str, Any]:
    """Waves of concurrent SSE streams against each target, rounds interleaved."""
    rows: dict[str, list[dict[str, Any]]] = {target.name: [] for target in targets}
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        for target in targets:
            progress(f"streams: warm-up, {target.name}")
            runner.run(run_waves(HOST, target.port, 1, settings.streams, 2, 1))
        for round_no in range(1, settings.rounds + 1):
            for target in targets:
                proxy_before = target.proxy.cpu_s() if target.proxy else 0.0
                backend_before = backend.cpu_s()
                started = time.perf_counter()
                samples = runner.run(
                    run_waves(
                        HOST,
                        target.port,
                        settings.stream_waves,
                        settings.streams,
                        settings.chunks,
                        settings.interval_ms,
                    )
                )
                wall_s = time.perf_counter() - started
                backend_cpu_s = backend.cpu_s() - backend_before
                summary = summarise(samples, settings.interval_ms)
                events = max(1, samples.events)
                row: dict[str, Any] = {"round": round_no, **asdict(summary)}
                row["wall_s"] = round(wall_s, 3)
                row["proxy_cpu_us_per_chunk"] = (
                    round((target.proxy.cpu_s() - proxy_before) / events * 1e6, 2)
                    if target.proxy is not None
                    else None
                )
                row["backend_cpu_us_per_chunk"] = round(backend_cpu_s / events * 1e6, 2)
                rows[target.name].append(row)
                progress(
                    f"streams: round {round_no}/{settings.rounds} {target.name}: "
                    f"{summary.streams} streams, TTFB p50 {summary.ttfb_ms_p50} ms "
                    f"p99 {summary.ttfb_ms_p99} ms, gap p99 {summary.gap_ms_p99} ms "
                    f"max dev {summary.gap_ms_max_dev} ms, failed {summary.failed_streams}"
                )
    return {
        "targets": {
            name: {"median": aggregate(target_rows), "rounds": target_rows}
            for name, target_rows in rows.items()
        }
    }


def proxy_log(service: Service) -> dict[str, Any]:
    """What a proxy logged at warning level or above: a count and the first lines."""
    lines = [line for line in service.log(max_chars=200_000).splitlines() if line.strip()]
    return {"lines": len(lines), "first": lines[:20]}


def run(settings: Settings, progress: Progress) -> dict[str, Any]:
    """Start everything, measure, stop everything; returns the results document."""
    pinning = detect_pinning()
    progress(f"pinning: {pinning.description}")
    if pinning.enabled:
        os.sched_setaffinity(0, {CPU_LOAD})  # the stream client shares CPU 0 with wrk
    machine = describe(ROOT)
    results: dict[str, Any] = {
        "date": date.today().isoformat(),
        "host": host_label(),
        "machine": machine,
        "settings": {
            **asdict(settings),
            "stream_waves": settings.stream_waves,
            "strategies": list(STRATEGIES),
            "stream_strategy": STREAM_STRATEGY,
            "pinned": pinning.enabled,
            "pinning": pinning.description,
        },
    }
    with tempfile.TemporaryDirectory(prefix="lb-bench-") as tmp_name:
        tmp = Path(tmp_name)
        services: list[Service] = []
        try:
            backend, targets = start_processes(tmp, pinning, services, progress)
            script = write_script(tmp)
            results["small_requests"] = measure_small(
                targets, backend, settings, pinning, script, progress
            )
            stream_targets = [t for t in targets if t.name in (DIRECT, f"proxy {STREAM_STRATEGY}")]
            results["streams"] = measure_streams(stream_targets, backend, settings, progress)
            results["proxy_metrics"] = {
                t.name: scrape_metrics(HOST, t.admin_port)
                for t in targets
                if t.admin_port is not None
            }
        finally:
            progress(f"stopping {len(services)} processes")
            stop_all(services)
        proxies = [t.proxy for t in targets if t.proxy is not None]
        results["proxy_logs"] = {proxy.name: proxy_log(proxy) for proxy in proxies}
    return results


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench",
        description="Measure the proxy against direct-to-backend; write benchmarks/results/.",
    )
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run (10)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (3)")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections (64)")
    parser.add_argument("--streams", type=int, default=64, help="concurrent SSE streams (64)")
    parser.add_argument("--chunks", type=int, default=50, help="events per stream (50)")
    parser.add_argument("--interval-ms", type=int, default=20, help="ms between events (20)")
    parser.add_argument(
        "--quick", action="store_true", help="a fast check: --duration 3 --rounds 1"
    )
    parser.add_argument(
        "--output", type=Path, default=RESULTS_DIR, help="results directory (benchmarks/results)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; exit code 0 on success, 1 on a failure, 130 when interrupted."""
    args = _parser().parse_args(argv)
    if args.quick:
        args.duration, args.rounds = 3, 1
    for name in ("duration", "rounds", "connections", "streams", "chunks", "interval_ms"):
        if getattr(args, name) < 1:
            _parser().error(f"--{name.replace('_', '-')} must be at least 1")
    settings = Settings(
        duration_s=args.duration,
        rounds=args.rounds,
        connections=args.connections,
        streams=args.streams,
        chunks=args.chunks,
        interval_ms=args.interval_ms,
    )
    progress = Progress()
    try:
        results = run_guarded(lambda: run(settings, progress), progress)
    except Stopped as stopped:
        return stopped.code
    json_path, md_path, latest_path = write_results(results, args.output)
    progress(f"wrote {json_path}, {md_path} and {latest_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
