"""Canary splits, traffic mirroring to a shadow pool, the decision header and log, and shadow
strategies, with real aiohttp backends and a real proxy on 127.0.0.1."""

from __future__ import annotations

import asyncio
import hashlib
import io
import random
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

import lb.proxy
from lb.app import App
from tests.conftest import free_port, pool, proxy_config, url

POLL_S = 0.02
POLLS = 500  # 10 s at most for background work (mirrored copies) to show
NO_HEALTH_CHECKS = {"enabled": False}
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@dataclass
class Recorder:
    """A backend that records every request it gets; ``hang`` holds them until ``release``.

    The proxy's health probes (``GET /health``, which may land at any time during a test) are
    counted in ``probes``, apart from the mirrored traffic in ``seen``."""

    name: str
    runner: web.AppRunner
    port: int = 0
    status: int = 200
    hang: bool = False
    seen: list[tuple[str, str, str]] = field(default_factory=list)  # method, path, body sha256
    probes: int = 0
    release: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


RecorderFactory = Callable[..., Awaitable[Recorder]]


@pytest.fixture
async def recorders() -> AsyncIterator[RecorderFactory]:
    """Factory: ``await recorders(name, status=200, hang=False)`` starts one recording backend."""
    started: list[Recorder] = []

    async def start(name: str, *, status: int = 200, hang: bool = False) -> Recorder:
        app = web.Application()
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        rec = Recorder(name=name, runner=runner, status=status, hang=hang)

        async def record(request: web.Request) -> web.Response:
            body = await request.read()
            rec.seen.append((request.method, request.path_qs, hashlib.sha256(body).hexdigest()))
            if rec.hang:
                await rec.release.wait()
            return web.json_response({"recorder": rec.name}, status=rec.status)

        async def probe(request: web.Request) -> web.Response:
            rec.probes += 1
            return web.json_response({"recorder": rec.name})

        app.router.add_get("/health", probe)
        app.router.add_route("*", "/{tail:.*}", record)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        rec.port = runner.addresses[0][1]
        started.append(rec)
        return rec

    yield start
    for rec in started:
        rec.release.set()
        await rec.runner.cleanup()


def dead_backend() -> dict[str, str]:
    """A backend entry on a loopback port where nothing listens: connections are refused."""
    return {"url": f"http://127.0.0.1:{free_port()}", "name": "dead"}


def admin(app: App, path: str) -> str:
    return f"http://127.0.0.1:{app.admin_port}{path}"


async def scrape(app: App) -> Samples:
    """Every sample of the proxy's ``/metrics``, keyed by its name and labels."""
    async with aiohttp.ClientSession() as s, s.get(admin(app, "/metrics")) as resp:
        text = await resp.text()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = float(sample.value)
    return out


def sample(found: Samples, name: str, **labels: str) -> float:
    return found.get((name, frozenset(labels.items())), 0.0)


def requests_of(found: Samples, pool_name: str) -> dict[str, float]:
    """``lb_requests_total`` of one pool by status class."""
    classes = ("none", "1xx", "2xx", "3xx", "4xx", "5xx")
    return {c: sample(found, "lb_requests_total", pool=pool_name, code_class=c) for c in classes}


async def wait_for_requests(app: App, pool_name: str, code_class: str, count: int) -> None:
    """Wait (bounded) until ``pool_name`` has counted ``count`` answers of ``code_class``."""
    for _ in range(POLLS):
        if requests_of(await scrape(app), pool_name)[code_class] >= count:
            return
        await asyncio.sleep(POLL_S)
    raise AssertionError(f"pool {pool_name} never counted {count} {code_class} answers")


async def send(app: App, n: int, path: str = "/echo", concurrency: int = 16) -> Counter[str]:
    """``n`` GETs, ``concurrency`` at a time, all answered 200; counts of the serving backend."""
    served: Counter[str] = Counter()
    sem = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession() as s:

        async def one() -> None:
            async with sem, s.get(url(app, path)) as resp:
                assert resp.status == 200
                served[resp.headers["x-lb-backend"]] += 1
                await resp.read()

        await asyncio.gather(*(one() for _ in range(n)))
    return served


