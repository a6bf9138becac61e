"""Load reports: the Prometheus line parser, the config model, and scrapes of real servers."""

from __future__ import annotations

import asyncio
import logging
import math
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from pydantic import ValidationError

from lb.backend import Backend
from lb.config_load_report import LoadReport
from lb.load_report import LoadReporter, metric_names, parse_metrics

# -- what the servers export (trimmed from real /metrics pages) -----------------------------------

VLLM_V1 = """\
# HELP python_gc_objects_collected_total Objects collected during gc
# TYPE python_gc_objects_collected_total counter
python_gc_objects_collected_total{generation="0"} 12056.0
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 7.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 3.0
# HELP vllm:num_requests_waiting_by_reason Number of requests waiting, by reason.
# TYPE vllm:num_requests_waiting_by_reason gauge
vllm:num_requests_waiting_by_reason{engine="0",reason="capacity"} 99.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.3125
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.001",model_name="m"} 0.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="m"} 42.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="m"} 42.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="m"} 5.5
"""

VLLM_V0 = """\
# HELP vllm:num_requests_running Number of requests currently running on GPU.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="mistralai/Mistral-7B-v0.1"} 2.0
# HELP vllm:num_requests_swapped Number of requests swapped to CPU.
# TYPE vllm:num_requests_swapped gauge
vllm:num_requests_swapped{model_name="mistralai/Mistral-7B-v0.1"} 0.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="mistralai/Mistral-7B-v0.1"} 0.0
# HELP vllm:gpu_cache_usage_perc GPU KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{model_name="mistralai/Mistral-7B-v0.1"} 0.0625
# HELP vllm:cpu_cache_usage_perc CPU KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:cpu_cache_usage_perc gauge
vllm:cpu_cache_usage_perc{model_name="mistralai/Mistral-7B-v0.1"} 0.0
"""

SGLANG = """\
# HELP sglang:num_running_reqs The number of running requests.
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{model_name="Qwen/Qwen2.5-7B-Instruct",tp_rank="0"} 12.0
sglang:num_running_reqs{model_name="Qwen/Qwen2.5-7B-Instruct",tp_rank="1"} 4.0
# HELP sglang:num_queue_reqs The number of requests in the waiting queue.
# TYPE sglang:num_queue_reqs gauge
sglang:num_queue_reqs{model_name="Qwen/Qwen2.5-7B-Instruct",tp_rank="0"} 5.0
sglang:num_queue_reqs{model_name="Qwen/Qwen2.5-7B-Instruct",tp_rank="1"} 1.0
# HELP sglang:token_usage The token usage.
# TYPE sglang:token_usage gauge
sglang:token_usage{model_name="Qwen/Qwen2.5-7B-Instruct",tp_rank="0"} 0.5
sglang:token_usage{model_name="Qwen/Qwen2.5-7B-Instruct",tp_rank="1"} 0.25
# HELP sglang:cache_hit_rate The prefix cache hit rate.
# TYPE sglang:cache_hit_rate gauge
sglang:cache_hit_rate{model_name="Qwen/Qwen2.5-7B-Instruct",tp_rank="0"} NaN
"""

TGI = """\
# TYPE tgi_batch_current_max_tokens gauge
tgi_batch_current_max_tokens 5120
# TYPE tgi_batch_current_size gauge
tgi_batch_current_size 4
# TYPE tgi_queue_size gauge
tgi_queue_size 9
# TYPE tgi_request_duration histogram
tgi_request_duration_bucket{le="0.5"} 3
tgi_request_duration_bucket{le="+Inf"} 10
"""


def vllm_text(waiting: float, running: float, kv: float) -> str:
    """A vLLM V1 page with these gauge values."""
    return (
        VLLM_V1.replace("} 3.0\n", f"}} {waiting}\n", 1)
        .replace("} 7.0\n", f"}} {running}\n", 1)
        .replace("} 0.3125\n", f"}} {kv}\n", 1)
    )


# -- parse_metrics ------------------------------------------------------------------------------


def test_the_parser_reads_vllm_v1_gauges() -> None:
    """New vLLM names parse, labels and all; a longer name sharing the prefix is not mixed in."""
    names = ["vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc"]
    assert parse_metrics(VLLM_V1.encode(), names) == {
        "vllm:num_requests_waiting": (3.0, 1),
        "vllm:num_requests_running": (7.0, 1),
        "vllm:kv_cache_usage_perc": (0.3125, 1),
    }


