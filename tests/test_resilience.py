"""Resilience under load: backends that die, fail, hang, cut streams or fill up, and a proxy
that is reloaded or stopped, all while a bounded concurrent load runs through it.

The backends are the simulated model servers (:mod:`backends.sim`), in-process or as real
processes; the proxy is in-process unless the scenario needs a real process (signals). Each
test asserts what the clients saw and prints one line for the record::

    SCENARIO <name>: sent=<n> succeeded=<n> failed=<n> retried=<n>
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from backends.sim import SimServer, start_sim
from lb.app import App
from lb.pool import Pool
from tests import conftest
from tests.conftest import free_port, pool, proxy_config, url
from tests.resilience_load import (
    WAIT_S,
    Load,
    LoadResult,
    Outcome,
    chat,
    chat_body,
    read_raw,
    retries_in,
    samples,
    scrape,
    send_raw,
    summary,
    wait_until,
)

CHAT = "/v1/chat/completions"
# Fast simulated servers: a request of `max_tokens` tokens takes about that many milliseconds.
FAST: dict[str, Any] = {"decode_ms": 1, "ttft_ms": 1, "max_batch": 64}
FAST_FLAGS = ("--decode-ms", "1", "--ttft-ms", "1", "--max-batch", "64")
# Steady timing for the admission tests: 5 ms a token whatever the batch holds.
STEADY: dict[str, Any] = {"decode_ms": 5, "ttft_ms": 1, "max_batch": 64, "batch_slowdown": 0.0}
NO_HEALTH_CHECKS = {"enabled": False}
START_TIMEOUT_S = 15.0

SimFactory = Callable[..., Awaitable[list[SimServer]]]


def report(name: str, result: LoadResult, retried: int | None) -> None:
    print(summary(name, result, retried), flush=True)


async def retried(app: App) -> int | None:
    assert app.proxy is not None
    return retries_in(await scrape(app.admin_port), app.proxy.pools.values())


def chat_count(sim: SimServer) -> int:
    """Chat completions ``sim`` received (health probes and operations not counted)."""
    return sim.requests_by_path[CHAT]


def proxy_pool(app: App, name: str = "chat") -> Pool:
    assert app.proxy is not None
    return app.proxy.pools[name]


@pytest.fixture
async def sims() -> AsyncIterator[SimFactory]:
    """Factory: ``await sims(n, **knobs)`` starts ``n`` in-process simulated servers."""
    started: list[SimServer] = []

    async def start(n: int, **knobs: Any) -> list[SimServer]:
        out = [await start_sim(**{**FAST, **knobs}) for _ in range(n)]
        started.extend(out)
        return out

    yield start
    for sim in started:
        sim.faults.hang = False  # let held requests go, so closing does not wait on them
        await sim.close()


class SimProcess:
    """``python -m backends.sim`` on one fixed port, as a real process that can be killed."""

    def __init__(self, port: int, log: Path) -> None:
        self.port = port
        self.log = log
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def name(self) -> str:
        return f"sim-{self.port}"

    async def start(self) -> None:
        """Start the process and return once it says it listens."""
        with open(self.log, "ab") as log:  # noqa: ASYNC230  # a tiny local file, opened once
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "backends.sim", "--port", str(self.port), *FAST_FLAGS,
                stdout=asyncio.subprocess.PIPE, stderr=log,
            )  # fmt: skip
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), START_TIMEOUT_S)
        assert b"listening" in line, f"sim on {self.port} did not start: {line!r}"

    async def kill(self) -> None:
        """SIGKILL: no goodbye to open connections."""
        assert self.proc is not None
        self.proc.kill()
        await asyncio.wait_for(self.proc.wait(), WAIT_S)

    async def chat_count(self) -> int:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{self.url}/sim/stats") as resp,
        ):
            stats = await resp.json()
        return int(stats["requests_by_path"].get(CHAT, 0))


@pytest.fixture
async def sim_processes(
    tmp_path: Path,
) -> AsyncIterator[Callable[[int], Awaitable[list[SimProcess]]]]:
    """Factory: ``await sim_processes(n)`` starts ``n`` simulated servers as processes."""
    started: list[SimProcess] = []

    async def start(n: int) -> list[SimProcess]:
        out = []
        for _ in range(n):
            sim = SimProcess(free_port(), tmp_path / "sims.log")
            started.append(sim)
            await sim.start()
            out.append(sim)
        return out

    yield start
    for sim in started:
        if sim.proc is not None and sim.proc.returncode is None:
            sim.proc.kill()
            await asyncio.wait_for(sim.proc.wait(), WAIT_S)


class ProxyProcess:
    """``python -m lb`` on a YAML file in ``tmp_path``, its output in ``proxy.log``."""

    def __init__(self, tmp_path: Path, config: dict[str, Any]) -> None:
        self.config = config
        self.path = tmp_path / "config.yaml"
        self.log = tmp_path / "proxy.log"
        self.proc: asyncio.subprocess.Process | None = None
        self.write(config)

    @property
    def port(self) -> int:
        return int(self.config["listen"]["port"])

    @property
    def admin_port(self) -> int:
        return int(self.config["admin"]["port"])

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def write(self, config: dict[str, Any] | str) -> None:
        text = config if isinstance(config, str) else yaml.safe_dump(config)
        self.path.write_text(text)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    async def start(self) -> None:
        with open(self.log, "ab") as log:  # noqa: ASYNC230  # a tiny local file, opened once
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "lb", "--config", str(self.path), stdout=log, stderr=log
            )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT_S
        while True:
            assert self.proc.returncode is None, f"the proxy exited: {self.log_text()}"
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.admin_port)
            except OSError:
                assert loop.time() < deadline, "the proxy did not start listening"
                await asyncio.sleep(0.05)
                continue
            writer.close()
            return

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)


@pytest.fixture
async def proxy_process(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[ProxyProcess]]]:
    """Factory: ``await proxy_process(config_dict)`` runs the proxy as a real process."""
    started: list[ProxyProcess] = []

    async def start(config: dict[str, Any]) -> ProxyProcess:
        proxy = ProxyProcess(tmp_path, config)
        started.append(proxy)
        await proxy.start()
        return proxy

    yield start
    for proxy in started:
        if proxy.proc is not None and proxy.proc.returncode is None:
            proxy.proc.kill()
            await asyncio.wait_for(proxy.proc.wait(), WAIT_S)


def chat_load(
    session: aiohttp.ClientSession,
    base_url: str,
    *,
    concurrency: int = 8,
    max_requests: int = 300,
    max_tokens: int = 8,
) -> Load:
    async def send(index: int) -> Outcome:
        return await chat(session, base_url, max_tokens)

    return Load(send, concurrency=concurrency, max_requests=max_requests)


# -- a backend that dies --------------------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_a_backend_process_killed_mid_run_costs_no_request_and_serves_after_restart(
    sim_processes: Callable[[int], Awaitable[list[SimProcess]]],
    start_proxy: Callable[[dict[str, Any]], Awaitable[App]],
) -> None:
    """SIGKILL of one of three backends under load fails no request, and once restarted on
    the same port it gets traffic again."""
    procs = await sim_processes(3)
    victim = procs[1]
    health = {
        "interval_s": 0.2,
        "timeout_s": 0.2,
        "unhealthy_threshold": 2,
        "healthy_threshold": 1,
        "transition_interval_s": 0.1,
    }
    app = await start_proxy(proxy_config([pool("chat", procs, health_check=health)]))
    backend = next(b for b in proxy_pool(app).backends if b.name == victim.name)
    async with aiohttp.ClientSession() as session:
        load = chat_load(session, url(app).rstrip("/"), concurrency=12, max_requests=5000).start()
        await load.wait_done(150)
        await victim.kill()
        await wait_until(lambda: not backend.healthy, "the health check to notice the kill")
        await load.wait_done(load.done + 100)
        await victim.start()
        await wait_until(lambda: backend.healthy, "the health check to see the backend back")
        for _ in range(200):  # bounded: up to 10 s
            if await victim.chat_count() >= 20:
                break
            await asyncio.sleep(0.05)
        served_after_restart = await victim.chat_count()
        result = await load.stop()
    report("backend-killed-then-restarted", result, await retried(app))
    assert result.failed == 0, result.failures
    assert served_after_restart >= 20


# -- a backend that fails everything ---------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_a_backend_answering_503_to_everything_is_ejected_and_comes_back(
    sims: SimFactory, start_proxy: Callable[[dict[str, Any]], Awaitable[App]]
) -> None:
    """A backend failing every request is ejected after a few tries (retries hide its 503s
    from clients), and serves again once fixed and its ejection has run out."""
    good = await sims(2)
    (bad,) = await sims(1, error_rate=1.0, error_status=503)
    outliers = {"consecutive_failures": 3, "base_ejection_s": 0.5}
    config = proxy_config(
        [
            pool(
                "chat",
                [good[0], bad, good[1]],
                health_check=NO_HEALTH_CHECKS,
                outlier_detection=outliers,
            )
        ]
    )
    app = await start_proxy(config)
    the_pool = proxy_pool(app)
    backend = next(b for b in the_pool.backends if b.name == bad.name)
    concurrency = 8
    async with aiohttp.ClientSession() as session:
        base = url(app).rstrip("/")
        during = await chat_load(session, base, concurrency=concurrency, max_requests=900).run()
        bad_hits = chat_count(bad)
        ejections = backend.ejections_total
        async with session.post(f"{bad.url}/sim/faults", json={"error_rate": 0.0}) as resp:
            assert resp.status == 200
        await wait_until(
            lambda: backend.ejected_until_s <= the_pool.clock() and backend.available,
            "the ejection to run out",
        )
        after = await chat_load(session, base, concurrency=concurrency, max_requests=90).run()
    report("503-backend-ejected-and-back", during + after, await retried(app))
    assert during.failed == 0, during.failures
    assert ejections >= 1
    # Each ejection window lets through the failures that trip it, plus those in flight.
    assert bad_hits <= (ejections + 1) * (outliers["consecutive_failures"] + concurrency)
    assert after.failed == 0, after.failures
    assert after.served_by()[bad.name] > 0


@pytest.mark.timeout(60)
async def test_a_pool_mostly_unhealthy_panics_and_spreads_requests_over_every_backend(
    sims: SimFactory, start_proxy: Callable[[dict[str, Any]], Awaitable[App]]
) -> None:
    """With three of four backends failing health checks (below the 50% panic threshold),
    the pool balances over all four instead of piling everything on the last one."""
    (healthy,) = await sims(1)
    sick = await sims(3, unhealthy=True)
    health = {
        "interval_s": 0.1,
        "timeout_s": 0.2,
        "unhealthy_threshold": 1,
        "transition_interval_s": 0.05,
    }
    config = proxy_config(
        [pool("chat", [healthy, *sick], health_check=health, panic_threshold_percent=50)]
    )
    app = await start_proxy(config)
    the_pool = proxy_pool(app)
    await wait_until(
        lambda: sum(not b.healthy for b in the_pool.backends) == 3,
        "the health checks to mark three backends unhealthy",
    )
    async with aiohttp.ClientSession() as session:
        result = await chat_load(session, url(app).rstrip("/"), max_requests=200).run()
    report("panic-threshold", result, await retried(app))
    assert the_pool.panicking
    assert result.failed == 0, result.failures
    served = result.served_by()
    assert set(served) == {s.name for s in [healthy, *sick]}
    assert min(served.values()) >= result.sent // 8, served


# -- a backend that hangs -------------------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_a_hanging_backend_times_out_and_the_request_is_retried_elsewhere(
    sims: SimFactory, start_proxy: Callable[[dict[str, Any]], Awaitable[App]]
) -> None:
    """Requests sent to a backend that never answers time out after ``per_try_timeout_s``
    and succeed on another backend; no client sees an error."""
    good = await sims(2)
    (hung,) = await sims(1, hang=True)
    concurrency = 8
    retry = {
        "per_try_timeout_s": 0.3,
        "retry_on": ["connect_error", "reset", "timeout", 502, 503, 504, 429],
        # The retry budget is a subject of its own (see the next test): here every request
        # in flight may retry, so what is tested is the timeout and the retry elsewhere.
        "budget_min_concurrent": concurrency,
    }
    # Health checks off: the hang must be found by the timeout, not by a probe.
    config = proxy_config(
        [pool("chat", [good[0], hung, good[1]], health_check=NO_HEALTH_CHECKS, retry=retry)]
    )
    app = await start_proxy(config)
    async with aiohttp.ClientSession() as session:
        base = url(app).rstrip("/")
        result = await chat_load(session, base, concurrency=concurrency, max_requests=200).run()
    report("hanging-backend", result, await retried(app))
    assert result.failed == 0, result.failures
    assert chat_count(hung) >= 1
    assert proxy_pool(app).stats.retries.get("timeout", 0) >= 1


@pytest.mark.timeout(60)
async def test_a_request_started_while_the_retry_budget_was_spent_retries_once_it_has_room(
    sims: SimFactory, start_proxy: Callable[[dict[str, Any]], Awaitable[App]]
) -> None:
    """The retry budget counts retries in flight when the retry is due: a request that
    started while the budget was spent, and times out after it has room again, is retried."""
    backends = await sims(2, hang=True)
    retry = {
        "per_try_timeout_s": 1.0,
        "retry_on": ["timeout"],
        "backoff_base_s": 0,
        # Retries in flight may be at most half the requests in flight, with no floor.
        "budget_percent": 50,
        "budget_min_concurrent": 0,
    }
    # One slot per backend makes every pick deterministic: the busy backend has no room.
    config = proxy_config(
        [
            pool(
                "chat",
                backends,
                health_check=NO_HEALTH_CHECKS,
                outlier_detection={"enabled": False},
                retry=retry,
                admission={"max_concurrency": 1},
            )
        ]
    )
    app = await start_proxy(config)
    the_pool = proxy_pool(app)
    async with aiohttp.ClientSession() as session:
        base = url(app).rstrip("/")
        # The first request times out on one backend and is retried on the other, where it
        # hangs: one retry in flight for two requests, which spends the budget.
        first = asyncio.create_task(chat(session, base, 8))
        await wait_until(lambda: the_pool.budget.retries == 1, "the first request's retry")
        retrying = next(b for b in the_pool.backends if b.in_flight == 1)
        other = next(b for b in the_pool.backends if b is not retrying)
        second = asyncio.create_task(chat(session, base, 8))
        await wait_until(lambda: other.in_flight == 1, "the second request's first attempt")
        # The first request's retry completes: the budget has room before the second times out.
        held = next(s for s in backends if s.name == retrying.name)
        async with session.post(f"{held.url}/sim/faults", json={"hang": False}) as resp:
            assert resp.status == 200
        async with asyncio.timeout(WAIT_S):
            outcomes = [await first, await second]
    result = LoadResult(outcomes)
    report("retry-budget-checked-when-due", result, await retried(app))
    assert outcomes[0].ok, outcomes[0].detail
    assert outcomes[1].ok, outcomes[1].detail


# -- a backend that cuts streams ------------------------------------------------------------------


async def stream_outcome(port: int, max_tokens: int) -> Outcome:
    """One streamed chat completion read as raw bytes: ``ok`` if it completed; a failure
    whose detail is ``"error event, then cut"`` if it ended the way a broken stream should."""
    reader, writer = await send_raw(port, CHAT, chat_body(max_tokens, stream=True))
    resp = await read_raw(reader, writer)
    backend = resp.headers.get("x-lb-backend")
    if resp.status != 200:
        return Outcome(False, backend, f"status {resp.status}: {resp.body[:200]!r}")
    if resp.complete:
        if b"data: [DONE]\n\n" in resp.body and b"event: error" not in resp.body:
            return Outcome(True, backend)
        return Outcome(False, backend, f"complete without [DONE]: {resp.body[-200:]!r}")
    _, marker, tail = resp.body.rpartition(b"event: error\ndata: ")
    error = json.loads(tail).get("error", {}) if marker and tail.endswith(b"\n\n") else {}
    if error.get("type") and error.get("pool"):  # the pool is named, as in every error
        return Outcome(False, backend, "error event, then cut")
    return Outcome(False, backend, f"cut without an error event: {resp.body[-200:]!r}")


@pytest.mark.timeout(60)
async def test_a_stream_dropped_mid_way_ends_with_an_error_event_and_frees_its_slot(
    sims: SimFactory, start_proxy: Callable[[dict[str, Any]], Awaitable[App]]
) -> None:
    """A backend that cuts its streams after three chunks: each such client stream ends with
    an SSE ``error`` event and then a cut connection, none hangs, and no in-flight count leaks."""
    good = await sims(2)
    (dropping,) = await sims(1, drop_after_chunks=3)
    config = proxy_config(
        [pool("chat", [good[0], dropping, good[1]], health_check=NO_HEALTH_CHECKS)]
    )
    app = await start_proxy(config)
    the_pool = proxy_pool(app)

    async def send(index: int) -> Outcome:
        return await stream_outcome(app.port, max_tokens=8)

    result = await Load(send, concurrency=8, max_requests=120).run()
    await wait_until(
        lambda: all(b.in_flight == 0 for b in the_pool.backends), "in-flight counts to drain"
    )
    metrics = await scrape(app.admin_port)
    report("stream-dropped-mid-way", result, retries_in(metrics, [the_pool]))
    failures = [o.detail for o in result.outcomes if not o.ok]
    assert set(failures) == {"error event, then cut"}, result.failures
    assert len(failures) == dropping.streams_dropped
    assert [b.in_flight for b in the_pool.backends] == [0, 0, 0]
    gauges = samples(metrics, "lb_upstream_in_flight")
    assert len(gauges) == 3
    assert all(value == 0 for _, value in gauges), gauges


# -- every backend full ---------------------------------------------------------------------------

ADMISSION = {"max_concurrency": 2, "max_queue": 4, "queue_timeout_s": 5}


@pytest.mark.timeout(60)
async def test_queued_requests_start_in_arrival_order_when_every_backend_is_full(
    sims: SimFactory, start_proxy: Callable[[dict[str, Any]], Awaitable[App]]
) -> None:
    """Two backends of two slots each: four requests run, four more wait in the pool's queue,
    all eight succeed, and the waiting ones start first come, first served."""
    backends = await sims(2, **STEADY)
    config = proxy_config(
        [pool("chat", backends, health_check=NO_HEALTH_CHECKS, admission=ADMISSION)]
    )
    app = await start_proxy(config)
    the_pool = proxy_pool(app)
    queue = the_pool.queue
    assert queue is not None
    endpoint = url(app, CHAT)
    started: list[int] = []
    outcomes: list[Outcome] = []

    async def stream(index: int, max_tokens: int, ready: asyncio.Event) -> None:
        async with session.post(endpoint, json=chat_body(max_tokens, stream=True)) as resp:
            started.append(index)  # the backend sends its headers as it starts the request
            ready.set()
            body = await resp.read()
            complete = resp.status == 200 and body.endswith(b"data: [DONE]\n\n")
            outcomes.append(Outcome(complete, detail=f"request {index}: {body[-100:]!r}"))

    async def queued(n: int) -> None:
        await wait_until(lambda: len(queue) == n, f"{n} requests in the queue")

    async with aiohttp.ClientSession() as session:
        tasks = []
        # The four running requests end one by one, 200 ms apart (5 ms a token), so each
        # freed slot goes to exactly one waiting request; the waiting ones outlast them all.
        for index, max_tokens in enumerate([40, 80, 120, 160]):
            running = asyncio.Event()
            tasks.append(asyncio.create_task(stream(index, max_tokens, running)))
            await asyncio.wait_for(running.wait(), WAIT_S)
        for index in range(4, 8):
            tasks.append(asyncio.create_task(stream(index, 200, asyncio.Event())))
            await queued(index - 3)  # one at a time: the arrival order is known
        async with asyncio.timeout(WAIT_S):
            await asyncio.gather(*tasks)
    result = LoadResult(outcomes)
    report("all-backends-full-fifo", result, await retried(app))
    assert result.failed == 0, result.failures
    assert result.sent == 8
    assert started == list(range(8))
    assert [s.engine.max_running_seen for s in backends] == [2, 2]


@pytest.mark.timeout(60)
async def test_requests_beyond_the_queue_are_rejected_as_overloaded_with_retry_after(
    sims: SimFactory, start_proxy: Callable[[dict[str, Any]], Awaitable[App]]
) -> None:
    """Twelve requests at once on four slots and a queue of four: eight are served, four are
    answered 503 with ``Retry-After`` and an ``overloaded`` error."""
    backends = await sims(2, **STEADY)
    config = proxy_config(
        [pool("chat", backends, health_check=NO_HEALTH_CHECKS, admission=ADMISSION)]
    )
    app = await start_proxy(config)
    endpoint = url(app, CHAT)

    async def send(session: aiohttp.ClientSession) -> tuple[int, str | None, Any]:
        # 100 tokens at 5 ms: the slots stay taken until all twelve have arrived.
        async with session.post(endpoint, json=chat_body(100)) as resp:
            return resp.status, resp.headers.get("retry-after"), await resp.json()

    async with aiohttp.ClientSession() as session, asyncio.timeout(WAIT_S):
        answers = await asyncio.gather(*(send(session) for _ in range(12)))
    served = [a for a in answers if a[0] == 200]
    rejected = [a for a in answers if a[0] != 200]
    result = LoadResult([Outcome(status == 200, detail=str(body)) for status, _, body in answers])
    report("queue-overflow", result, await retried(app))
    assert len(served) == 8
    assert len(rejected) == 4
    for status, retry_after, body in rejected:
        assert status == 503
        assert retry_after == "1"
        assert body["error"]["type"] == "overloaded"


# -- reload under load ----------------------------------------------------------------------------


def process_pool(backends: list[SimServer], strategy: str) -> dict[str, Any]:
    return pool("chat", backends, strategy=strategy)


@pytest.mark.timeout(60)
async def test_a_reload_under_load_moves_traffic_without_failing_a_request(
    sims: SimFactory, proxy_process: Callable[..., Awaitable[ProxyProcess]]
) -> None:
    """SIGHUP with a file that adds a backend, removes another and changes the strategy:
    no request fails, the new backend gets traffic and the removed one gets no more."""
    kept, removed, added = await sims(3)
    config = proxy_config([process_pool([kept, removed], "round_robin")])
    proxy = await proxy_process(config)
    async with aiohttp.ClientSession() as session:
        load = chat_load(session, proxy.base_url, max_requests=5000).start()
        await load.wait_done(100)
        assert chat_count(removed) > 0
        proxy.write({**config, "pools": [process_pool([kept, added], "least_connections")]})
        proxy.signal(signal.SIGHUP)
        await wait_until(lambda: chat_count(added) >= 20, "the added backend to get traffic")
        removed_before = chat_count(removed)
        await load.wait_done(load.done + 150)
        removed_after = chat_count(removed)
        metrics = await scrape(proxy.admin_port)
        result = await load.stop()
    report("reload-under-load", result, retries_in(metrics))
    assert result.failed == 0, result.failures
    assert removed_after == removed_before
    assert "config reloaded" in proxy.log_text()


@pytest.mark.timeout(60)
async def test_an_invalid_reload_under_load_keeps_the_running_config(
    sims: SimFactory, proxy_process: Callable[..., Awaitable[ProxyProcess]]
) -> None:
    """SIGHUP with an invalid file is refused and logged; the proxy keeps serving the old
    config without failing a request."""
    first, second = await sims(2)
    config = proxy_config([process_pool([first, second], "round_robin")])
    proxy = await proxy_process(config)
    async with aiohttp.ClientSession() as session:
        load = chat_load(session, proxy.base_url, max_requests=5000).start()
        await load.wait_done(100)
        invalid = {**config, "pools": [{"name": "chat", "backends": [{"url": "ftp://x"}]}]}
        proxy.write(invalid)
        proxy.signal(signal.SIGHUP)
        await wait_until(lambda: "reload refused" in proxy.log_text(), "the refusal in the log")
        counts_before = [chat_count(first), chat_count(second)]
        await load.wait_done(load.done + 100)
        counts_after = [chat_count(first), chat_count(second)]
        metrics = await scrape(proxy.admin_port)
        result = await load.stop()
    report("invalid-reload-under-load", result, retries_in(metrics))
    assert result.failed == 0, result.failures
    assert counts_after[0] > counts_before[0]
    assert counts_after[1] > counts_before[1]


# -- SIGTERM under load ---------------------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_sigterm_under_load_finishes_queued_and_streaming_requests_then_exits_zero(
    sims: SimFactory, proxy_process: Callable[..., Awaitable[ProxyProcess]]
) -> None:
    """SIGTERM while four streams run and four more requests wait in the queue: every one of
    them gets its complete answer and the process exits 0."""
    backends = await sims(2, **STEADY)
    config = proxy_config(
        [pool("chat", backends, health_check=NO_HEALTH_CHECKS, admission=ADMISSION)],
        shutdown={"grace_s": 10},
    )
    proxy = await proxy_process(config)
    endpoint = f"{proxy.base_url}{CHAT}"
    async with aiohttp.ClientSession() as session:
        streams = [await session.post(endpoint, json=chat_body(60, stream=True)) for _ in range(4)]
        assert [r.status for r in streams] == [200] * 4  # running: their headers came
        queued = [await send_raw(proxy.port, CHAT, chat_body(20)) for _ in range(4)]
        # A round trip through the proxy's event loop after the four requests were written:
        # by then it has read them, so they are queued, not idle connections.
        metrics = await scrape(proxy.admin_port)
        proxy.signal(signal.SIGTERM)
        async with asyncio.timeout(WAIT_S):
            stream_bodies = [await r.read() for r in streams]
            answers = [await read_raw(reader, writer) for reader, writer in queued]
        for r in streams:
            r.release()
    assert proxy.proc is not None
    exit_code = await asyncio.wait_for(proxy.proc.wait(), WAIT_S)
    outcomes = [
        Outcome(b.endswith(b"data: [DONE]\n\n"), detail=repr(b[-100:])) for b in stream_bodies
    ]
    for answer in answers:
        usage = json.loads(answer.body).get("usage", {}) if answer.complete else {}
        ok = answer.status == 200 and usage.get("completion_tokens") == 20
        outcomes.append(Outcome(ok, detail=f"{answer.status} {answer.body[:200]!r}"))
    result = LoadResult(outcomes)
    report("sigterm-under-load", result, retries_in(metrics))
    assert result.failed == 0, result.failures
    assert exit_code == 0
    assert [s.engine.max_running_seen for s in backends] == [2, 2]


async def test_a_503_with_retry_after_holds_its_backend_out_even_without_retries(
    backends: Callable[[int], Awaitable[list[conftest.TestBackend]]],
    start_proxy: Callable[[dict[str, Any]], Awaitable[App]],
) -> None:
    """With retries off the client gets the backend's 503 and Retry-After, and the backend
    still takes no new request until then."""
    b0, b1 = await backends(2)
    config = proxy_config([pool("chat", [b0, b1], retry={"max_retries": 0})])
    app = await start_proxy(config)
    async with aiohttp.ClientSession() as session:
        async with session.get(url(app, "/status/503?retry_after=30")) as resp:
            assert (resp.status, resp.headers["retry-after"]) == (503, "30")
            held = resp.headers["x-lb-backend"]
        served = []
        for _ in range(6):
            async with session.get(url(app, "/echo")) as resp:
                assert resp.status == 200
                served.append(resp.headers["x-lb-backend"])
    assert held not in served


async def test_a_long_retry_after_from_the_last_backend_is_answered_at_once_not_waited_out(
    backends: Callable[[int], Awaitable[list[conftest.TestBackend]]],
    start_proxy: Callable[[dict[str, Any]], Awaitable[App]],
) -> None:
    """The only backend answers 503 with ``Retry-After: 30``: the client gets the 503 and the
    Retry-After at once, to wait as it sees fit, instead of being held 30 s per retry."""
    (b0,) = await backends(1)
    app = await start_proxy(proxy_config([pool("chat", [b0])]))
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with (
        aiohttp.ClientSession() as session,
        session.get(url(app, "/status/503?retry_after=30")) as resp,
    ):
        assert (resp.status, resp.headers["retry-after"]) == (503, "30")
    assert loop.time() - started < 5.0  # the old behaviour waited 2 x 30 s
    assert b0.hits == 1


async def test_when_every_backend_asked_for_quiet_panic_sends_them_nothing(
    backends: Callable[[int], Awaitable[list[conftest.TestBackend]]],
    start_proxy: Callable[[dict[str, Any]], Awaitable[App]],
) -> None:
    """Three backends each answer 503 with ``Retry-After: 20``. Panic mode (under half the
    pool available) balances over backends that are down, but not over those that asked to be
    left alone: later requests get a 503 with a Retry-After, and no backend a second hit."""
    group = await backends(3)
    app = await start_proxy(proxy_config([pool("chat", group)]))
    async with aiohttp.ClientSession() as session:
        async with session.get(url(app, "/status/503?retry_after=20")) as resp:
            assert resp.status == 503
        answers = []
        for _ in range(3):
            async with session.get(url(app, "/status/503?retry_after=20")) as resp:
                body = await resp.json()
                answers.append((resp.status, body["error"]["type"], resp.headers["retry-after"]))
    assert [b.hits for b in group] == [1, 1, 1]
    assert all(status == 503 and kind == "no_backend_available" for status, kind, _ in answers)
    assert all(1 <= int(after) <= 20 for _, _, after in answers)


async def test_requests_still_queued_when_the_grace_period_ends_are_answered_503(
    backends: Callable[[int], Awaitable[list[conftest.TestBackend]]],
    start_proxy: Callable[[dict[str, Any]], Awaitable[App]],
) -> None:
    """A stream holds the only slot past the grace period, and is cut; the requests queued
    behind it never reached a backend, and get a 503 with Retry-After, not an empty reply."""
    (b0,) = await backends(1)
    admission = {"max_concurrency": 1, "max_queue": 10, "queue_timeout_s": 30}
    config = proxy_config([pool("chat", [b0], admission=admission)])
    config["shutdown"] = {"grace_s": 0.3}
    app = await start_proxy(config)

    async def queued_answer(session: aiohttp.ClientSession, path: str) -> tuple[int, str, str]:
        async with session.get(url(app, path)) as resp:
            body = await resp.json()
            return resp.status, body["error"]["type"], resp.headers.get("retry-after", "")

    async with aiohttp.ClientSession() as session:
        stream = await session.get(url(app, "/stream?hold=1&chunks=1"))
        queued = [asyncio.create_task(queued_answer(session, f"/q{i}")) for i in range(3)]
        for _ in range(100):  # bounded: 5 s
            if len(app.proxy.pools["chat"].queue or ()) == 3:
                break
            await asyncio.sleep(0.05)
        assert len(app.proxy.pools["chat"].queue or ()) == 3
        await app.shutdown()
        answers = await asyncio.wait_for(asyncio.gather(*queued), 5)
        stream.close()
    assert answers == [(503, "overloaded", "1")] * 3
    assert b0.hits == 1


async def test_a_retry_waits_for_an_untried_backend_that_is_full_rather_than_repeat_one(
    backends: Callable[[int], Awaitable[list[conftest.TestBackend]]],
    start_proxy: Callable[[dict[str, Any]], Awaitable[App]],
) -> None:
    """b0's one slot is held by a stream; a request answered 503 by b1 is retried on b0 once
    it has room, not sent straight back to b1, which had just failed it."""
    b0, b1 = await backends(2)
    admission = {"max_concurrency": 1, "max_queue": 10, "queue_timeout_s": 10}
    chat = pool("chat", [b0, b1], admission=admission, retry={"max_retries": 1})
    app = await start_proxy(proxy_config([chat]))
    async with aiohttp.ClientSession() as session:
        stream = await session.get(url(app, "/stream?hold=1&chunks=1"))
        assert stream.headers["x-lb-backend"] == "b0"
        retried = asyncio.create_task(session.get(url(app, "/status/503")))
        for _ in range(100):  # bounded: 5 s
            if b1.hits:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.1)
        assert not retried.done()  # queued for b0, not back on b1
        b0.release.set()
        await stream.read()
        resp = await asyncio.wait_for(retried, 5)
        assert (resp.status, resp.headers["x-lb-backend"]) == (503, "b0")
        resp.release()
    assert (b0.hits, b1.hits) == (2, 1)


async def test_deadline_s_also_ends_the_wait_of_the_try_running_when_it_comes(
    backends: Callable[[int], Awaitable[list[conftest.TestBackend]]],
    start_proxy: Callable[[dict[str, Any]], Awaitable[App]],
) -> None:
    """Every backend hangs; tries time out after 1 s and the request's deadline is 1.2 s:
    the second try is cut at the deadline (a 504 after about 1.2 s), not after its own 1 s."""
    b0, b1 = await backends(2)
    retry = {"per_try_timeout_s": 1.0, "deadline_s": 1.2, "backoff_base_s": 0}
    app = await start_proxy(proxy_config([pool("chat", [b0, b1], retry=retry)]))
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with aiohttp.ClientSession() as session, session.get(url(app, "/hang")) as resp:
        assert resp.status == 504
    assert loop.time() - started < 1.8  # a whole second try would end after 2 s
    assert b0.hits + b1.hits == 2


async def test_backends_that_start_unhealthy_get_nothing_until_a_check_passes_even_in_panic(
    backends: Callable[[int], Awaitable[list[conftest.TestBackend]]],
    start_proxy: Callable[[dict[str, Any]], Awaitable[App]],
) -> None:
    """``initial_state: unhealthy`` means after the first passing check: with every backend
    waiting for one, panic mode (which balances over backends known to be down) sends them
    nothing; the first to pass serves."""
    b0, b1 = await backends(2)
    b0.healthy = b1.healthy = False
    checks = {"initial_state": "unhealthy", "interval_s": 0.05, "jitter_percent": 0}
    app = await start_proxy(proxy_config([pool("chat", [b0, b1], health_check=checks)]))
    async with aiohttp.ClientSession() as session:
        for _ in range(3):
            async with session.get(url(app, "/x")) as resp:
                assert resp.status == 503
                assert (await resp.json())["error"]["type"] == "no_backend_available"
        assert (b0.hits, b1.hits) == (0, 0)
        b1.healthy = True
        for _ in range(200):  # bounded: 10 s
            if app.proxy.pools["chat"].backends[1].healthy:
                break
            await asyncio.sleep(0.05)
        async with session.get(url(app, "/x")) as resp:
            assert (resp.status, resp.headers["x-lb-backend"]) == (200, "b1")
    assert b0.hits == 0


async def test_a_request_queued_past_its_deadline_is_answered_without_reaching_a_backend(
    backends: Callable[[int], Awaitable[list[conftest.TestBackend]]],
    start_proxy: Callable[[dict[str, Any]], Awaitable[App]],
) -> None:
    """The only slot is held; a request with ``deadline_s: 0.3`` queues for it. Its deadline
    bounds the wait: it is answered then, and the backend, which never saw it, is not blamed."""
    (b0,) = await backends(1)
    admission = {"max_concurrency": 1, "max_queue": 10, "queue_timeout_s": 10}
    chat = pool("chat", [b0], admission=admission, retry={"deadline_s": 0.3})
    app = await start_proxy(proxy_config([chat]))
    backend = app.proxy.pools["chat"].backends[0]
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession() as session:
        stream = await session.get(url(app, "/stream?hold=1&chunks=1"))
        started = loop.time()
        async with session.get(url(app, "/late")) as resp:
            assert resp.status in (503, 504)
        assert loop.time() - started < 5.0
        b0.release.set()
        await stream.read()
    assert b0.hits == 1  # the stream only
    assert backend.failures_total == 0


async def test_a_retry_with_no_room_in_the_queue_goes_back_to_a_tried_backend(
    backends: Callable[[int], Awaitable[list[conftest.TestBackend]]],
    start_proxy: Callable[[dict[str, Any]], Awaitable[App]],
) -> None:
    """With ``max_queue: 0`` a retry cannot queue for the untried, full backend: it is tried
    again where there is room, rather than refused by the queue it was never allowed into."""
    b0, b1 = await backends(2)
    admission = {"max_concurrency": 1, "max_queue": 0}
    chat = pool("chat", [b0, b1], admission=admission, retry={"max_retries": 1})
    app = await start_proxy(proxy_config([chat]))
    async with aiohttp.ClientSession() as session:
        stream = await session.get(url(app, "/stream?hold=1&chunks=1"))
        async with session.get(url(app, "/status/502")) as resp:
            assert (resp.status, resp.headers["x-lb-backend"]) == (502, "b1")
        b0.release.set()
        await stream.read()
    assert b1.hits == 2