async def test_a_90_10_split_sends_about_a_tenth_of_the_requests_to_the_canary(
    backends, start_proxy
):
    """Over 1000 requests a weight of 10 against 90 gets between 6% and 14% of them."""
    b_stable, b_canary = await backends(2)
    route = {"split": [{"pool": "stable", "weight": 90}, {"pool": "canary", "weight": 10}]}
    app = await start_proxy(
        proxy_config(
            [pool("stable", [b_stable]), pool("canary", [b_canary])],
            routes=[route],
        )
    )
    assert app.proxy is not None
    app.proxy.rng = random.Random(20240601)  # the proxy's randomness, seeded
    served = await send(app, 1000)
    assert served[b_stable.name] + served[b_canary.name] == 1000
    assert 60 <= served[b_canary.name] <= 140


async def test_a_split_target_of_weight_zero_gets_nothing(backends, start_proxy):
    """Pools of weight 0, first or last in the split, never get a request."""
    b_first, b_stable, b_last = await backends(3)
    route = {
        "split": [
            {"pool": "first", "weight": 0},
            {"pool": "stable", "weight": 1},
            {"pool": "last", "weight": 0},
        ]
    }
    app = await start_proxy(
        proxy_config(
            [pool("first", [b_first]), pool("stable", [b_stable]), pool("last", [b_last])],
            routes=[route],
        )
    )
    served = await send(app, 300)
    assert served == {b_stable.name: 300}
    assert (b_first.hits, b_last.hits) == (0, 0)


async def test_a_mirrored_request_answers_the_client_from_the_primary_only(
    backends, recorders, start_proxy
):
    """With a 100% mirror the client always gets the primary's answer, never the shadow's."""
    (b0,) = await backends(1)
    shadow = await recorders("shadow-0", status=503)
    route = {"pool": "primary", "mirror": {"pool": "shadow", "percent": 100}}
    app = await start_proxy(
        proxy_config([pool("primary", [b0]), pool("shadow", [shadow])], routes=[route])
    )
    async with aiohttp.ClientSession() as s:
        for i in range(10):
            async with s.post(url(app, "/v1/chat/completions"), data=b"x" * i) as resp:
                assert resp.status == 200
                assert resp.headers["x-lb-backend"] == "b0"
                got = await resp.json()
            assert got["backend"] == "b0"
    assert b0.hits == 10


async def test_the_shadow_backend_receives_a_copy_of_each_mirrored_request(
    backends, recorders, start_proxy
):
    """Each mirrored copy has the client's method, path with query, and body."""
    (b0,) = await backends(1)
    shadow = await recorders("shadow-0")
    route = {"pool": "primary", "mirror": {"pool": "shadow", "percent": 100}}
    app = await start_proxy(
        proxy_config([pool("primary", [b0]), pool("shadow", [shadow])], routes=[route])
    )
    sent = []
    async with aiohttp.ClientSession() as s:
        for i in range(5):
            body = (b'{"model": "m", "n": %d}' % i) * (i + 1)
            path = f"/v1/completions?try={i}"
            async with s.post(url(app, path), data=body) as resp:
                assert resp.status == 200
            sent.append(("POST", path, hashlib.sha256(body).hexdigest()))
        async with s.put(url(app, "/v1/files/f1"), data=b"file") as resp:
            assert resp.status == 200
        sent.append(("PUT", "/v1/files/f1", hashlib.sha256(b"file").hexdigest()))
    await wait_for_requests(app, "shadow", "2xx", len(sent))
    assert sorted(shadow.seen) == sorted(sent)


async def test_the_shadows_answers_are_counted_under_the_shadow_pool_only(
    backends, recorders, start_proxy
):
    """The shadow's 503s show as ``lb_requests_total{pool="shadow"}``; the primary counts
    only the 200s its clients got."""
    (b0,) = await backends(1)
    shadow = await recorders("shadow-0", status=503)
    route = {"pool": "primary", "mirror": {"pool": "shadow", "percent": 100}}
    app = await start_proxy(
        proxy_config([pool("primary", [b0]), pool("shadow", [shadow])], routes=[route])
    )
    await send(app, 20, concurrency=1)
    await wait_for_requests(app, "shadow", "5xx", 20)
    found = await scrape(app)
    primary, shadow_pool = requests_of(found, "primary"), requests_of(found, "shadow")
    assert {c: n for c, n in primary.items() if n} == {"2xx": 20}
    assert {c: n for c, n in shadow_pool.items() if n} == {"5xx": 20}
    assert len(shadow.seen) == 20


