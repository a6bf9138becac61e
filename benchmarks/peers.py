"""``make bench-peers``: lb side by side with nginx, HAProxy, vllm-router, sglang-router and
LiteLLM, on small POSTs (wrk) and concurrent OpenAI-style chat streams.

One ``backends.fast`` process serves two ports; every proxy balances round robin over both.
Rounds are interleaved (direct, lb, nginx, ... then again) so drift in the machine spreads over
every target, and the median round is reported. A peer that cannot be installed or started is
skipped with a note. Results go to ``benchmarks/results/peers-*``. Every process started is
stopped on the way out, on success, failure, Ctrl-C or SIGTERM alike.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from datetime import date
from pathlib import Path
from typing import Any

from benchmarks.bench import Progress
from benchmarks.machine import describe, host_label, package_version
from benchmarks.peers_configs import HAPROXY_TIMEOUT_S
from benchmarks.peers_measure import Settings, measure_small, measure_streams
from benchmarks.peers_plots import write_plots
from benchmarks.peers_report import ratios, write_results
from benchmarks.peers_targets import (
    Target,
    ensure_apt,
    start_haproxy,
    start_lb,
    start_litellm,
    start_nginx,
    start_router,
    tool_version,
)
from benchmarks.processes import (
    CPU_LOAD,
    CPU_PROXY,
    HOST,
    BenchError,
    Pinning,
    Service,
    Stopped,
    detect_pinning,
    free_ports,
    run_guarded,
    scrape_metrics,
    stop_all,
)
from benchmarks.routing_targets import ANSI_ESCAPE
from benchmarks.wrk import write_script

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benchmarks" / "results"
PEERS_DIR = Path("/tmp/lb-routing-peers")
NAMES = ("direct", "lb", "lb-workers2", "nginx", "haproxy", "vllm-router", "sglang-router")
ALL_NAMES = (*NAMES, "litellm")
LITELLM_CONNECTIONS = 16  # at ~60 req/s, 64 connections would queue past wrk's 2 s timeout
LITELLM_STREAM_WAVES = 1
NOTES = {
    "lb": "one process, every feature at its defaults (metrics, admin API, health checks, "
    "outlier detection, retries), `round_robin`, access log off (the peers log nothing per "
    "request either).",
    "lb-workers2": "`--workers 2`: two processes sharing the listener (SO_REUSEPORT), not "
    "pinned (both CPUs, shared with wrk and the backends); its CPU is both workers' and the "
    "supervisor's. Not comparable one to one with the single-CPU rows.",
    "nginx": "`worker_processes 1`, upstream `keepalive`, `proxy_http_version 1.1`, "
    '`proxy_set_header Connection ""`, `proxy_buffering off`, `access_log off`, '
    "`keepalive_requests` raised on both sides; CPU is the master's and the worker's.",
    "haproxy": f"`nbthread 1`, `mode http`, `http-reuse always`, `balance roundrobin`, no "
    f"logging, timeouts {HAPROXY_TIMEOUT_S} s (`timeout server` is an inactivity limit, so a "
    "stream lives while its events come less than that apart). HAProxy does not buffer "
    "response bodies, but by default it sends body data with `MSG_MORE` while it expects more, "
    "and the kernel then holds a small SSE event back for up to 200 ms (a short run without "
    "the option measured TTFB p50 204 ms and gap p99 224 ms); `option http-no-delay`, set "
    "here, sends each event as it comes.",
    "vllm-router": "`--policy round_robin`, its own venv; CPU is the whole process (all threads "
    "of its async runtime, on one CPU).",
    "sglang-router": "`--policy round_robin`, its own venv; CPU is the whole process (all "
    "threads, on one CPU).",
    "litellm": f"LiteLLM proxy, one uvicorn worker, no database, no master key; it re-encodes "
    f"every response. Measured with {LITELLM_CONNECTIONS} wrk connections instead of the run's "
    f"setting (it serves about 60 req/s; more connections only queue past wrk's 2 s timeout) "
    f"and {LITELLM_STREAM_WAVES} stream wave per round, each cut after the stream's length "
    "plus 10 s. It splits the last chunk into a content event and a finish_reason event, so "
    "its streams carry one event more.",
}


def select(only: list[str], skip: list[str]) -> list[str]:
    """The targets to run, in the fixed order: ``only`` (all when empty) minus ``skip``.

    ``direct`` stays in whatever ``only`` says (it is the reference); ``--skip direct`` drops
    it. Raises ``ValueError`` naming an unknown target.
    """
    for name in [*only, *skip]:
        if name not in ALL_NAMES:
            raise ValueError(f"unknown target {name!r} (known: {', '.join(ALL_NAMES)})")
    wanted = set(only) | {"direct"} if only else set(ALL_NAMES)
    return [name for name in ALL_NAMES if name in wanted and name not in skip]


def start_backend(
    tmp: Path, pinning: Pinning, settings: Settings, services: list[Service]
) -> tuple[Service, list[int]]:
    """``backends.fast`` on two ports, on the load CPU, streaming as ``settings`` says."""
    ports = free_ports(2)
    argv = [*pinning.prefix(CPU_LOAD), sys.executable, "-m", "backends.fast"]
    for port in ports:
        argv += ["--port", str(port)]
    argv += ["--stream-chunks", str(settings.chunks)]
    argv += ["--stream-interval-ms", str(settings.interval_ms)]
    backend = Service("backends.fast", argv, tmp / "fast.log", ROOT)
    services.append(backend)
    backend.wait_ready(ports)
    return backend, ports


def start_target(
    name: str,
    tmp: Path,
    pinning: Pinning,
    ports: list[int],
    services: list[Service],
    progress: Callable[[str], None],
    versions: dict[str, str],
) -> Target:
    """Install if needed and start the proxy ``name`` in front of ``ports``; records its
    version in ``versions``; raises :class:`BenchError` if it cannot."""
    prefix = pinning.prefix(CPU_PROXY)
    if name == "lb":
        target = start_lb(tmp, prefix, ports, 1, services, "CPU 1")
    elif name == "lb-workers2":
        # This process runs on the load CPU only, and children inherit that: widen it again.
        both = ["taskset", "-c", f"{CPU_LOAD},{CPU_PROXY}"] if pinning.enabled else []
        target = start_lb(tmp, both, ports, 2, services, "both CPUs, 2 workers + supervisor")
    elif name in ("nginx", "haproxy"):
        ensure_apt([name], progress)
        versions[name] = tool_version([name, "-v"])
        start = start_nginx if name == "nginx" else start_haproxy
        target = start(tmp, prefix, ports, services)
    elif name == "litellm":
        target, versions[name] = start_litellm(tmp, prefix, ports, PEERS_DIR, services, progress)
        target.connections = LITELLM_CONNECTIONS
        target.stream_waves = LITELLM_STREAM_WAVES
    else:
        target, versions[name] = start_router(
            name, tmp, prefix, ports, PEERS_DIR, services, progress
        )
    if not pinning.enabled:
        target.placement = "unpinned"
    return target


def run(settings: Settings, names: list[str], progress: Progress) -> dict[str, Any]:
    """Start everything, measure, stop everything; returns the results document."""
    pinning = detect_pinning()
    progress(f"pinning: {pinning.description}")
    ensure_apt(["wrk"], progress)
    if pinning.enabled:
        os.sched_setaffinity(0, {CPU_LOAD})  # the stream client shares CPU 0 with wrk
    versions = {"lb": f"{package_version('lb')} (this repository, at the commit above)"}
    notes: dict[str, str] = {}
    results: dict[str, Any] = {
        "date": date.today().isoformat(),
        "host": host_label(),
        "machine": describe(ROOT),
        "settings": {
            **asdict(settings),
            "stream_waves": settings.stream_waves,
            "targets": names,
            "pinned": pinning.enabled,
            "pinning": pinning.description,
        },
    }
    with tempfile.TemporaryDirectory(prefix="lb-peers-") as tmp_name:
        tmp = Path(tmp_name)
        services: list[Service] = []
        try:
            backend, ports = start_backend(tmp, pinning, settings, services)
            progress(f"backend backends.fast on ports {ports} (pid {backend.pid})")
            results["backend_argv"] = backend.argv
            direct = Target("direct", ports[0], None, "no proxy")
            targets = [direct] if "direct" in names else []
            for name in (n for n in names if n != "direct"):
                progress(f"{name}: starting")
                try:
                    target = start_target(name, tmp, pinning, ports, services, progress, versions)
                except BenchError as exc:
                    notes[name] = f"skipped: {exc}"
                    progress(f"{name}: skipped: {exc}")
                    continue
                assert target.service is not None
                progress(f"{name} on port {target.port} (pid {target.service.pid})")
                notes.setdefault(name, NOTES[name])
                targets.append(target)
            script = write_script(tmp)
            results["small_requests"] = measure_small(
                targets, backend, settings, pinning.prefix(CPU_LOAD), script, progress
            )
            results["streams"] = measure_streams(targets, backend, settings, progress)
            results["streams_reused"] = measure_streams(
                targets, backend, settings, progress, reuse=True
            )
            results["lb_metrics"] = {
                t.name: scrape_metrics(HOST, t.admin_port)
                for t in targets
                if t.admin_port is not None
            }
        finally:
            progress(f"stopping {len(services)} processes")
            stop_all(services)
        results["targets"] = {
            t.name: {
                "placement": t.placement,
                "connections": t.connections or settings.connections,
                "argv": t.service.argv if t.service else None,
                "configs": t.configs,
                "log_tail": ANSI_ESCAPE.sub("", t.service.log(3000)) if t.service else None,
            }
            for t in targets
        }
    results["versions"] = versions
    results["notes"] = notes
    results["ratios"] = ratios(results["small_requests"])
    return results


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.peers",
        description="Measure lb against peer proxies; write benchmarks/results/peers-*.",
    )
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run (10)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (3)")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections (64)")
    parser.add_argument(
        "--only", default="", metavar="NAME[,NAME]", help=f"only these ({', '.join(ALL_NAMES)})"
    )
    parser.add_argument(
        "--skip", action="append", default=[], metavar="NAME", help="leave a target out"
    )
    parser.add_argument(
        "--quick", action="store_true", help="a fast check: --duration 3 --rounds 1"
    )
    parser.add_argument(
        "--output", type=Path, default=RESULTS_DIR, help="results directory (benchmarks/results)"
    )
    return parser


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; exit code 0 on success, 1 on a failure, 130 when interrupted."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.rounds = 3, 1
    for name in ("duration", "rounds", "connections"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    try:
        names = select(_names(args.only), [n for s in args.skip for n in _names(s)])
    except ValueError as exc:
        parser.error(str(exc))
    if not names:
        parser.error("no target left to run")
    settings = Settings(args.duration, args.rounds, args.connections)
    progress = Progress()
    try:
        results = run_guarded(lambda: run(settings, names, progress), progress)
    except Stopped as stopped:
        return stopped.code
    paths = list(write_results(results, args.output))
    try:
        paths += write_plots(results, args.output)
    except ImportError:
        progress("no plots: matplotlib is not installed (make bench-peers installs it)")
    progress("wrote " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
