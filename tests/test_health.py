"""Active health checks: the rise/fall counter, and probes against real servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from lb.backend import Backend
from lb.config_resilience import HealthCheck
from lb.health import HealthChecker, HealthState, next_probe_delay_s
from lb.logs import JsonFormatter

# Small intervals keep the suite fast; every wait below is bounded by WAIT_S.
FAST: dict[str, Any] = {"interval_s": 0.05, "transition_interval_s": 0.02, "timeout_s": 0.2}
WAIT_S = 3.0


async def wait_until(condition: Callable[[], bool], what: str) -> None:
    """Poll ``condition`` until it holds; fail the test after ``WAIT_S``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


# -- HealthState: pure --------------------------------------------------------------------------


def test_a_healthy_backend_falls_after_unhealthy_threshold_failures() -> None:
    """Failures flip a healthy state on the threshold-th one, and only then."""
    state = HealthState(True, healthy_threshold=2, unhealthy_threshold=3)
    assert [state.record(False) for _ in range(5)] == [False, False, True, False, False]
    assert state.healthy is False


def test_a_pass_resets_the_failure_streak() -> None:
    """Failures must be consecutive: one pass in between starts the count again."""
    state = HealthState(True, healthy_threshold=2, unhealthy_threshold=3)
    for passed in (False, False, True, False, False):
        assert state.record(passed) is False
    assert state.healthy is True
    assert state.record(False) is True


def test_an_unhealthy_backend_rises_after_healthy_threshold_passes() -> None:
    """After a fall, coming back takes ``healthy_threshold`` passes in a row."""
    state = HealthState(True, healthy_threshold=3, unhealthy_threshold=1)
    assert state.record(False) is True
    assert [state.record(True) for _ in range(4)] == [False, False, True, False]
    assert state.healthy is True


def test_a_backend_created_unhealthy_rises_on_its_first_pass() -> None:
    """Waiting for the first pass: one pass is enough, even after failures."""
    state = HealthState(False, healthy_threshold=3, unhealthy_threshold=2)
    assert state.record(False) is False
    assert state.record(True) is True
    assert state.healthy is True


def test_the_first_pass_rule_applies_only_until_the_first_rise() -> None:
    """Once a backend created unhealthy has come in, a later rise needs the full threshold."""
    state = HealthState(False, healthy_threshold=3, unhealthy_threshold=1)
    assert state.record(True) is True
    assert state.record(False) is True
    assert [state.record(True) for _ in range(3)] == [False, False, True]


def test_transitioning_is_true_only_while_a_streak_is_under_way() -> None:
    """The flag is set by the first disagreeing result and cleared by the flip or a reset."""
    state = HealthState(True, healthy_threshold=2, unhealthy_threshold=3)
    assert state.transitioning is False
    state.record(False)
    assert state.transitioning is True
    state.record(True)
    assert state.transitioning is False
    state.record(False)
    state.record(False)
    assert state.transitioning is True
    state.record(False)  # the flip
    assert state.transitioning is False
    state.record(True)
    assert state.transitioning is True


def test_thresholds_below_one_are_refused() -> None:
    """A threshold of 0 is a configuration error."""
    with pytest.raises(ValueError):
        HealthState(True, healthy_threshold=0, unhealthy_threshold=1)


def test_probe_delays_are_jittered_and_shorter_while_transitioning() -> None:
    """Delays spread by jitter_percent around interval_s, or transition_interval_s."""
    config = HealthCheck(interval_s=10.0, transition_interval_s=1.0, jitter_percent=20)
    rng = random.Random(7)
    steady = HealthState(True, healthy_threshold=2, unhealthy_threshold=3)
    delays = [next_probe_delay_s(config, steady, rng) for _ in range(1000)]
    assert 8.0 <= min(delays) < 8.2 and 11.8 < max(delays) <= 12.0
    assert 9.8 < sum(delays) / len(delays) < 10.2
    steady.record(False)  # transitioning
    assert all(0.8 <= next_probe_delay_s(config, steady, rng) <= 1.2 for _ in range(100))
    down = HealthState(False, healthy_threshold=2, unhealthy_threshold=3)
    assert all(0.8 <= next_probe_delay_s(config, down, rng) <= 1.2 for _ in range(100))


# -- HealthChecker: real servers ----------------------------------------------------------------