def test_the_parser_reads_old_vllm_names_and_reports_absent_ones_absent() -> None:
    """The V0 page has gpu_cache_usage_perc and no kv_cache_usage_perc."""
    found = parse_metrics(
        VLLM_V0.encode(), ["vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"]
    )
    assert found == {"vllm:gpu_cache_usage_perc": (0.0625, 1)}


def test_the_parser_sums_every_series_of_a_name() -> None:
    """SGLang's per-rank series are summed and counted; a NaN series elsewhere is harmless."""
    names = ["sglang:num_queue_reqs", "sglang:num_running_reqs", "sglang:token_usage"]
    assert parse_metrics(SGLANG.encode(), names) == {
        "sglang:num_queue_reqs": (6.0, 2),
        "sglang:num_running_reqs": (16.0, 2),
        "sglang:token_usage": (0.75, 2),
    }


def test_the_parser_reads_unlabelled_samples() -> None:
    """TGI's gauges have no labels; the first line of the text is matched too."""
    names = ["tgi_queue_size", "tgi_batch_current_size", "tgi_batch_current_max_tokens"]
    assert parse_metrics(TGI.encode(), names) == {
        "tgi_queue_size": (9.0, 1),
        "tgi_batch_current_size": (4.0, 1),
        "tgi_batch_current_max_tokens": (5120.0, 1),
    }
    assert parse_metrics(b"tgi_queue_size 2", ["tgi_queue_size"]) == {"tgi_queue_size": (2.0, 1)}


def test_the_parser_skips_nan_and_infinite_samples() -> None:
    """Non-finite samples are skipped; a name with only those is present with no series."""
    text = b'a NaN\nb{x="1"} +Inf\nb{x="2"} 2\nc -Inf\n'
    assert parse_metrics(text, ["a", "b", "c"]) == {"a": (0.0, 0), "b": (2.0, 1), "c": (0.0, 0)}


def test_the_parser_handles_awkward_label_values_timestamps_and_crlf() -> None:
    """Label values holding braces, quotes and spaces; a trailing timestamp; CRLF line ends."""
    text = (
        b'q{path="/x} 5",note="say \\"hi\\" \\\\"} 1.5 1712345678000\r\n'
        b'q{path="}"} 2.5e+00\r\n'
        b"# q 100\r\n"
    )
    assert parse_metrics(text, ["q"]) == {"q": (4.0, 2)}


def test_the_parser_skips_malformed_lines() -> None:
    """A line without a value or with an unclosed label set is no sample, and nothing raises."""
    text = b'm\nm{a="1"\nm{a="1} 3\nm garbage\nm 4\n'
    assert parse_metrics(text, ["m", "absent"]) == {"m": (4.0, 1)}


# -- the config model and the presets -----------------------------------------------------------


def test_presets_name_the_servers_metrics_and_overrides_replace_them() -> None:
    """vLLM accepts the new KV name and falls back to the old; a configured name wins."""
    names = metric_names(LoadReport())
    assert names.kv_usage == ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
    tgi = metric_names(LoadReport(preset="tgi"))
    assert (tgi.waiting, tgi.running, tgi.kv_usage) == (
        ("tgi_queue_size",),
        ("tgi_batch_current_size",),
        (),
    )
    overridden = metric_names(LoadReport(preset="sglang", metrics={"kv_usage": "my_kv"}))
    assert overridden.kv_usage == ("my_kv",)
    assert overridden.waiting == ("sglang:num_queue_reqs",)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"preset": "custom"}, "needs at least one name"),
        ({"path": "metrics"}, "must start with '/'"),
        ({"interval_s": 1.0, "max_age_s": 1.0}, "must be longer than interval_s"),
        ({"metrics": {"waiting": "not a name"}}, "not a Prometheus metric name"),
        ({"kv_usage_scale": 0}, "greater than 0"),
        ({"scrape": True}, "Extra inputs are not permitted"),
    ],
)
def test_bad_load_report_settings_are_refused(settings: dict[str, Any], message: str) -> None:
    """Each invalid setting fails validation with a reason."""
    with pytest.raises(ValidationError, match=message):
        LoadReport(**settings)


# -- LoadReporter: real servers -----------------------------------------------------------------

FAST: dict[str, Any] = {"enabled": True, "interval_s": 0.02, "timeout_s": 0.2, "max_age_s": 1.0}
WAIT_S = 3.0