async def test_a_shadow_pool_that_refuses_connections_never_fails_the_primary(
    backends, start_proxy
):
    """Every client request succeeds while each mirrored copy fails to connect, and the
    failures are counted under the shadow pool as answers of class ``none``."""
    (b0,) = await backends(1)
    dead = {"name": "shadow", "backends": [dead_backend()], "health_check": NO_HEALTH_CHECKS}
    route = {"pool": "primary", "mirror": {"pool": "shadow", "percent": 100}}
    app = await start_proxy(proxy_config([pool("primary", [b0]), dead], routes=[route]))
    served = await send(app, 30)
    assert served == {"b0": 30}
    await wait_for_requests(app, "shadow", "none", 30)
    found = await scrape(app)
    assert requests_of(found, "primary")["2xx"] == 30
    assert requests_of(found, "shadow")["2xx"] == 0


async def test_a_hanging_shadow_pool_never_delays_the_primary(backends, recorders, start_proxy):
    """While every mirrored copy is held unanswered by the shadow, all client requests are
    answered by the primary."""
    (b0,) = await backends(1)
    shadow = await recorders("shadow-0", hang=True)
    route = {"pool": "primary", "mirror": {"pool": "shadow", "percent": 100}}
    app = await start_proxy(
        proxy_config([pool("primary", [b0]), pool("shadow", [shadow])], routes=[route])
    )
    async with asyncio.timeout(15):  # a hang guard, far above what 20 local requests take
        served = await send(app, 20, concurrency=4)
    assert served == {"b0": 20}
    for _ in range(POLLS):
        if len(shadow.seen) == 20:
            break
        await asyncio.sleep(POLL_S)
    assert len(shadow.seen) == 20  # every copy reached the shadow and is still held there
    found = await scrape(app)
    assert sample(found, "lb_upstream_in_flight", pool="shadow", backend="shadow-0") == 20
    assert sum(requests_of(found, "shadow").values()) == 0


async def test_a_mirror_of_50_percent_copies_about_half_of_the_requests(
    backends, recorders, start_proxy
):
    """With ``percent: 50`` between 35% and 65% of 400 requests are copied to the shadow."""
    (b0,) = await backends(1)
    shadow = await recorders("shadow-0")
    route = {"pool": "primary", "mirror": {"pool": "shadow", "percent": 50}}
    app = await start_proxy(
        proxy_config([pool("primary", [b0]), pool("shadow", [shadow])], routes=[route])
    )
    await send(app, 400)
    # The copies are sent in the background: wait until the shadow's count stops moving and
    # matches what the shadow pool counted as answered.
    stable, last = 0, -1
    for _ in range(POLLS):
        answered = requests_of(await scrape(app), "shadow")["2xx"]
        copies = len(shadow.seen)
        stable = stable + 1 if copies == last and answered == copies else 0
        if stable >= 5:
            break
        last = copies
        await asyncio.sleep(POLL_S)
    assert 140 <= len(shadow.seen) <= 260
    assert b0.hits == 400


async def test_the_decision_header_names_the_strategy_and_a_reason(backends, start_proxy):
    """``x-lb-decision`` reads ``<strategy>: <reason>`` with a non-empty reason."""
    b0, b1 = await backends(2)
    app = await start_proxy(proxy_config([pool("chat", [b0, b1])]))
    async with aiohttp.ClientSession() as s, s.get(url(app, "/echo")) as resp:
        assert resp.status == 200
        decision = resp.headers["x-lb-decision"]
    strategy, sep, reason = decision.partition(":")
    assert (strategy, sep) == ("round_robin", ":")
    assert reason.strip()


async def test_ever_new_reasons_each_reach_their_response_and_the_kept_texts_stay_bounded(
    backends, start_proxy, monkeypatch
):
    """Decision texts are formatted once and kept, but a strategy whose reasons never repeat
    still gets its own reason on every response, and the proxy keeps a bounded number."""
    monkeypatch.setattr(lb.proxy, "MAX_DECISION_TEXTS", 3)
    b0, b1 = await backends(2)
    cfg = pool("chat", [b0, b1], "tests.strategies.custom_strategy:NumberedReasons")
    app = await start_proxy(proxy_config([cfg]))
    async with aiohttp.ClientSession() as s:
        for n in range(1, 9):
            async with s.get(url(app, "/echo")) as resp:
                assert resp.status == 200
                assert resp.headers["x-lb-decision"] == f"numbered: pick {n}"
    assert len(app.proxy._decisions) <= 3


