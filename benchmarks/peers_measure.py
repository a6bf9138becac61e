"""The two loads of ``make bench-peers``, interleaved over every target: wrk's small POSTs and
waves of concurrent OpenAI-style chat streams.

Around each run the CPU of every proxy's process tree is read from ``/proc``: the target's, per
request or per chunk, and the idle proxies' (which share its CPU) as a check that they stayed
idle.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import uvloop

from benchmarks.peers_configs import MODEL
from benchmarks.peers_targets import ProcTable, Target, proc_table, tree_cpu_s
from benchmarks.processes import HOST, BenchError, Service
from benchmarks.report import aggregate
from benchmarks.streams import StreamSamples, run_wave_of, run_waves_reused, summarise
from benchmarks.wrk import BODY, PATH, run_wrk, wrk_argv

Progress = Callable[[str], None]
WARMUP_S = 1


@dataclass(frozen=True)
class Settings:
    """What one run measures; see ``python -m benchmarks.peers --help`` for each option."""

    duration_s: int
    rounds: int
    connections: int
    streams: int = 64
    chunks: int = 50
    interval_ms: int = 20

    @property
    def stream_waves(self) -> int:
        """Waves of streams per round and target: enough proxy CPU time to beat the 10 ms tick."""
        return max(1, self.duration_s // 2)


def chat_stream_request(port: int) -> bytes:
    """The streamed chat completion request every target gets, as raw HTTP/1.1."""
    body = json.dumps(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Count to fifty, please."}],
            "max_tokens": 64,
            "stream": True,
        }
    ).encode()
    head = (
        f"POST {PATH} HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Type: application/json\r\n"
        f"Accept: text/event-stream\r\nUser-Agent: lb-bench\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def run_chat_wave(
    port: int, concurrency: int, chunks: int, timeout_s: float
) -> StreamSamples:
    """Open ``concurrency`` connections, send every chat stream request at once, read them all.

    A stream counts as complete with a ``200`` carrying at least ``chunks`` events and
    ``[DONE]`` (a proxy may split the last chunk in two); one that ends otherwise, fails, or
    outlives ``timeout_s`` is counted in ``errors``, its timings that did arrive kept.
    """
    return await run_wave_of(
        chat_stream_request(port), HOST, port, concurrency, chunks + 1, timeout_s, at_least=True
    )


async def run_chat_waves(port: int, waves: int, settings: Settings) -> StreamSamples:
    """``waves`` waves of :func:`run_chat_wave`, one after the other, merged; each is cut
    after the stream's own length plus 10 s."""
    timeout_s = settings.chunks * settings.interval_ms / 1000.0 + 10.0
    merged = StreamSamples()
    for _ in range(waves):
        wave = await run_chat_wave(port, settings.streams, settings.chunks, timeout_s)
        merged.extend(wave)
    return merged


async def run_chat_waves_reused(port: int, waves: int, settings: Settings) -> StreamSamples:
    """``waves`` waves of chat streams over ``settings.streams`` connections opened once and
    reused by every wave (an HTTP client's connection pool); streams count as in
    :func:`run_chat_wave`."""
    timeout_s = settings.chunks * settings.interval_ms / 1000.0 + 10.0
    return await run_waves_reused(
        chat_stream_request(port),
        HOST,
        port,
        settings.streams,
        settings.chunks + 1,
        waves,
        timeout_s,
        at_least=True,
    )


class CpuMeter:
    """CPU seconds of each target's process tree and of the backend between two readings."""

    def __init__(self, targets: list[Target], backend: Service) -> None:
        self.targets = targets
        self.backend = backend
        self._before: dict[str, float] = {}

    def _read(self) -> dict[str, float]:
        table: ProcTable = proc_table()
        readings = {
            t.name: tree_cpu_s(t.service.pid, table) for t in self.targets if t.service is not None
        }
        readings["backend"] = tree_cpu_s(self.backend.pid, table)
        return readings

    def start(self) -> None:
        self._before = self._read()

    def stop(self) -> dict[str, float]:
        """CPU seconds used since :meth:`start`, by target name and ``backend``."""
        after = self._read()
        return {name: after[name] - self._before.get(name, after[name]) for name in after}


def _others_s(used: dict[str, float], target: Target) -> float:
    return sum(v for k, v in used.items() if k not in (target.name, "backend"))


