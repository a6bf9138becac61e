"""Tests for the pure parts of ``make bench-peers``: configs, target selection, CPU accounting,
ratios and the results files. No peer is started and wrk never runs."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from backends.fast import FastServer, asks_for_stream
from benchmarks.peers import ALL_NAMES, select
from benchmarks.peers_configs import haproxy_cfg, lb_config, litellm_config, nginx_conf
from benchmarks.peers_measure import (
    Settings,
    chat_stream_request,
    run_chat_wave,
    run_chat_waves_reused,
    summaries,
)
from benchmarks.peers_plots import series
from benchmarks.peers_report import ratios, render, round_ratios, write_results
from benchmarks.peers_targets import descendants, parse_stat
from benchmarks.streams import run_wave_of, run_waves_reused
from lb.config import parse_config

PORTS = [41001, 41002]


def test_nginx_config_balances_both_backends_over_kept_alive_connections(
    tmp_path: Path,
) -> None:
    """The nginx config names both backends in one upstream with a keepalive pool."""
    text = nginx_conf(8080, PORTS, tmp_path, None)
    for directive in (
        "daemon off;",
        "master_process on;",
        "worker_processes 1;",
        "access_log off;",
        "proxy_http_version 1.1;",
        'proxy_set_header Connection "";',
        "proxy_buffering off;",
        "server 127.0.0.1:41001;",
        "server 127.0.0.1:41002;",
        "listen 127.0.0.1:8080",
    ):
        assert directive in text
    assert "keepalive 128;" in text
    assert f"error_log {tmp_path / 'nginx-error.log'}" in text
    assert not text.startswith("user")


def test_nginx_config_sets_the_worker_user_only_when_asked(tmp_path: Path) -> None:
    """``user`` leads the config when given (a root master), and is absent otherwise."""
    assert nginx_conf(8080, PORTS, tmp_path, "root").startswith("user root;\n")


@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed")
def test_nginx_accepts_the_generated_config(tmp_path: Path) -> None:
    """``nginx -t`` finds no error in the generated config."""
    user = "root" if os.geteuid() == 0 else None
    path = tmp_path / "nginx.conf"
    path.write_text(nginx_conf(8080, PORTS, tmp_path, user))
    argv = ["nginx", "-t", "-p", str(tmp_path), "-e", str(tmp_path / "e.log"), "-c", str(path)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr


def test_haproxy_config_is_one_thread_round_robin_with_reuse() -> None:
    """The HAProxy config has one thread, round robin, connection reuse and both servers."""
    text = haproxy_cfg(8080, PORTS)
    for line in (
        "nbthread 1",
        "mode http",
        "http-reuse always",
        "option http-no-delay",
        "balance roundrobin",
        "bind 127.0.0.1:8080",
        "server b1 127.0.0.1:41001",
        "server b2 127.0.0.1:41002",
    ):
        assert line in text
    assert "\n    log " not in text


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy is not installed")
def test_haproxy_accepts_the_generated_config(tmp_path: Path) -> None:
    """``haproxy -c`` finds no error in the generated config."""
    path = tmp_path / "haproxy.cfg"
    path.write_text(haproxy_cfg(8080, PORTS))
    done = subprocess.run(
        ["haproxy", "-c", "-f", str(path)], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_litellm_config_has_one_openai_deployment_per_backend() -> None:
    """Each backend is an ``openai/bench-model`` deployment of the model the bodies name."""
    config = yaml.safe_load(litellm_config(PORTS))
    deployments = config["model_list"]
    assert [d["model_name"] for d in deployments] == ["bench-model", "bench-model"]
    assert [d["litellm_params"]["api_base"] for d in deployments] == [
        "http://127.0.0.1:41001/v1",
        "http://127.0.0.1:41002/v1",
    ]
    assert {d["litellm_params"]["model"] for d in deployments} == {"openai/bench-model"}
    assert config["litellm_settings"]["telemetry"] is False
    assert config["general_settings"]["disable_spend_logs"] is True


def test_lb_config_is_valid_round_robin_with_defaults_and_no_access_log() -> None:
    """lb's own parser accepts the config: round robin, access log off, health checks on."""
    config = parse_config(yaml.safe_load(lb_config(8080, 8081, PORTS)))
    (pool,) = config.pools
    assert pool.strategy == "round_robin"
    assert [b.url for b in pool.backends] == ["http://127.0.0.1:41001", "http://127.0.0.1:41002"]
    assert config.access_log.enabled is False
    assert pool.health_check.enabled is True
    assert config.admin.enabled is True