@dataclass
class ProbedServer:
    """An aiohttp server whose /health answer the test switches, counting what it sees."""

    status: int = 200
    hang: bool = False  # when set, requests wait for `release`
    probes: int = 0
    paths: list[str] = field(default_factory=list)
    user_agents: list[str | None] = field(default_factory=list)
    peers: set[Any] = field(default_factory=set)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    runner: web.AppRunner | None = None
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, port: int = 0) -> None:
        """Listen on ``port`` (0: an ephemeral one, remembered for a restart)."""
        app = web.Application()
        app[SERVER] = self
        app.router.add_route("*", "/{tail:.*}", _handle)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", port).start()
        self.port = self.runner.addresses[0][1]

    async def stop(self) -> None:
        """Close the listener and every connection; the port is then refused."""
        self.release.set()
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
        self.release = asyncio.Event()


SERVER = web.AppKey("server", ProbedServer)


async def _handle(request: web.Request) -> web.StreamResponse:
    s = request.app[SERVER]
    s.probes += 1
    s.paths.append(request.path)
    s.user_agents.append(request.headers.get("User-Agent"))
    assert request.transport is not None
    s.peers.add(request.transport.get_extra_info("peername"))
    if request.path != "/health":
        return web.Response(text="not the health endpoint")
    if s.hang:
        await s.release.wait()
    if 300 <= s.status < 400:
        # A redirect to a page that answers 200: the probe must not follow it.
        return web.Response(status=s.status, headers={"Location": "/elsewhere"})
    return web.Response(status=s.status, text="ok" if s.status < 300 else "")


class Recorder:
    """A listener that records what it is told, and how many probes the server had seen."""

    def __init__(self, servers: dict[str, ProbedServer] | None = None) -> None:
        self.servers = servers or {}
        self.changes: list[tuple[str, bool]] = []
        self.probes_at_change: list[int] = []
        self.flag_at_change: list[bool] = []  # backend.healthy as the listener saw it
        self.passes: dict[str, int] = {}

    def health_changed(self, backend: Backend, healthy: bool) -> None:
        self.changes.append((backend.name, healthy))
        self.flag_at_change.append(backend.healthy)
        server = self.servers.get(backend.name)
        self.probes_at_change.append(server.probes if server else -1)

    def health_probe_passed(self, backend: Backend) -> None:
        self.passes[backend.name] = self.passes.get(backend.name, 0) + 1


@pytest.fixture
async def servers() -> AsyncIterator[Callable[..., Awaitable[ProbedServer]]]:
    """Factory: ``await servers(status=...)`` starts a probed server, stopped at the end."""
    started: list[ProbedServer] = []

    async def start(**kwargs: Any) -> ProbedServer:
        server = ProbedServer(**kwargs)
        await server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        await server.stop()


@pytest.fixture
async def checkers(
    servers: Callable[..., Awaitable[ProbedServer]],
) -> AsyncIterator[list[HealthChecker]]:
    """Checkers appended here are stopped before the servers (this fixture depends on theirs)."""
    made: list[HealthChecker] = []
    yield made
    for checker in made:
        await checker.stop()


def run_checker(
    checkers: list[HealthChecker],
    backends: list[Backend],
    listener: Recorder,
    **config: Any,
) -> HealthChecker:
    checker = HealthChecker(
        "p", backends, HealthCheck(**{**FAST, **config}), listener, rng=random.Random(1)
    )
    checkers.append(checker)
    checker.start()
    return checker


async def test_a_backend_answering_503_is_marked_unhealthy_after_unhealthy_threshold_probes(
    servers: Callable[..., Awaitable[ProbedServer]], checkers: list[HealthChecker]
) -> None:
    """Three 503s in a row take the backend out, and the listener hears it exactly once."""
    server = await servers(status=503)
    backend = Backend.from_url(server.url, name="b0")
    rec = Recorder({"b0": server})
    run_checker(checkers, [backend], rec, unhealthy_threshold=3)
    await wait_until(lambda: bool(rec.changes), "the backend to go down")
    assert rec.changes == [("b0", False)]
    assert rec.probes_at_change == [3]
    assert rec.flag_at_change == [False]  # the flag is set before the listener is told
    assert backend.healthy is False
    await wait_until(lambda: server.probes >= 8, "more probes")
    assert rec.changes == [("b0", False)]
    assert rec.passes == {}


async def test_an_unhealthy_backend_comes_back_after_healthy_threshold_passes(
    servers: Callable[..., Awaitable[ProbedServer]], checkers: list[HealthChecker]
) -> None:
    """Once it answers 200 again, two passes bring it back, reported once."""
    server = await servers(status=503)
    backend = Backend.from_url(server.url, name="b0")
    rec = Recorder({"b0": server})
    run_checker(checkers, [backend], rec, unhealthy_threshold=2, healthy_threshold=2)
    await wait_until(lambda: bool(rec.changes), "the backend to go down")
    server.status = 200
    probes_before = server.probes
    await wait_until(lambda: len(rec.changes) == 2, "the backend to come back")
    assert rec.changes == [("b0", False), ("b0", True)]
    assert rec.probes_at_change[1] - probes_before == 2
    assert rec.flag_at_change == [False, True]
    assert backend.healthy is True
    await wait_until(lambda: rec.passes["b0"] >= 5, "more passing probes")
    assert len(rec.changes) == 2