def measure_small(
    targets: list[Target],
    backend: Service,
    settings: Settings,
    prefix: list[str],
    script: Path,
    progress: Progress,
) -> dict[str, Any]:
    """wrk against every target, rounds interleaved; a failed run is recorded, not fatal."""
    meter = CpuMeter(targets, backend)
    commands: dict[str, str] = {}

    def argv(target: Target, duration_s: int) -> list[str]:
        connections = target.connections or settings.connections
        return wrk_argv(prefix, connections, duration_s, script, target.url)

    for target in targets:
        progress(f"small requests: warm-up {WARMUP_S}s, {target.name}")
        try:
            run_wrk(argv(target, WARMUP_S), WARMUP_S)
        except BenchError as exc:
            progress(f"small requests: warm-up of {target.name} failed: {exc}")
    rows: dict[str, list[dict[str, Any]]] = {t.name: [] for t in targets}
    failures: dict[str, list[str]] = {t.name: [] for t in targets}
    for round_no in range(1, settings.rounds + 1):
        for target in targets:
            command = argv(target, settings.duration_s)
            commands[target.name] = " ".join(command)
            meter.start()
            try:
                result = run_wrk(command, settings.duration_s)
            except BenchError as exc:
                failures[target.name].append(f"round {round_no}: {exc}")
                progress(f"small requests: round {round_no} {target.name} failed: {exc}")
                continue
            used = meter.stop()
            requests = max(1, result.requests)
            row: dict[str, Any] = {"round": round_no, **asdict(result)}
            proxy_s = used.get(target.name)
            row["proxy_cpu_us_per_request"] = (
                round(proxy_s / requests * 1e6, 2) if proxy_s is not None else None
            )
            row["proxy_cpu_busy"] = (
                round(proxy_s / result.duration_s, 3) if proxy_s is not None else None
            )
            row["idle_proxies_cpu_busy"] = round(_others_s(used, target) / result.duration_s, 3)
            row["backend_cpu_us_per_request"] = round(used["backend"] / requests * 1e6, 2)
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
        "targets": summaries(rows, failures),
    }


def measure_streams(
    targets: list[Target],
    backend: Service,
    settings: Settings,
    progress: Progress,
    *,
    reuse: bool = False,
) -> dict[str, Any]:
    """Waves of concurrent chat streams against each target, rounds interleaved; each stream
    on a connection of its own, or (``reuse``) on connections every wave of a round reuses."""
    meter = CpuMeter(targets, backend)
    rows: dict[str, list[dict[str, Any]]] = {t.name: [] for t in targets}
    failures: dict[str, list[str]] = {t.name: [] for t in targets}
    waves_of = run_chat_waves_reused if reuse else run_chat_waves
    label = "streams on reused connections" if reuse else "streams"
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        for target in targets:
            progress(f"{label}: warm-up, {target.name}")
            runner.run(waves_of(target.port, 1, settings))
        for round_no in range(1, settings.rounds + 1):
            for target in targets:
                waves = target.stream_waves or settings.stream_waves
                meter.start()
                started = time.perf_counter()
                samples = runner.run(waves_of(target.port, waves, settings))
                wall_s = time.perf_counter() - started
                used = meter.stop()
                summary = summarise(samples, settings.interval_ms)
                events = max(1, samples.events)
                row: dict[str, Any] = {"round": round_no, "waves": waves, **asdict(summary)}
                row["wall_s"] = round(wall_s, 3)
                proxy_s = used.get(target.name)
                row["proxy_cpu_us_per_chunk"] = (
                    round(proxy_s / events * 1e6, 2) if proxy_s is not None else None
                )
                row["idle_proxies_cpu_busy"] = round(_others_s(used, target) / wall_s, 3)
                row["backend_cpu_us_per_chunk"] = round(used["backend"] / events * 1e6, 2)
                rows[target.name].append(row)
                progress(
                    f"{label}: round {round_no}/{settings.rounds} {target.name}: "
                    f"{summary.streams} streams, TTFB p50 {summary.ttfb_ms_p50} ms "
                    f"p99 {summary.ttfb_ms_p99} ms, gap p99 {summary.gap_ms_p99} ms, "
                    f"failed {summary.failed_streams}"
                )
    return {"request": chat_stream_request(0).decode(), "targets": summaries(rows, failures)}


def summaries(
    rows: dict[str, list[dict[str, Any]]], failures: dict[str, list[str]]
) -> dict[str, dict[str, Any]]:
    """Per target: the median row (``None`` when no round succeeded), every round, failures."""
    return {
        name: {
            "median": aggregate(target_rows) if target_rows else None,
            "rounds": target_rows,
            "failures": failures[name],
        }
        for name, target_rows in rows.items()
    }