async def wait_until(condition: Callable[[], bool], what: str) -> None:
    """Poll ``condition`` until it holds; fail the test after ``WAIT_S``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, now_s: float = 500.0) -> None:
        self.now_s = now_s

    def __call__(self) -> float:
        return self.now_s


@dataclass
class MetricsServer:
    """An aiohttp server whose /metrics page and status the test switches."""

    body: str = VLLM_V1
    status: int = 200
    hang: bool = False  # when set, requests wait for `release`
    scrapes: int = 0
    paths: list[str] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    peers: set[Any] = field(default_factory=set)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    runner: web.AppRunner | None = None
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        app = web.Application()
        app[METRICS_SERVER] = self
        app.router.add_route("*", "/{tail:.*}", _handle)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        self.port = self.runner.addresses[0][1]

    async def stop(self) -> None:
        """Close the listener and every connection; the port is then refused."""
        self.release.set()
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
        self.release = asyncio.Event()


METRICS_SERVER = web.AppKey("metrics_server", MetricsServer)


async def _handle(request: web.Request) -> web.StreamResponse:
    s = request.app[METRICS_SERVER]
    s.scrapes += 1
    s.paths.append(request.path)
    s.headers.append(dict(request.headers))
    assert request.transport is not None
    s.peers.add(request.transport.get_extra_info("peername"))
    if s.hang:
        await s.release.wait()
    if s.status != 200:
        return web.Response(status=s.status, text="engine error")
    return web.Response(text=s.body, content_type="text/plain")


@pytest.fixture
async def servers() -> AsyncIterator[Callable[..., Awaitable[MetricsServer]]]:
    """Factory: ``await servers(body=...)`` starts a metrics server, stopped at the end."""
    started: list[MetricsServer] = []

    async def start(**kwargs: Any) -> MetricsServer:
        server = MetricsServer(**kwargs)
        await server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        await server.stop()


@pytest.fixture
async def reporters(
    servers: Callable[..., Awaitable[MetricsServer]],
) -> AsyncIterator[list[LoadReporter]]:
    """Reporters appended here are stopped before the servers (this fixture depends on theirs)."""
    made: list[LoadReporter] = []
    yield made
    for reporter in made:
        await reporter.stop()


def run_reporter(
    reporters: list[LoadReporter],
    backends: list[Backend],
    clock: Callable[[], float] | None = None,
    **config: Any,
) -> LoadReporter:
    reporter = LoadReporter(
        "p",
        backends,
        LoadReport(**{**FAST, **config}),
        clock=clock or FakeClock(),
        rng=random.Random(1),
    )
    reporters.append(reporter)
    reporter.start()
    return reporter


async def test_scraped_values_land_on_the_backend(
    servers: Callable[..., Awaitable[MetricsServer]], reporters: list[LoadReporter]
) -> None:
    """A vLLM page's queue, batch and KV usage are written to the backend, stamped by the clock."""
    server = await servers(body=vllm_text(waiting=4, running=9, kv=0.5))
    backend = Backend.from_url(server.url)
    clock = FakeClock(500.0)
    reporter = run_reporter(reporters, [backend], clock)
    await wait_until(lambda: backend.reported_at_s == 500.0, "a first report")
    assert (backend.reported_waiting, backend.reported_running) == (4.0, 9.0)
    assert backend.reported_kv_usage == 0.5
    server.body = vllm_text(waiting=0, running=2, kv=0.125)
    clock.now_s = 501.0
    await wait_until(lambda: backend.reported_waiting == 0.0, "the new values")
    assert (backend.reported_running, backend.reported_kv_usage) == (2.0, 0.125)
    assert backend.reported_at_s == 501.0
    stats = reporter.stats(backend)
    assert stats.ok_total >= 2 and stats.failed_total == 0
    assert stats.last_duration_s > 0 and stats.last_error == "" and stats.missing == ()


async def test_scrapes_get_the_path_uncompressed_over_one_keep_alive_connection(
    servers: Callable[..., Awaitable[MetricsServer]], reporters: list[LoadReporter]
) -> None:
    """Every scrape is a GET of config.path asking for identity encoding, on one connection."""
    server = await servers(body=TGI)
    run_reporter(reporters, [Backend.from_url(server.url)], preset="tgi", path="/stats")
    await wait_until(lambda: server.scrapes >= 5, "scrapes")
    assert set(server.paths) == {"/stats"}
    assert {h.get("Accept-Encoding") for h in server.headers} == {"identity"}
    assert {h.get("User-Agent") for h in server.headers} == {"lb-load-report"}
    assert len(server.peers) == 1