async def test_a_backend_that_starts_unhealthy_comes_in_on_its_first_passing_probe(
    servers: Callable[..., Awaitable[ProbedServer]], checkers: list[HealthChecker]
) -> None:
    """With initial_state unhealthy, the first 200 is enough, whatever healthy_threshold is."""
    server = await servers(status=200)
    backend = Backend.from_url(server.url, name="b0")
    backend.healthy = False  # what the pool does for initial_state: unhealthy
    rec = Recorder({"b0": server})
    run_checker(checkers, [backend], rec, healthy_threshold=5, initial_state="unhealthy")
    await wait_until(lambda: bool(rec.changes), "the backend to come in")
    assert rec.changes == [("b0", True)]
    assert rec.probes_at_change == [1]


async def test_every_passing_probe_is_reported(
    servers: Callable[..., Awaitable[ProbedServer]], checkers: list[HealthChecker]
) -> None:
    """health_probe_passed is called once per passing probe, with no change to report."""
    server = await servers(status=200)
    backend = Backend.from_url(server.url, name="b0")
    rec = Recorder()
    checker = run_checker(checkers, [backend], rec)
    await wait_until(lambda: rec.passes.get("b0", 0) >= 4, "passing probes")
    assert rec.passes["b0"] == checker.stats(backend).passed_total
    assert checker.stats(backend).failed_total == 0
    assert checker.stats(backend).last_reason == "status 200"
    assert rec.changes == []


async def test_probes_get_the_configured_path_with_the_health_check_user_agent(
    servers: Callable[..., Awaitable[ProbedServer]], checkers: list[HealthChecker]
) -> None:
    """The probe is a GET of config.path, sent with User-Agent: lb-health-check."""
    server = await servers(status=200)
    rec = Recorder()
    run_checker(checkers, [Backend.from_url(server.url)], rec, path="/health")
    await wait_until(lambda: server.probes >= 2, "probes")
    assert set(server.paths) == {"/health"}
    assert set(server.user_agents) == {"lb-health-check"}


async def test_probes_reuse_one_keep_alive_connection(
    servers: Callable[..., Awaitable[ProbedServer]], checkers: list[HealthChecker]
) -> None:
    """Successive probes of a backend arrive on the same connection."""
    server = await servers(status=200)
    run_checker(checkers, [Backend.from_url(server.url)], Recorder())
    await wait_until(lambda: server.probes >= 5, "probes")
    assert len(server.peers) == 1


async def test_tcp_checks_detect_a_closed_port_and_its_reopening(
    servers: Callable[..., Awaitable[ProbedServer]], checkers: list[HealthChecker]
) -> None:
    """A refused connection takes the backend out; a listener on the same port brings it back."""
    server = await servers()
    backend = Backend.from_url(server.url, name="b0")
    rec = Recorder()
    checker = run_checker(
        checkers, [backend], rec, type="tcp", unhealthy_threshold=2, healthy_threshold=2
    )
    await wait_until(lambda: rec.passes.get("b0", 0) >= 2, "tcp probes to pass")
    assert server.probes == 0  # a tcp check sends no request
    port = server.port
    await server.stop()
    await wait_until(lambda: bool(rec.changes), "the backend to go down")
    assert rec.changes == [("b0", False)]
    assert checker.stats(backend).last_reason == "connection refused"
    await server.start(port)
    await wait_until(lambda: len(rec.changes) == 2, "the backend to come back")
    assert rec.changes == [("b0", False), ("b0", True)]


async def test_expected_statuses_ranges_decide_what_passes(
    servers: Callable[..., Awaitable[ProbedServer]], checkers: list[HealthChecker]
) -> None:
    """With ["200-204"], 204 passes and 301 fails (the redirect is not followed)."""
    no_content = await servers(status=204)
    moved = await servers(status=301)
    a = Backend.from_url(no_content.url, name="a")
    b = Backend.from_url(moved.url, name="b")
    rec = Recorder()
    checker = run_checker(checkers, [a, b], rec, expected_statuses=["200-204"])
    await wait_until(lambda: bool(rec.changes), "the 301 backend to go down")
    await wait_until(lambda: rec.passes.get("a", 0) >= 3, "the 204 backend to pass")
    assert rec.changes == [("b", False)]
    assert "b" not in rec.passes
    assert checker.stats(b).last_reason == "status 301"
    assert set(moved.paths) == {"/health"}  # never /elsewhere