async def test_the_decision_header_can_be_turned_off(backends, start_proxy):
    """``headers: {decision_header: null}`` removes the header from responses."""
    b0, b1 = await backends(2)
    app = await start_proxy(
        proxy_config([pool("chat", [b0, b1])], headers={"decision_header": None})
    )
    async with aiohttp.ClientSession() as s, s.get(url(app, "/echo")) as resp:
        assert resp.status == 200
        assert "x-lb-backend" in resp.headers
        assert "x-lb-decision" not in resp.headers


async def test_the_decisions_endpoint_lists_the_last_decisions_newest_first(backends, start_proxy):
    """``GET /api/v1/pools/{pool}/decisions`` lists each request's backend and reason,
    newest first, as the decision header told the client."""
    b0, b1 = await backends(2)
    app = await start_proxy(proxy_config([pool("chat", [b0, b1])]))
    told = []
    async with aiohttp.ClientSession() as s:
        for i in range(6):
            headers = {"x-request-id": f"req-{i}"}
            async with s.get(url(app, "/echo"), headers=headers) as resp:
                assert resp.status == 200
                told.append(
                    (f"req-{i}", resp.headers["x-lb-backend"], resp.headers["x-lb-decision"])
                )
        async with s.get(admin(app, "/api/v1/pools/chat/decisions")) as resp:
            assert resp.status == 200
            got = await resp.json()
    assert got["pool"] == "chat"
    listed = [(d["request_id"], d["backend"], d["reason"]) for d in got["decisions"]]
    assert listed == told[::-1]
    assert all(reason.startswith("round_robin:") for _, _, reason in listed)


async def test_a_shadow_strategy_counts_one_agreement_or_disagreement_per_first_attempt(
    backends, start_proxy
):
    """A ``least_connections`` shadow beside round robin is judged once per request, not per
    retry, in ``lb_shadow_decisions_total`` and in the admin state's ``shadow``."""
    b0, b1 = await backends(2)
    cfg = pool("chat", [b0, b1], shadow_strategy="least_connections")
    cfg["backends"].append(dead_backend())  # its attempts fail to connect and are retried
    cfg["health_check"] = NO_HEALTH_CHECKS
    cfg["outlier_detection"] = {"enabled": False}
    # Every request in flight may retry: with the default budget (3 retries in flight), three
    # clients retrying at once leave the fourth's failed attempt unretried, a 502.
    cfg["retry"] = {"budget_min_concurrent": 4}
    app = await start_proxy(proxy_config([cfg]))
    served = await send(app, 60, concurrency=4)
    assert sum(served.values()) == 60
    found = await scrape(app)
    agree = sample(found, "lb_shadow_decisions_total", pool="chat", agree="true")
    disagree = sample(found, "lb_shadow_decisions_total", pool="chat", agree="false")
    assert agree + disagree == 60
    assert sample(found, "lb_retries_total", pool="chat", reason="connect_error") > 0
    async with aiohttp.ClientSession() as s, s.get(admin(app, "/api/v1/state")) as resp:
        state = await resp.json()
    (chat,) = [p for p in state["pools"] if p["name"] == "chat"]
    assert chat["shadow"] == {
        "strategy": "least_connections",
        "agree": agree,
        "disagree": disagree,
    }


async def test_a_copy_too_large_to_keep_is_not_mirrored_and_is_counted_as_skipped(
    backends, recorders, start_proxy
):
    """A body beyond what the proxy keeps for replay (1 MiB) reaches the primary but cannot be
    copied: the shadow pool's lb_mirror_skipped_total counts it."""
    (b0,) = await backends(1)
    shadow = await recorders("shadow-0")
    route = {"pool": "primary", "mirror": {"pool": "shadow", "percent": 100}}
    app = await start_proxy(
        proxy_config([pool("primary", [b0]), pool("shadow", [shadow])], routes=[route])
    )
    async with aiohttp.ClientSession() as s:
        big = io.BytesIO(b"x" * (2 << 20))
        async with s.post(url(app, "/v1/completions"), data=big) as resp:
            assert resp.status == 200
        async with s.post(url(app, "/v1/completions"), data=b'{"model": "m"}') as resp:
            assert resp.status == 200
    await wait_for_requests(app, "shadow", "2xx", 1)
    found = await scrape(app)
    assert sample(found, "lb_mirror_skipped_total", pool="shadow") == 1
    assert len(shadow.seen) == 1