def test_select_runs_everything_in_order_by_default() -> None:
    """Without options every target runs, direct first and LiteLLM last."""
    assert select([], []) == list(ALL_NAMES)


def test_select_keeps_direct_with_only_and_drops_skipped() -> None:
    """``--only`` keeps the direct reference; ``--skip`` removes targets, direct included."""
    assert select(["nginx", "lb"], []) == ["direct", "lb", "nginx"]
    assert select([], ["litellm", "direct"]) == [
        n for n in ALL_NAMES if n not in ("litellm", "direct")
    ]


def test_select_refuses_an_unknown_name() -> None:
    """A misspelt target is an error naming it."""
    with pytest.raises(ValueError, match="'ngnix'"):
        select(["ngnix"], [])


def test_parse_stat_reads_parent_and_cpu_past_a_name_with_spaces() -> None:
    """ppid and utime + stime are found even when the command name holds ``) (``."""
    fields = ["S", "42"] + ["0"] * 9 + ["150", "25"] + ["0"] * 30
    text = "1234 (odd) (name) " + " ".join(fields)
    assert parse_stat(text) == (42, 175)


def test_descendants_follow_children_and_grandchildren_only() -> None:
    """The tree below a pid holds its children's children and nothing beside it."""
    parents = {10: 1, 11: 10, 12: 11, 13: 10, 20: 1, 21: 20}
    assert descendants(10, parents) == {10, 11, 12, 13}
    assert descendants(99, parents) == set()


def _small(rps: dict[str, float | None]) -> dict[str, Any]:
    return {
        "targets": {
            name: {"median": None if value is None else {"requests_per_s": value}}
            for name, value in rps.items()
        }
    }


def test_ratios_divide_lb_by_each_target() -> None:
    """The ratio is lb's req/s over the target's; a failed target has none."""
    out = ratios(_small({"direct": 40_000.0, "lb": 10_000.0, "nginx": 20_000.0, "x": None}))
    assert out == {"direct": 0.25, "lb": 1.0, "nginx": 0.5, "x": None}


def test_ratios_are_none_without_lb() -> None:
    """Without an lb row there is nothing to divide."""
    assert ratios(_small({"direct": 40_000.0, "nginx": 20_000.0})) == {
        "direct": None,
        "nginx": None,
    }


def test_ratios_pair_rounds_and_take_the_median_ratio() -> None:
    """Each round's lb is divided by the same round's target; the median of those is the
    ratio, so a host that slows down for one round moves neither side alone."""

    def rounds(*rps: float) -> dict[str, Any]:
        return {"median": {"requests_per_s": sorted(rps)[1]}, "rounds": [
            {"round": i, "requests_per_s": v} for i, v in enumerate(rps, start=1)
        ]}  # fmt: skip

    small = {"targets": {"lb": rounds(100.0, 50.0, 90.0), "peer": rounds(50.0, 50.0, 30.0)}}
    assert round_ratios(small) == {"lb": [1.0, 1.0, 1.0], "peer": [2.0, 1.0, 3.0]}
    assert ratios(small) == {"lb": 1.0, "peer": 2.0}  # medians alone would give 90/50 = 1.8


def test_summaries_take_median_rounds_and_keep_failures() -> None:
    """Rounds combine to medians (counts summed); a target without a round has no median."""
    rows: dict[str, list[dict[str, Any]]] = {
        "lb": [
            {"round": 1, "requests_per_s": 100.0, "non_2xx": 1},
            {"round": 2, "requests_per_s": 300.0, "non_2xx": 2},
            {"round": 3, "requests_per_s": 200.0, "non_2xx": 0},
        ],
        "haproxy": [],
    }
    out = summaries(rows, {"lb": [], "haproxy": ["round 1: boom"]})
    assert out["lb"]["median"] == {"requests_per_s": 200.0, "non_2xx": 3}
    assert out["haproxy"] == {"median": None, "rounds": [], "failures": ["round 1: boom"]}


def test_chat_stream_request_asks_the_fast_backend_for_a_stream() -> None:
    """The stream request is a well-framed POST whose body backends.fast streams."""
    raw = chat_stream_request(9000)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
    assert f"Content-Length: {len(body)}".encode() in head
    assert json.loads(body)["stream"] is True
    assert asks_for_stream(body)