async def test_a_hanging_health_endpoint_fails_by_timeout(
    servers: Callable[..., Awaitable[ProbedServer]],
    checkers: list[HealthChecker],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A /health that never answers fails after timeout_s, and the flip says so."""
    server = await servers(hang=True)
    backend = Backend.from_url(server.url, name="b0")
    rec = Recorder()
    with caplog.at_level(logging.INFO, logger="lb.health"):
        checker = run_checker(checkers, [backend], rec, unhealthy_threshold=1)
        await wait_until(lambda: bool(rec.changes), "the backend to go down")
    assert rec.changes == [("b0", False)]
    assert checker.stats(backend).last_reason == "timeout after 0.2s"
    assert [r.getMessage() for r in caplog.records] == [
        "health: pool=p backend=b0 is now unhealthy (timeout after 0.2s)"
    ]


async def test_a_flip_is_logged_once_at_warning_going_down_and_info_coming_back(
    servers: Callable[..., Awaitable[ProbedServer]],
    checkers: list[HealthChecker],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Probes are not logged; each transition is, once, with its reason."""
    server = await servers(status=503)
    rec = Recorder()
    with caplog.at_level(logging.INFO, logger="lb.health"):
        run_checker(checkers, [Backend.from_url(server.url, name="b0")], rec)
        await wait_until(lambda: bool(rec.changes), "the backend to go down")
        server.status = 200
        await wait_until(lambda: rec.passes.get("b0", 0) >= 4, "it to come back and stay")
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.WARNING, "health: pool=p backend=b0 is now unhealthy (status 503)"),
        (logging.INFO, "health: pool=p backend=b0 is now healthy (status 200)"),
    ]
    # The same facts as fields, for a log pipeline to filter on (JsonFormatter writes them).
    fields = [json.loads(JsonFormatter().format(r)) for r in caplog.records]
    assert [
        {k: f[k] for k in ("event", "pool", "backend", "state", "reason")} for f in fields
    ] == [
        {"event": "health_changed", "pool": "p", "backend": "b0", "state": "unhealthy",
         "reason": "status 503"},
        {"event": "health_changed", "pool": "p", "backend": "b0", "state": "healthy",
         "reason": "status 200"},
    ]  # fmt: skip


async def test_a_failing_listener_does_not_stop_the_probes(
    servers: Callable[..., Awaitable[ProbedServer]],
    checkers: list[HealthChecker],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An exception in the listener is logged and the next probe still comes."""

    class Broken(Recorder):
        def health_probe_passed(self, backend: Backend) -> None:
            raise RuntimeError("listener bug")

    server = await servers(status=200)
    with caplog.at_level(logging.ERROR, logger="lb.health"):
        run_checker(checkers, [Backend.from_url(server.url)], Broken())
        await wait_until(lambda: server.probes >= 3, "probes after the listener failed")
    assert len(caplog.records) >= 2
    assert all(r.exc_info and r.exc_info[0] is RuntimeError for r in caplog.records)


async def test_a_disabled_checker_sends_no_probes(
    servers: Callable[..., Awaitable[ProbedServer]], checkers: list[HealthChecker]
) -> None:
    """With enabled: false, start() starts nothing."""
    server = await servers(status=503)
    backend = Backend.from_url(server.url)
    run_checker(checkers, [backend], Recorder(), enabled=False)
    await asyncio.sleep(0.2)
    assert server.probes == 0
    assert backend.healthy is True


def _health_tasks() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("health:")]


async def test_stop_ends_every_task_even_during_a_probe(
    servers: Callable[..., Awaitable[ProbedServer]], checkers: list[HealthChecker]
) -> None:
    """stop() cancels probes in flight and sleeping tasks alike, and can be called again."""
    hanging = await servers(hang=True)
    quick = [await servers(status=200) for _ in range(2)]
    backends = [Backend.from_url(s.url) for s in [hanging, *quick]]
    checker = run_checker(checkers, backends, Recorder(), timeout_s=30.0)
    assert len(_health_tasks()) == 3
    await wait_until(lambda: hanging.probes >= 1 and all(s.probes >= 2 for s in quick), "probes")
    await checker.stop()
    assert _health_tasks() == []
    await checker.stop()
    probes = [s.probes for s in [hanging, *quick]]
    await asyncio.sleep(0.1)
    assert [s.probes for s in [hanging, *quick]] == probes