async def test_a_server_that_starts_failing_leaves_its_report_to_go_stale(
    servers: Callable[..., Awaitable[MetricsServer]],
    reporters: list[LoadReporter],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """After 500s, the last values stay but reported_at_s is no longer refreshed; the failure
    is logged once at warning, the recovery at info."""
    caplog.set_level(logging.INFO, logger="lb.load_report")
    server = await servers(body=vllm_text(waiting=2, running=1, kv=0.25))
    backend = Backend.from_url(server.url, name="b0")
    clock = FakeClock(500.0)
    reporter = run_reporter(reporters, [backend], clock)
    await wait_until(lambda: backend.reported_at_s == 500.0, "a first report")
    server.status = 500
    await wait_until(lambda: reporter.stats(backend).failed_total >= 1, "a failed scrape")
    clock.now_s = 510.0
    await wait_until(lambda: reporter.stats(backend).failed_total >= 5, "more failed scrapes")
    assert backend.reported_at_s == 500.0
    assert (backend.reported_waiting, backend.reported_kv_usage) == (2.0, 0.25)
    assert reporter.stats(backend).last_error == "status 500"
    failures = [r for r in caplog.records if "scrape failed" in r.getMessage()]
    assert [r.levelno for r in failures] == [logging.WARNING]
    server.status = 200
    await wait_until(lambda: backend.reported_at_s == 510.0, "a fresh report again")
    assert any("succeed again" in r.getMessage() for r in caplog.records)


async def test_a_server_that_goes_away_leaves_its_report_to_go_stale(
    servers: Callable[..., Awaitable[MetricsServer]], reporters: list[LoadReporter]
) -> None:
    """A refused connection is a failed scrape: no refresh of reported_at_s."""
    server = await servers(body=vllm_text(waiting=1, running=1, kv=0.5))
    backend = Backend.from_url(server.url)
    clock = FakeClock(500.0)
    reporter = run_reporter(reporters, [backend], clock)
    await wait_until(lambda: backend.reported_at_s == 500.0, "a first report")
    await server.stop()
    clock.now_s = 520.0
    await wait_until(
        lambda: reporter.stats(backend).last_error == "connection refused", "a refused scrape"
    )
    assert backend.reported_at_s == 500.0


async def test_a_scrape_slower_than_timeout_s_fails(
    servers: Callable[..., Awaitable[MetricsServer]], reporters: list[LoadReporter]
) -> None:
    """A hanging server makes the scrape time out; no report is written."""
    server = await servers(hang=True)
    backend = Backend.from_url(server.url)
    reporter = run_reporter(reporters, [backend], timeout_s=0.05)
    await wait_until(lambda: reporter.stats(backend).failed_total >= 1, "a timed-out scrape")
    assert reporter.stats(backend).last_error == "timeout after 0.05s"
    assert backend.reported_waiting is None and backend.reported_at_s == 0.0


async def test_a_missing_preset_metric_is_logged_once_and_leaves_its_field_unknown(
    servers: Callable[..., Awaitable[MetricsServer]],
    reporters: list[LoadReporter],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A vLLM page without any KV gauge: kv_usage is None, and one warning says so."""
    caplog.set_level(logging.WARNING, logger="lb.load_report")
    no_kv = "\n".join(line for line in VLLM_V1.splitlines() if "kv_cache" not in line) + "\n"
    server = await servers(body=no_kv)
    backend = Backend.from_url(server.url, name="b0")
    backend.reported_kv_usage = 0.9  # a value from before: the successful scrape clears it
    reporter = run_reporter(reporters, [backend])
    await wait_until(lambda: reporter.stats(backend).ok_total >= 6, "several scrapes")
    assert backend.reported_waiting == 3.0 and backend.reported_kv_usage is None
    assert reporter.stats(backend).missing == ("kv_usage",)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "backend=b0" in message
    assert "vllm:kv_cache_usage_perc or vllm:gpu_cache_usage_perc" in message


async def test_old_vllm_kv_name_is_used_when_the_new_one_is_absent(
    servers: Callable[..., Awaitable[MetricsServer]],
    reporters: list[LoadReporter],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A pre-V1 vLLM reports KV usage as gpu_cache_usage_perc, which is read without warning."""
    caplog.set_level(logging.WARNING, logger="lb.load_report")
    server = await servers(body=VLLM_V0)
    backend = Backend.from_url(server.url)
    reporter = run_reporter(reporters, [backend])
    await wait_until(lambda: reporter.stats(backend).ok_total >= 3, "scrapes")
    assert (backend.reported_waiting, backend.reported_running) == (0.0, 2.0)
    assert backend.reported_kv_usage == 0.0625
    assert caplog.records == []


async def test_sglang_kv_usage_is_the_mean_of_its_series(
    servers: Callable[..., Awaitable[MetricsServer]], reporters: list[LoadReporter]
) -> None:
    """Counts are summed over series, the KV fraction averaged (0.5 and 0.25 give 0.375)."""
    server = await servers(body=SGLANG)
    backend = Backend.from_url(server.url)
    run_reporter(reporters, [backend], preset="sglang")
    await wait_until(lambda: backend.reported_at_s > 0, "a report")
    assert (backend.reported_waiting, backend.reported_running) == (6.0, 16.0)
    assert backend.reported_kv_usage == 0.375


async def test_a_percentage_is_scaled_to_a_fraction(
    servers: Callable[..., Awaitable[MetricsServer]], reporters: list[LoadReporter]
) -> None:
    """With kv_usage_scale 0.01, a custom gauge reading 42 (percent) becomes 0.42."""
    server = await servers(body="# TYPE kv_pct gauge\nkv_pct 42\nqueue_len 3\n")
    backend = Backend.from_url(server.url)
    run_reporter(
        reporters,
        [backend],
        preset="custom",
        metrics={"waiting": "queue_len", "kv_usage": "kv_pct"},
        kv_usage_scale=0.01,
    )
    await wait_until(lambda: backend.reported_at_s > 0, "a report")
    assert backend.reported_waiting == 3.0 and backend.reported_running is None
    assert backend.reported_kv_usage is not None
    assert math.isclose(backend.reported_kv_usage, 0.42)


async def test_a_negative_gauge_is_taken_as_unknown_and_logged_once(
    servers: Callable[..., Awaitable[MetricsServer]],
    reporters: list[LoadReporter],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A queue of -1 is no load a server can have: read as unknown (which least_loaded
    scores as loaded, not as emptier than idle), with one warning."""
    caplog.set_level(logging.WARNING, logger="lb.load_report")
    page = VLLM_V1.replace("vllm:num_requests_waiting{", "vllm:num_requests_waiting_x{")
    page += "vllm:num_requests_waiting -1\n"
    server = await servers(body=page)
    backend = Backend.from_url(server.url, name="b0")
    reporter = run_reporter(reporters, [backend])
    await wait_until(lambda: reporter.stats(backend).ok_total >= 4, "several scrapes")
    assert backend.reported_waiting is None
    assert backend.reported_running is not None and backend.reported_running >= 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "waiting reads -1, below 0" in warnings[0]


async def test_stop_leaves_no_tasks_and_is_idempotent(
    servers: Callable[..., Awaitable[MetricsServer]],
) -> None:
    """After stop() no scrape task is left, and scrapes cease."""
    server = await servers()
    backends = [Backend.from_url(server.url, name=f"b{i}") for i in range(3)]
    reporter = LoadReporter("p", backends, LoadReport(**FAST))
    reporter.start()
    await wait_until(lambda: server.scrapes >= 6, "scrapes")
    await reporter.stop()
    await reporter.stop()
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("load-report:")]
    seen = server.scrapes
    await asyncio.sleep(0.1)
    assert server.scrapes == seen


async def test_a_disabled_reporter_scrapes_nothing(
    servers: Callable[..., Awaitable[MetricsServer]], reporters: list[LoadReporter]
) -> None:
    """With enabled false, start() runs no task and the fields stay untouched."""
    server = await servers()
    backend = Backend.from_url(server.url)
    run_reporter(reporters, [backend], enabled=False)
    await asyncio.sleep(0.1)
    assert server.scrapes == 0 and backend.reported_at_s == 0.0


async def test_a_reloaded_reporter_keeps_the_counters_of_backends_that_stay(
    servers: Callable[..., Awaitable[MetricsServer]], reporters: list[LoadReporter]
) -> None:
    """``previous`` carries scrape counters over, so they never go backwards."""
    server = await servers()
    backend = Backend.from_url(server.url)
    old = run_reporter(reporters, [backend])
    await wait_until(lambda: old.stats(backend).ok_total >= 2, "scrapes")
    await old.stop()
    counted = old.stats(backend).ok_total
    new = LoadReporter("p", [backend], LoadReport(**FAST), previous=old)
    reporters.append(new)
    assert new.stats(backend).ok_total == counted
    new.start()
    await wait_until(lambda: new.stats(backend).ok_total > counted, "more scrapes")


async def test_start_twice_is_an_error(reporters: list[LoadReporter]) -> None:
    """A reporter is started once."""
    reporter = LoadReporter("p", [], LoadReport(**FAST))
    reporters.append(reporter)
    reporter.start()
    with pytest.raises(RuntimeError):
        reporter.start()