async def test_a_chat_wave_against_the_fast_backend_counts_every_event() -> None:
    """A wave of 5 streams of 3 chunks reads 4 events each, [DONE] included, with no error."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: FastServer(3, 0.002), "127.0.0.1", 0)
    try:
        port = int(server.sockets[0].getsockname()[1])
        samples = await run_chat_wave(port, 5, 3, timeout_s=10.0)
    finally:
        server.close()
        await server.wait_closed()
    assert (samples.streams, samples.events, dict(samples.errors)) == (5, 20, {})
    assert len(samples.ttfb_s) == 5
    assert len(samples.gaps_s) == 15


async def test_a_chat_wave_counts_short_streams_as_failed() -> None:
    """Streams with fewer chunks than expected are failures, named by their event count."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: FastServer(2, 0.001), "127.0.0.1", 0)
    try:
        port = int(server.sockets[0].getsockname()[1])
        samples = await run_chat_wave(port, 2, 5, timeout_s=10.0)
    finally:
        server.close()
        await server.wait_closed()
    assert dict(samples.errors) == {"3 events instead of 6": 2}


class CountingFastServer(FastServer):
    """backends.fast, counting the connections it is handed."""

    opened = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        CountingFastServer.opened += 1
        super().connection_made(transport)


async def test_reused_chat_waves_count_every_event_over_connections_opened_once() -> None:
    """Three waves of 4 streams of 3 chunks: 48 events, [DONE] included, on 4 connections."""
    loop = asyncio.get_running_loop()
    CountingFastServer.opened = 0
    server = await loop.create_server(lambda: CountingFastServer(3, 0.002), "127.0.0.1", 0)
    try:
        port = int(server.sockets[0].getsockname()[1])
        settings = Settings(duration_s=2, rounds=1, connections=4, streams=4, chunks=3)
        samples = await run_chat_waves_reused(port, 3, settings)
    finally:
        server.close()
        await server.wait_closed()
    assert (samples.streams, samples.events, dict(samples.errors)) == (12, 48, {})
    assert len(samples.ttfb_s) == 12
    assert CountingFastServer.opened == 4


async def test_a_reused_connection_the_server_closes_fails_its_later_waves() -> None:
    """A server that closes each connection after one stream: the first wave succeeds, and
    every stream of the later waves counts as failed."""

    class OneStreamServer(FastServer):
        def _stream(self, i: int, chunks: int, interval_s: float, event: Any) -> None:
            super()._stream(i, chunks, interval_s, event)
            if i >= chunks and self.transport is not None:
                self.transport.close()

    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: OneStreamServer(1, 0.001), "127.0.0.1", 0)
    try:
        port = int(server.sockets[0].getsockname()[1])
        samples = await run_waves_reused(
            chat_stream_request(port), "127.0.0.1", port, 3, 2, 3, 5.0, at_least=True
        )
    finally:
        server.close()
        await server.wait_closed()
    assert samples.streams == 9
    assert sum(samples.errors.values()) == 6
    assert len(samples.ttfb_s) == 3


class StallingServer(FastServer):
    """backends.fast whose streams send their first chunk and then nothing."""

    def _stream(self, i: int, chunks: int, interval_s: float, event: Any) -> None:
        if i == 0:
            super()._stream(i, chunks, interval_s, event)


async def test_a_stream_still_running_at_the_timeout_counts_as_timed_out() -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: StallingServer(3, 0.001), "127.0.0.1", 0)
    try:
        port = int(server.sockets[0].getsockname()[1])
        samples = await run_wave_of(chat_stream_request(port), "127.0.0.1", port, 2, 4, 0.3)
    finally:
        server.close()
        await server.wait_closed()
    assert dict(samples.errors) == {"timed out": 2}
    assert len(samples.ttfb_s) == 2  # the first chunk that did arrive is kept


async def test_a_reused_connection_whose_stream_timed_out_is_not_reused() -> None:
    """Its response may still arrive: the next wave must not read it as its own."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: StallingServer(3, 0.001), "127.0.0.1", 0)
    try:
        port = int(server.sockets[0].getsockname()[1])
        samples = await run_waves_reused(chat_stream_request(port), "127.0.0.1", port, 2, 4, 2, 0.3)
    finally:
        server.close()
        await server.wait_closed()
    assert dict(samples.errors) == {"timed out": 2, "connection closed before its wave": 2}


def test_stream_waves_follow_the_duration() -> None:
    """Five waves per round at 10 s per run, and never fewer than one."""
    assert Settings(10, 3, 64).stream_waves == 5
    assert Settings(1, 1, 64).stream_waves == 1


def _results() -> dict[str, Any]:
    median = {
        "requests_per_s": 10_000.0,
        "p50_ms": 5.0,
        "p99_ms": 9.0,
        "non_2xx": 0,
        "socket_errors": 0,
        "proxy_cpu_us_per_request": 80.0,
        "proxy_cpu_busy": 0.8,
    }
    nginx = {**median, "requests_per_s": 20_000.0, "proxy_cpu_us_per_request": 25.0}
    round_row = {"round": 1, **median, "idle_proxies_cpu_busy": 0.0}
    stream = {
        "ttfb_ms_p50": 10.0,
        "ttfb_ms_p99": 12.0,
        "gap_ms_p99": 25.0,
        "gap_ms_max_dev": 7.0,
        "proxy_cpu_us_per_chunk": 40.0,
        "failed_streams": 0,
        "streams": 64,
    }
    small = {
        "body_bytes": 215,
        "targets": {
            "lb": {"median": median, "rounds": [round_row], "failures": []},
            "nginx": {"median": nginx, "rounds": [], "failures": []},
            "litellm": {"median": None, "rounds": [], "failures": ["round 1: wrk failed"]},
        },
    }
    results: dict[str, Any] = {
        "date": "2026-01-02",
        "host": "box",
        "machine": {
            "cpu_model": "CPU",
            "cpu_count": 2,
            "memory_gib": 4.0,
            "kernel": "6",
            "python": "3.11",
            "wrk": "wrk 4",
            "git_commit": "abc",
            "git_dirty": False,
        },
        "settings": {
            "duration_s": 10,
            "rounds": 3,
            "connections": 64,
            "streams": 64,
            "chunks": 50,
            "interval_ms": 20,
            "stream_waves": 5,
            "pinning": "pinned",
        },
        "versions": {"lb": "this repository", "nginx": "nginx/1.22.1"},
        "notes": {"litellm": "skipped: cannot install"},
        "targets": {
            "lb": {"placement": "CPU 1", "connections": 64},
            "nginx": {"placement": "CPU 1", "connections": 64},
            "litellm": {"placement": "CPU 1", "connections": 16},
        },
        "small_requests": small,
        "streams": {
            "targets": {
                "lb": {"median": stream, "rounds": [{"round": 1, **stream}]},
                "nginx": {"median": None, "rounds": []},
            }
        },
        "streams_reused": {
            "targets": {
                "lb": {"median": {**stream, "ttfb_ms_p50": 3.0}, "rounds": []},
            }
        },
    }
    results["ratios"] = ratios(small)
    return results


def test_the_report_shows_each_target_with_its_ratio() -> None:
    """The small-request table has lb at 1.00, nginx at 0.50 and a failed LiteLLM row."""
    text = render(_results())
    assert "| lb | CPU 1 | 10,000 | 1.00 | 1.00 | 5.00 | 9.00 | 0 | 0 | 80.0 | 0.80 | 64 |" in text
    assert "| nginx | CPU 1 | 20,000 | 0.50 |" in text
    assert "| litellm | CPU 1 | failed |" in text
    assert "| lb | 10.00 | 12.00 | 25.00 | 7.00 | 40.0 | 0 / 64 |" in text
    reused = text.split("## Streams on reused connections")[1]
    assert "| lb | 3.00 | 12.00 | 25.00 | 7.00 | 40.0 | 0 / 64 |" in reused
    assert "- **litellm**: skipped: cannot install" in text
    assert "round 1: wrk failed" in text
    assert "| lb | 1 | 10,000 | 9.00 | 80.0 | 0.00 | 12.00 | 25.00 |" in text


def test_a_results_file_from_before_reused_connections_renders_without_that_table() -> None:
    results = _results()
    del results["streams_reused"]
    text = render(results)
    assert "## Streams\n" in text
    assert "## Streams on reused connections" not in text


def test_results_files_are_written_with_a_latest_copy(tmp_path: Path) -> None:
    """The JSON, the dated Markdown and peers-latest.md land in the output directory."""
    json_path, md_path, latest = write_results(_results(), tmp_path / "out")
    assert json_path.name == "peers-2026-01-02-box.json"
    assert md_path.name == "peers-2026-01-02-box.md"
    assert latest.read_text() == md_path.read_text()
    assert json.loads(json_path.read_text())["ratios"]["nginx"] == 0.5


def test_plot_series_leave_out_targets_without_a_median() -> None:
    """Plots show the targets that ran, with their values in order."""
    names, (rps, p99) = series(
        _results()["small_requests"]["targets"], ("requests_per_s", "p99_ms")
    )
    assert names == ["lb", "nginx"]
    assert rps == [10_000.0, 20_000.0]
    assert p99 == [9.0, 9.0]
