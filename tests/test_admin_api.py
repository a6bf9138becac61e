"""The admin API on the admin listener: live state, routes, redacted config, the admin token on
every mutating call, drain and undrain, weights, reload, and the OpenAPI description."""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from lb.app import App
from lb.config import ConfigError, load_config, parse_config
from tests.conftest import ADMIN_AUTH, ADMIN_TOKEN, free_port, pool, proxy_config, raw_exchange, url

TOKEN = ADMIN_TOKEN  # 32 characters, in every proxy_config
AUTH = ADMIN_AUTH
HTTP_METHODS = frozenset({"get", "put", "post", "delete", "options", "head", "patch", "trace"})
# Fields that move with the clock (and the probes it runs) alone, not with any call.
VOLATILE_BACKEND_FIELDS = frozenset(
    {"latency_estimate_s", "ejected_for_s", "health_check", "load_report"}
)


def admin(app: App, path: str) -> str:
    return f"http://127.0.0.1:{app.admin_port}{path}"


async def _get(app: App, path: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s, s.get(admin(app, path)) as resp:
        return resp.status, await resp.json()


async def _post(
    app: App, path: str, *, json: Any = None, data: Any = None, headers: Any = ADMIN_AUTH
) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as s,
        s.post(admin(app, path), json=json, data=data, headers=headers) as resp,
    ):
        assert resp.content_type == "application/json"
        return resp.status, await resp.json()


async def _state(app: App) -> dict[str, Any]:
    status, body = await _get(app, "/api/v1/state")
    assert status == 200
    return body  # type: ignore[no-any-return]


def _backend(state: dict[str, Any], pool_name: str, backend_name: str) -> dict[str, Any]:
    (p,) = [p for p in state["pools"] if p["name"] == pool_name]
    (b,) = [b for b in p["backends"] if b["name"] == backend_name]
    return b  # type: ignore[no-any-return]


def _snapshot(state: dict[str, Any]) -> list[dict[str, Any]]:
    """The pools and backends of a state answer, without the fields that change with time."""
    return [
        {
            **{k: v for k, v in p.items() if k != "backends"},
            "backends": [
                {k: v for k, v in b.items() if k not in VOLATILE_BACKEND_FIELDS}
                for b in p["backends"]
            ],
        }
        for p in state["pools"]
    ]


async def _served_by(app: App, n: int, path: str = "/echo") -> Counter[str]:
    served: Counter[str] = Counter()
    async with aiohttp.ClientSession() as s:
        for _ in range(n):
            async with s.get(url(app, path)) as resp:
                assert resp.status == 200
                served[resp.headers["x-lb-backend"]] += 1
    return served


StartFromFile = Callable[[dict[str, Any]], Awaitable[tuple[App, Path]]]


@pytest.fixture
async def start_from_file(tmp_path: Path) -> AsyncIterator[StartFromFile]:
    """Factory: write the config dict to a YAML file and run an App on it (so it can reload)."""
    apps: list[App] = []

    async def start(config: dict[str, Any]) -> tuple[App, Path]:
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        app = App(load_config(path), str(path))
        await app.start()
        apps.append(app)
        return app, path

    yield start
    for app in apps:
        await app.shutdown()


# -- reads ------------------------------------------------------------------------------------


async def test_state_lists_every_pool_and_backend(backends, start_proxy):
    """GET /api/v1/state names every pool with its strategy and every backend with its fields."""
    b0, b1, b2 = await backends(3)
    app = await start_proxy(
        proxy_config([pool("chat", [b0, b1]), pool("embed", [b2], "least_connections")])
    )
    state = await _state(app)
    assert state["draining"] is False
    assert [(p["name"], p["strategy"]) for p in state["pools"]] == [
        ("chat", "round_robin"),
        ("embed", "least_connections"),
    ]
    assert [[b["name"] for b in p["backends"]] for p in state["pools"]] == [["b0", "b1"], ["b2"]]
    b = _backend(state, "chat", "b0")
    assert b["url"] == b0.url
    assert (b["weight"], b["healthy"], b["available"], b["drained"]) == (1, True, True, False)


async def test_state_counts_requests_per_backend(backends, start_proxy):
    """requests_total counts each backend's requests and in_flight is 0 once they are done."""
    b0, b1 = await backends(2)
    app = await start_proxy(proxy_config([pool("chat", [b0, b1])]))
    assert await _served_by(app, 6) == {"b0": 3, "b1": 3}
    state = await _state(app)
    for name in ("b0", "b1"):
        b = _backend(state, "chat", name)
        assert (b["requests_total"], b["in_flight"]) == (3, 0)
        assert b["responses_by_class"]["2xx"] == 3


async def test_state_shows_a_request_in_flight_while_it_runs(backends, start_proxy):
    """A held stream shows as in_flight 1 on its backend, and 0 again once it has finished."""
    (b0,) = await backends(1)
    app = await start_proxy(proxy_config([pool("chat", [b0])]))
    async with aiohttp.ClientSession() as s:
        resp = await s.get(url(app, "/stream?hold=1&chunks=1"))
        assert _backend(await _state(app), "chat", "b0")["in_flight"] == 1
        b0.release.set()
        assert await asyncio.wait_for(resp.read(), 5) == b"chunk-0;"
        resp.release()
    for _ in range(100):
        if _backend(await _state(app), "chat", "b0")["in_flight"] == 0:
            break
        await asyncio.sleep(0.02)
    assert _backend(await _state(app), "chat", "b0")["in_flight"] == 0


async def _until_backend(
    app: App, pool_name: str, name: str, done: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    """The backend's state once ``done`` holds for it (or after 5 s, as it then is)."""
    for _ in range(250):
        b = _backend(await _state(app), pool_name, name)
        if done(b):
            return b
        await asyncio.sleep(0.02)
    return b


async def test_state_shows_each_backends_last_health_probe(backends, start_proxy):
    """health_check.last_result says what the last probe saw: a pass, or why it failed."""
    good, bad = await backends(2)
    bad.healthy = False
    checks = {"interval_s": 0.05, "transition_interval_s": 0.05, "timeout_s": 1}
    app = await start_proxy(proxy_config([pool("chat", [good, bad], health_check=checks)]))
    ok = await _until_backend(app, "chat", "b0", lambda b: b["health_check"]["passed_total"] > 0)
    assert ok["health_check"]["last_result"] == "status 200"
    failing = await _until_backend(app, "chat", "b1", lambda b: not b["healthy"])
    assert failing["health_check"]["last_result"] == "status 503"
    assert failing["health_check"]["failed_total"] >= 3


async def test_state_without_health_checks_or_load_reports_says_null(backends, start_proxy):
    (b0,) = await backends(1)
    app = await start_proxy(proxy_config([pool("chat", [b0], health_check={"enabled": False})]))
    b = _backend(await _state(app), "chat", "b0")
    assert (b["health_check"], b["load_report"]) == (None, None)


async def test_state_shows_the_reported_load_and_why_a_scrape_failed(backends, start_proxy):
    """A backend whose /metrics has none of the preset's names lists them as missing; one that
    cannot be reached gives the reason; neither has a reported load."""
    (plain,) = await backends(1)
    closed = free_port()
    reports = {"enabled": True, "interval_s": 0.05}
    app = await start_proxy(
        proxy_config(
            [
                {
                    "name": "chat",
                    "backends": [
                        {"url": plain.url, "name": "plain"},
                        {"url": f"http://127.0.0.1:{closed}", "name": "gone"},
                    ],
                    "load_report": reports,
                    "health_check": {"enabled": False},
                }
            ]
        )
    )
    plain_state = await _until_backend(
        app, "chat", "plain", lambda b: b["load_report"]["ok_total"] > 0
    )
    assert plain_state["load_report"]["missing"]
    assert plain_state["load_report"]["waiting"] is None
    gone = await _until_backend(app, "chat", "gone", lambda b: b["load_report"]["failed_total"] > 0)
    assert gone["load_report"]["last_error"]
    assert gone["load_report"]["age_s"] is None


async def test_one_pool_is_described_by_name(backends, start_proxy):
    """GET /api/v1/pools/{pool} answers that pool alone, with its backends."""
    b0, b1 = await backends(2)
    app = await start_proxy(proxy_config([pool("chat", [b0]), pool("embed", [b1])]))
    status, body = await _get(app, "/api/v1/pools/embed")
    assert status == 200
    assert body["name"] == "embed"
    assert [b["name"] for b in body["backends"]] == ["b1"]


async def test_the_pool_list_names_every_pool(backends, start_proxy):
    """GET /api/v1/pools lists the pools in configuration order."""
    b0, b1 = await backends(2)
    app = await start_proxy(proxy_config([pool("chat", [b0]), pool("embed", [b1])]))
    status, body = await _get(app, "/api/v1/pools")
    assert status == 200
    assert [p["name"] for p in body["pools"]] == ["chat", "embed"]


async def test_an_unknown_pool_is_404(backends, start_proxy):
    """Asking for a pool that does not exist is a 404 with a JSON error."""
    (b0,) = await backends(1)
    app = await start_proxy(proxy_config([pool("chat", [b0])]))
    status, body = await _get(app, "/api/v1/pools/nope")
    assert status == 404
    assert body["error"]["type"] == "not_found"


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/pools/chat/backends/nope/drain",
        "/api/v1/pools/nope/backends/b0/drain",
        "/api/v1/pools/chat/backends/nope/weight",
    ],
)
async def test_an_action_on_an_unknown_backend_or_pool_is_404(backends, start_proxy, path):
    """A drain or weight call naming a backend or pool that does not exist is a JSON 404."""
    (b0,) = await backends(1)
    app = await start_proxy(proxy_config([pool("chat", [b0])]))
    status, body = await _post(app, path, json={"weight": 2})
    assert status == 404
    assert body["error"]["type"] == "not_found"
    assert _backend(await _state(app), "chat", "b0")["drained"] is False


async def test_routes_lists_the_routing_table(backends, start_proxy):
    """GET /api/v1/routes shows each route, whether it needs an API key, and the default pool."""
    b0, b1 = await backends(2)
    routes = [
        {"path_prefix": "/v1/", "pool": "chat", "methods": ["post"], "auth": {"api_keys": ["k"]}},
        {"name": "embeddings", "path_prefix": "/", "pool": "embed", "headers": {"X-Model": "e5"}},
    ]
    app = await start_proxy(proxy_config([pool("chat", [b0]), pool("embed", [b1])], routes=routes))
    status, body = await _get(app, "/api/v1/routes")
    assert status == 200
    assert body == {
        "routes": [
            {
                "name": "route-0",
                "pool": "chat",
                "split": None,
                "mirror": None,
                "path_prefix": "/v1/",
                "model": None,
                "headers": {},
                "methods": ["POST"],
                "requires_api_key": True,
            },
            {
                "name": "embeddings",
                "pool": "embed",
                "split": None,
                "mirror": None,
                "path_prefix": "/",
                "model": None,
                "headers": {"x-model": "e5"},
                "methods": None,
                "requires_api_key": False,
            },
        ],
        "default_pool": "chat",
    }


async def test_routes_lists_a_split_with_its_pools_a_mirror_and_models(backends, start_proxy):
    """A split route has no one pool: its targets and weights say where it sends; a mirror
    and a model match are shown too (not a catch-all)."""
    b0, b1 = await backends(2)
    routes = [
        {
            "path_prefix": "/v1/",
            "split": [{"pool": "chat", "weight": 90}, {"pool": "embed", "weight": 10}],
            "mirror": {"pool": "embed", "percent": 5},
        },
        {"model": "llama", "pool": "embed"},
    ]
    app = await start_proxy(proxy_config([pool("chat", [b0]), pool("embed", [b1])], routes=routes))
    status, body = await _get(app, "/api/v1/routes")
    assert status == 200
    split, by_model = body["routes"]
    assert split["pool"] is None
    assert split["split"] == [{"pool": "chat", "weight": 90}, {"pool": "embed", "weight": 10}]
    assert split["mirror"] == {"pool": "embed", "percent": 5.0}
    assert by_model["model"] == ["llama"] and by_model["pool"] == "embed"


async def test_config_redacts_the_admin_token_and_client_api_keys(backends, start_proxy):
    """GET /api/v1/config shows the running config with every secret replaced."""
    (b0,) = await backends(1)
    secret_key = "client-key-that-must-not-leak-42"
    config = proxy_config(
        [pool("chat", [b0])],
        routes=[{"path_prefix": "/", "pool": "chat", "auth": {"api_keys": [secret_key]}}],
    )
    config["admin"]["token"] = TOKEN
    app = await start_proxy(config)
    async with aiohttp.ClientSession() as s, s.get(admin(app, "/api/v1/config")) as resp:
        assert resp.status == 200
        text = await resp.text()
        body = await resp.json()
    assert TOKEN not in text
    assert secret_key not in text
    assert body["admin"]["token"] == "<redacted>"
    assert body["routes"][0]["auth"]["api_keys"] == "<redacted>"
    assert body["pools"][0]["backends"][0]["url"] == b0.url


# -- the admin token ----------------------------------------------------------------------------

# Each call changes the state in a visible way if it gets through. The file on disk holds an
# extra backend, so a reload that got through would show it.
MUTATIONS: dict[str, tuple[str, Any]] = {
    "drain": ("/api/v1/pools/chat/backends/b1/drain", None),
    "undrain": ("/api/v1/pools/chat/backends/b0/undrain", None),
    "weight": ("/api/v1/pools/chat/backends/b1/weight", {"weight": 7}),
    "reload": ("/api/v1/reload", None),
}
BAD_CREDENTIALS: dict[str, dict[str, str]] = {
    "no token": {},
    "wrong token": {"Authorization": "Bearer " + "f" * 32},
    "non-bearer scheme": {"Authorization": f"Basic {TOKEN}"},
    "token without a scheme": {"Authorization": TOKEN},
}


async def _guarded_proxy(
    backends: Callable[[int], Awaitable[list[Any]]], start_from_file: StartFromFile
) -> App:
    """A proxy with an admin token, b0 drained, and a config file that adds b2 on reload."""
    b0, b1, b2 = await backends(3)
    config = proxy_config([pool("chat", [b0, b1])])
    config["admin"]["token"] = TOKEN
    app, path = await start_from_file(config)
    status, _ = await _post(app, "/api/v1/pools/chat/backends/b0/drain", headers=AUTH)
    assert status == 200
    path.write_text(yaml.safe_dump(proxy_config_with(config, pool("chat", [b0, b1, b2]))))
    return app


def proxy_config_with(config: dict[str, Any], *pools: dict[str, Any]) -> dict[str, Any]:
    """``config`` with its pools replaced (listeners unchanged, so a reload may accept it)."""
    return {**config, "pools": list(pools)}


@pytest.mark.parametrize("credentials", list(BAD_CREDENTIALS), ids=list(BAD_CREDENTIALS))
@pytest.mark.parametrize("call", list(MUTATIONS))
async def test_a_mutating_call_without_the_admin_token_is_401_and_changes_nothing(
    backends, start_from_file, call, credentials
):
    """Drain, undrain, weight and reload without the right bearer token answer a JSON 401."""
    app = await _guarded_proxy(backends, start_from_file)
    before = _snapshot(await _state(app))
    path, body = MUTATIONS[call]
    status, answer = await _post(app, path, json=body, headers=BAD_CREDENTIALS[credentials])
    assert status == 401
    assert answer["error"]["type"] == "unauthorized"
    assert _snapshot(await _state(app)) == before


async def test_a_401_names_the_bearer_scheme_in_www_authenticate(backends, start_from_file):
    """RFC 9110 asks a 401 to say how to authenticate: ``WWW-Authenticate: Bearer``."""
    app = await _guarded_proxy(backends, start_from_file)
    async with (
        aiohttp.ClientSession() as s,
        s.post(admin(app, "/api/v1/reload")) as resp,
    ):
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"].startswith("Bearer ")


async def test_a_token_that_is_not_utf8_is_401_and_changes_nothing(backends, start_from_file):
    """An Authorization header with bytes that are not UTF-8 is a wrong token: a JSON 401."""
    app = await _guarded_proxy(backends, start_from_file)
    before = _snapshot(await _state(app))
    raw = await raw_exchange(
        app.admin_port,
        b"POST /api/v1/pools/chat/backends/b1/drain HTTP/1.1\r\nhost: admin\r\n"
        b"authorization: Bearer \xff\xfe\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
    )
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 401 "), raw[:200]
    assert json.loads(body)["error"]["type"] == "unauthorized"
    assert _snapshot(await _state(app)) == before


CHANGED: dict[str, Callable[[dict[str, Any]], bool]] = {
    "drain": lambda state: _backend(state, "chat", "b1")["drained"] is True,
    "undrain": lambda state: _backend(state, "chat", "b0")["drained"] is False,
    "weight": lambda state: _backend(state, "chat", "b1")["weight"] == 7,
    "reload": lambda state: _backend(state, "chat", "b2")["drained"] is False,
}


@pytest.mark.parametrize("call", list(MUTATIONS))
async def test_a_mutating_call_with_the_admin_token_takes_effect(backends, start_from_file, call):
    """Drain, undrain, weight and reload with ``Authorization: Bearer <token>`` do their job."""
    app = await _guarded_proxy(backends, start_from_file)
    path, body = MUTATIONS[call]
    status, _ = await _post(app, path, json=body, headers=AUTH)
    assert status == 200
    assert CHANGED[call](await _state(app))


async def test_reads_need_no_admin_token(backends, start_from_file):
    """GET calls are answered without a token even when one is configured."""
    app = await _guarded_proxy(backends, start_from_file)
    for path in ("/api/v1/state", "/api/v1/pools", "/api/v1/routes", "/api/v1/config"):
        status, _ = await _get(app, path)
        assert status == 200, path


# -- drain, undrain, weight ---------------------------------------------------------------------


async def test_draining_a_backend_lets_its_stream_finish_and_sends_new_requests_elsewhere(
    backends, start_proxy
):
    """A backend drained mid-stream finishes that stream intact and gets no new request."""
    b0, b1 = await backends(2)
    app = await start_proxy(proxy_config([pool("chat", [b0, b1])]))
    async with aiohttp.ClientSession() as s:
        stream = await s.get(url(app, "/stream?chunks=10&interval_ms=50"))
        holder = stream.headers["x-lb-backend"]
        first = await asyncio.wait_for(stream.content.readuntil(b";"), 5)
        status, drained = await _post(app, f"/api/v1/pools/chat/backends/{holder}/drain")
        assert status == 200
        assert (drained["drained"], drained["available"], drained["in_flight"]) == (True, False, 1)
        served = await _served_by(app, 10)
        rest = await asyncio.wait_for(stream.read(), 10)
        stream.release()
    other = "b1" if holder == "b0" else "b0"
    assert served == {other: 10}
    assert first + rest == b"".join(b"chunk-%d;" % i for i in range(10))
    assert _backend(await _state(app), "chat", holder)["drained"] is True


async def test_undraining_a_backend_returns_it_to_rotation(backends, start_proxy):
    """After undrain, a drained backend takes its share of new requests again."""
    b0, b1 = await backends(2)
    app = await start_proxy(proxy_config([pool("chat", [b0, b1])]))
    assert (await _post(app, "/api/v1/pools/chat/backends/b0/drain"))[0] == 200
    assert await _served_by(app, 4) == {"b1": 4}
    status, body = await _post(app, "/api/v1/pools/chat/backends/b0/undrain")
    assert status == 200
    assert (body["drained"], body["available"]) == (False, True)
    assert await _served_by(app, 10) == {"b0": 5, "b1": 5}


async def test_setting_a_weight_changes_the_share_of_traffic(backends, start_proxy):
    """POST weight 3 on b0 next to b1 at weight 1 gives b0 three requests in four."""
    b0, b1 = await backends(2)
    app = await start_proxy(proxy_config([pool("chat", [b0, b1])]))
    status, body = await _post(app, "/api/v1/pools/chat/backends/b0/weight", json={"weight": 3})
    assert status == 200
    assert body["weight"] == 3
    assert _backend(await _state(app), "chat", "b0")["weight"] == 3
    assert await _served_by(app, 40) == {"b0": 30, "b1": 10}


async def test_a_drained_backend_shows_on_metrics(backends, start_proxy):
    """Draining sets ``lb_backend_drained`` to 1 for that backend on /metrics."""
    b0, b1 = await backends(2)
    app = await start_proxy(proxy_config([pool("chat", [b0, b1])]))
    assert (await _post(app, "/api/v1/pools/chat/backends/b0/drain"))[0] == 200
    async with aiohttp.ClientSession() as s, s.get(admin(app, "/metrics")) as resp:
        text = await resp.text()
    assert 'lb_backend_drained{backend="b0",pool="chat"} 1.0' in text
    assert 'lb_backend_drained{backend="b1",pool="chat"} 0.0' in text


BAD_WEIGHT_BODIES: dict[str, dict[str, Any]] = {
    "not JSON": {"data": b"weight=3"},
    "no weight": {"json": {}},
    "a list": {"json": [3]},
    "zero": {"json": {"weight": 0}},
    "above 10000": {"json": {"weight": 10001}},
    "a bool": {"json": {"weight": True}},
    "a string": {"json": {"weight": "3"}},
    "a float": {"json": {"weight": 2.5}},
    "an array nested too deep to parse": {"data": b"[" * 100_000 + b"]" * 100_000},
    "an object nested too deep to parse": {"data": b'{"a":' * 50_000 + b"1" + b"}" * 50_000},
}


@pytest.mark.parametrize("body", list(BAD_WEIGHT_BODIES))
async def test_a_bad_weight_body_is_400_and_keeps_the_weight(backends, start_proxy, body):
    """A weight body that is not JSON ``{"weight": 1..10000}`` is refused and changes nothing."""
    (b0,) = await backends(1)
    app = await start_proxy(proxy_config([pool("chat", [b0])]))
    status, answer = await _post(
        app, "/api/v1/pools/chat/backends/b0/weight", **BAD_WEIGHT_BODIES[body]
    )
    assert status == 400
    assert answer["error"]["type"] == "bad_request"
    assert _backend(await _state(app), "chat", "b0")["weight"] == 1


# -- reload -------------------------------------------------------------------------------------


async def test_reload_picks_up_a_backend_added_to_the_file(backends, start_from_file):
    """POST /api/v1/reload re-reads the file: a backend added there appears in the state."""
    b0, b1 = await backends(2)
    config = proxy_config([pool("chat", [b0])])
    app, path = await start_from_file(config)
    path.write_text(yaml.safe_dump(proxy_config_with(config, pool("chat", [b0, b1]))))
    status, body = await _post(app, "/api/v1/reload")
    assert status == 200
    assert body == {"reloaded": True}
    state = await _state(app)
    assert [b["name"] for b in state["pools"][0]["backends"]] == ["b0", "b1"]
    assert await _served_by(app, 4) == {"b0": 2, "b1": 2}


async def test_a_reload_that_changes_no_strategy_keeps_what_it_learnt(backends, start_from_file):
    """``cache_aware`` keeps its prefix tree across a reload of the same pool (a prompt seen
    before still goes where it is cached); changing the pool's options builds it anew."""
    b0, b1, b2 = await backends(3)
    config = proxy_config([pool("chat", [b0, b1, b2], "cache_aware")])
    app, path = await start_from_file(config)
    prompts = [f"tenant {i}: " + "shared system prompt " * 20 for i in range(5)]

    async def place(prompt: str) -> tuple[str, str]:
        body = {"model": "m", "messages": [{"role": "user", "content": prompt}]}
        async with (
            aiohttp.ClientSession() as s,
            s.post(url(app, "/v1/chat/completions"), json=body) as resp,
        ):
            assert resp.status == 200
            return resp.headers["x-lb-backend"], resp.headers["x-lb-decision"]

    first = [(await place(p))[0] for p in prompts]
    learnt = app.proxy.pools["chat"].strategy
    path.write_text(yaml.safe_dump(config))
    assert await app.reload()
    assert app.proxy.pools["chat"].strategy is learnt
    again = [await place(p) for p in prompts]
    assert [backend for backend, _ in again] == first
    assert all("prefix match" in why for _, why in again)

    changed = proxy_config_with(
        config, pool("chat", [b0, b1, b2], "cache_aware", strategy_options={"cache_threshold": 0.6})
    )
    path.write_text(yaml.safe_dump(changed))
    assert await app.reload()
    assert app.proxy.pools["chat"].strategy is not learnt


async def test_a_reload_renaming_the_decision_header_is_obeyed(backends, start_from_file):
    """The decision texts the proxy keeps are per header name: after a reload renames the
    header, responses carry the new name and not the old one."""
    b0, b1 = await backends(2)
    config = proxy_config([pool("chat", [b0, b1])])
    app, path = await start_from_file(config)
    async with aiohttp.ClientSession() as s:
        async with s.get(url(app, "/a")) as resp:
            assert "x-lb-decision" in resp.headers
        path.write_text(yaml.safe_dump({**config, "headers": {"decision_header": "x-why"}}))
        assert await app.reload()
        async with s.get(url(app, "/b")) as resp:
            assert resp.headers["x-why"] == "round_robin: next in turn"
            assert "x-lb-decision" not in resp.headers


async def test_a_reload_lowering_the_idle_pool_closes_the_connections_beyond_it(
    backends, start_from_file
):
    """upstream.max_idle_per_backend applies to the connection pools a reload keeps, not
    only to new backends: lowered to 0, the pooled connections close."""
    (b0,) = await backends(1)
    config = proxy_config([pool("chat", [b0])])
    app, path = await start_from_file(config)
    await _served_by(app, 2)
    assert app.proxy is not None
    connections = app.proxy.pools["chat"].upstreams[app.proxy.pools["chat"].backends[0]]
    assert connections.idle_count >= 1
    path.write_text(yaml.safe_dump({**config, "upstream": {"max_idle_per_backend": 0}}))
    assert await app.reload()
    assert connections.idle_count == 0
    assert await _served_by(app, 1) == {"b0": 1}  # and nothing is kept after a request
    assert connections.idle_count == 0


async def test_a_reload_changes_the_log_level(backends, start_from_file):
    (b0,) = await backends(1)
    config = proxy_config([pool("chat", [b0])])
    app, path = await start_from_file(config)
    root = logging.getLogger()
    before = root.level
    try:
        path.write_text(yaml.safe_dump({**config, "log_level": "error"}))
        assert await app.reload()
        assert root.level == logging.ERROR
    finally:
        root.setLevel(before)


async def test_a_reload_may_change_the_admin_token_alone(backends, start_from_file):
    """The token is no listener setting: a new one applies at once, the old one stops."""
    (b0,) = await backends(1)
    config = proxy_config([pool("chat", [b0])])
    app, path = await start_from_file(config)
    new_token = "fedcba9876543210"
    path.write_text(yaml.safe_dump({**config, "admin": {**config["admin"], "token": new_token}}))
    assert await app.reload()
    drain = "/api/v1/pools/chat/backends/b0/drain"
    status, _ = await _post(app, drain, headers=ADMIN_AUTH)
    assert status == 401
    status, _ = await _post(app, drain, headers={"Authorization": f"Bearer {new_token}"})
    assert status == 200


async def test_a_reload_lowering_max_header_bytes_holds_on_open_connections(
    backends, start_from_file
):
    """A keep-alive connection opened before a reload that lowers ``max_header_bytes`` gets
    the new limit: its next oversized head is a 431."""
    (b0,) = await backends(1)
    config = proxy_config([pool("chat", [b0])], limits={"max_header_bytes": 65536})
    app, path = await start_from_file(config)
    reader, writer = await asyncio.open_connection("127.0.0.1", app.port)
    try:
        writer.write(b"GET /a HTTP/1.1\r\nHost: t\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        await asyncio.wait_for(reader.readexactly(length), 5)
        path.write_text(yaml.safe_dump({**config, "limits": {"max_header_bytes": 2048}}))
        assert await app.reload()
        writer.write(b"GET /b HTTP/1.1\r\nHost: t\r\nX-Pad: %s\r\n\r\n" % (b"p" * 8000))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 431"), head
    finally:
        writer.close()


async def test_a_drained_backend_stays_drained_across_a_reload(backends, start_from_file):
    """A backend kept by a reload keeps the operator's drain."""
    b0, b1, b2 = await backends(3)
    config = proxy_config([pool("chat", [b0, b1])])
    app, path = await start_from_file(config)
    assert (await _post(app, "/api/v1/pools/chat/backends/b0/drain"))[0] == 200
    path.write_text(yaml.safe_dump(proxy_config_with(config, pool("chat", [b0, b1, b2]))))
    assert (await _post(app, "/api/v1/reload"))[0] == 200
    assert _backend(await _state(app), "chat", "b0")["drained"] is True
    assert await _served_by(app, 4) == {"b1": 2, "b2": 2}


async def test_a_reload_turning_health_checks_off_brings_an_unhealthy_backend_back(
    backends, start_from_file
):
    """Without active checks no probe will ever pass a backend again: a reload that turns
    them off takes the backends as healthy (as Envoy does), not stuck out of the pool."""
    b0, b1 = await backends(2)
    checks = {"interval_s": 0.05, "unhealthy_threshold": 1, "jitter_percent": 0}
    config = proxy_config([pool("chat", [b0, b1], health_check=checks)])
    app, path = await start_from_file(config)
    b0.healthy = False
    await _until_unhealthy(app, "chat", "b0")
    off = proxy_config_with(config, pool("chat", [b0, b1], health_check={"enabled": False}))
    path.write_text(yaml.safe_dump(off))
    assert (await _post(app, "/api/v1/reload"))[0] == 200
    assert _backend(await _state(app), "chat", "b0")["healthy"] is True
    assert await _served_by(app, 4) == {"b0": 2, "b1": 2}


async def test_requests_queued_across_a_reload_that_keeps_the_backend_get_its_freed_slot(
    backends, start_from_file
):
    """One slot, held by a stream begun before a reload of the same file; requests queued
    before and after it are served as soon as the stream ends (the stream's end is told to
    the pool that replaced the one it began in), not left to the queue timeout."""
    (b0,) = await backends(1)
    admission = {"max_concurrency": 1, "max_queue": 10, "queue_timeout_s": 10}
    config = proxy_config([pool("chat", [b0], admission=admission)])
    app, _ = await start_from_file(config)
    async with aiohttp.ClientSession() as s:
        holding = await _hold_the_slot(s, app, b0)
        before = asyncio.create_task(_read(s, url(app, "/before")))
        await asyncio.sleep(0.1)
        assert (await _post(app, "/api/v1/reload"))[0] == 200
        after = asyncio.create_task(_read(s, url(app, "/after")))
        await asyncio.sleep(0.1)
        assert not before.done() and not after.done()
        loop = asyncio.get_running_loop()
        released = loop.time()
        b0.release.set()
        await asyncio.wait_for(holding, 5)
        served = await asyncio.wait_for(asyncio.gather(before, after), 5)
        assert loop.time() - released < 5.0  # the queue timeout is 10 s
    assert served == [(200, "b0"), (200, "b0")]


async def test_requests_queued_when_a_reload_replaces_the_backend_go_to_the_new_one(
    backends, start_from_file
):
    """One slot, held by a stream; three requests queue for it. A reload swaps the backend
    for another: the queued requests are served by the new one at once, and the removed one
    gets nothing more than the stream it holds."""
    old, new = await backends(2)
    admission = {"max_concurrency": 1, "max_queue": 10, "queue_timeout_s": 10}
    config = proxy_config([pool("chat", [old], admission=admission)])
    app, path = await start_from_file(config)
    async with aiohttp.ClientSession() as s:
        holding = await _hold_the_slot(s, app, old)
        queued = [asyncio.create_task(_read(s, url(app, f"/q{i}"))) for i in range(3)]
        await asyncio.sleep(0.2)
        assert not any(t.done() for t in queued)
        path.write_text(
            yaml.safe_dump(proxy_config_with(config, pool("chat", [new], admission=admission)))
        )
        assert (await _post(app, "/api/v1/reload"))[0] == 200
        served = await asyncio.wait_for(asyncio.gather(*queued), 5)
        old.release.set()
        await asyncio.wait_for(holding, 5)
    assert served == [(200, "b1")] * 3
    assert old.hits == 1


async def _until_unhealthy(app: App, pool_name: str, backend: str) -> None:
    """Wait (at most 10 s) until the proxy's health checks took ``backend`` out."""
    for _ in range(200):
        if not _backend(await _state(app), pool_name, backend)["healthy"]:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{pool_name}/{backend} still healthy after 10 s")


async def _hold_the_slot(
    session: aiohttp.ClientSession, app: App, backend: Any
) -> asyncio.Task[tuple[int, str]]:
    """A stream that holds ``backend``'s one slot until its ``release`` is set."""
    holding = asyncio.create_task(_read(session, url(app, "/stream?hold=1&chunks=1")))
    for _ in range(100):  # bounded: 5 s
        if backend.active:
            break
        await asyncio.sleep(0.05)
    return holding


async def _read(session: aiohttp.ClientSession, target: str) -> tuple[int, str]:
    async with session.get(target) as resp:
        await resp.read()
        return resp.status, resp.headers.get("x-lb-backend", "")


async def test_a_refused_reload_leaves_the_running_backends_as_they_were(backends, start_from_file):
    """A file that turns pool a's checks off but names an unknown strategy for pool b is
    refused: pool a's unhealthy backend stays out, and its pool keeps counting its load."""
    b0, b1, b2 = await backends(3)
    checks = {"interval_s": 0.05, "unhealthy_threshold": 1, "jitter_percent": 0}
    config = proxy_config([pool("a", [b0, b1], health_check=checks), pool("b", [b2])])
    app, path = await start_from_file(config)
    b0.healthy = False
    await _until_unhealthy(app, "a", "b0")
    running = app.proxy.pools["a"]
    refused = proxy_config_with(
        config,
        pool("a", [b0, b1], health_check={"enabled": False}),
        pool("b", [b2], "no_such_strategy"),
    )
    path.write_text(yaml.safe_dump(refused))
    assert (await _post(app, "/api/v1/reload"))[0] == 400
    assert app.proxy.pools["a"] is running
    assert _backend(await _state(app), "a", "b0")["healthy"] is False
    assert all(b.pool_load is running.load for b in running.backends)
    assert await _served_by(app, 4) == {"b1": 4}


INVALID_FILES: dict[str, Callable[[dict[str, Any]], str]] = {
    "bad YAML": lambda config: "pools: [\n",
    "route to a missing pool": lambda config: yaml.safe_dump(
        {**config, "routes": [{"path_prefix": "/", "pool": "nope"}]}
    ),
    "moved listener": lambda config: yaml.safe_dump(
        {**config, "listen": {"host": "127.0.0.1", "port": free_port()}}
    ),
}
# What the 400 says of each: the key and the reason, as start-up would.
INVALID_REASONS = {
    "bad YAML": "invalid YAML",
    "route to a missing pool": "routes[0].pool: no pool named 'nope'",
    "moved listener": "listen: listeners cannot change on reload",
}


@pytest.mark.parametrize("invalid", list(INVALID_FILES))
async def test_reload_of_an_invalid_file_is_400_and_changes_nothing(
    backends, start_from_file, invalid
):
    """A file that fails to load or validate is refused; pools, routes and config stay."""
    b0, b1 = await backends(2)
    config = proxy_config([pool("chat", [b0])])
    app, path = await start_from_file(config)
    before_state = _snapshot(await _state(app))
    before_config = await _get(app, "/api/v1/config")
    path.write_text(INVALID_FILES[invalid](proxy_config_with(config, pool("chat", [b0, b1]))))
    status, body = await _post(app, "/api/v1/reload")
    assert status == 400
    assert body["error"]["type"] == "invalid_config"
    assert INVALID_REASONS[invalid] in body["error"]["message"]
    assert _snapshot(await _state(app)) == before_state
    assert await _get(app, "/api/v1/config") == before_config
    assert await _served_by(app, 3) == {"b0": 3}


# -- the OpenAPI description --------------------------------------------------------------------


async def _spec(app: App) -> dict[str, Any]:
    status, spec = await _get(app, "/openapi.json")
    assert status == 200
    return spec  # type: ignore[no-any-return]


def _served_routes(app: App) -> set[tuple[str, str]]:
    """(path template, method) of every route the admin aiohttp app serves, HEAD aside."""
    assert app._admin is not None
    served = set()
    for route in app._admin.app.router.routes():
        canonical = route.resource.canonical if route.resource is not None else ""
        if route.method != "HEAD":
            served.add((canonical, route.method.lower()))
    return served


def _described_routes(spec: dict[str, Any]) -> set[tuple[str, str]]:
    return {
        (path, method)
        for path, item in spec["paths"].items()
        for method in item
        if method in HTTP_METHODS
    }


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


async def test_openapi_json_is_a_structurally_valid_openapi_3_1_document(backends, start_proxy):
    """/openapi.json has openapi 3.1.x, info, paths whose operations all describe responses,
    and every $ref resolves inside the document."""
    (b0,) = await backends(1)
    app = await start_proxy(proxy_config([pool("chat", [b0])]))
    spec = await _spec(app)
    assert spec["openapi"].startswith("3.1.")
    assert spec["info"]["title"]
    assert spec["info"]["version"]
    assert spec["paths"]
    for path, item in spec["paths"].items():
        assert path.startswith("/")
        for method, op in item.items():
            assert method in HTTP_METHODS, (path, method)
            assert op["responses"], (path, method)
            for param in op.get("parameters", []):
                assert param["in"] != "path" or "{" + param["name"] + "}" in path
    schemes = spec.get("components", {}).get("securitySchemes", {})
    for ref in _refs(spec):
        node: Any = spec
        assert ref.startswith("#/"), ref
        for part in ref[2:].split("/"):
            node = node[part]
    for item in spec["paths"].values():
        for op in item.values():
            for requirement in op.get("security", []):
                assert set(requirement) <= set(schemes)


async def test_every_admin_api_route_is_described_in_openapi_json(backends, start_proxy):
    """Each method and path the admin app serves under /api/v1 appears in the spec's paths."""
    (b0,) = await backends(1)
    app = await start_proxy(proxy_config([pool("chat", [b0])]))
    served = {r for r in _served_routes(app) if r[0].startswith("/api/v1/")}
    assert len(served) >= 9
    assert served <= _described_routes(await _spec(app))


async def test_every_path_in_openapi_json_is_served(backends, start_proxy):
    """Each method and path the spec describes is a route of the admin app."""
    (b0,) = await backends(1)
    app = await start_proxy(proxy_config([pool("chat", [b0])]))
    assert _described_routes(await _spec(app)) <= _served_routes(app)


async def test_mutating_operations_are_marked_as_needing_the_bearer_token(backends, start_proxy):
    """Every POST in the spec declares the bearer security scheme and a 401 answer."""
    (b0,) = await backends(1)
    app = await start_proxy(proxy_config([pool("chat", [b0])]))
    spec = await _spec(app)
    posts = [item["post"] for item in spec["paths"].values() if "post" in item]
    assert posts
    for op in posts:
        assert op["security"] == [{"bearer": []}]
        assert "401" in op["responses"]


# -- the token in the configuration ------------------------------------------------------------


def _public_admin_config() -> dict[str, Any]:
    config = proxy_config([{"name": "chat", "backends": [{"url": "http://127.0.0.1:9"}]}])
    config["admin"]["host"] = "0.0.0.0"
    del config["admin"]["token"]
    return config


def test_an_admin_listener_off_loopback_without_a_token_is_a_config_error(monkeypatch):
    """admin.host 0.0.0.0 with no admin.token and no LB_ADMIN_TOKEN fails at admin.token."""
    monkeypatch.delenv("LB_ADMIN_TOKEN", raising=False)
    with pytest.raises(ConfigError) as info:
        parse_config(_public_admin_config(), "test")
    assert info.value.key == "admin.token"
    assert "admin.token" in str(info.value)


def test_a_short_admin_token_is_accepted(monkeypatch):
    """Any non-empty token is a token; its strength is the operator's to choose."""
    monkeypatch.delenv("LB_ADMIN_TOKEN", raising=False)
    raw = _public_admin_config()
    raw["admin"]["token"] = "secret"
    assert parse_config(raw, "test").admin.token == "secret"


async def test_with_no_admin_token_configured_every_mutating_call_is_401(
    backends, start_proxy, monkeypatch
):
    """On loopback without any token the proxy starts, but nothing can change it."""
    monkeypatch.delenv("LB_ADMIN_TOKEN", raising=False)
    (b0,) = await backends(1)
    config = proxy_config([pool("chat", [b0])])
    del config["admin"]["token"]
    app = await start_proxy(config)
    for path in ("/api/v1/pools/chat/backends/b0/drain", "/api/v1/reload"):
        status, body = await _post(app, path, headers=ADMIN_AUTH)
        assert status == 401, path
        assert "LB_ADMIN_TOKEN" in body["error"]["message"]
    assert _backend(await _state(app), "chat", "b0")["drained"] is False


def test_an_admin_listener_off_loopback_accepts_the_token_from_the_environment(monkeypatch):
    """LB_ADMIN_TOKEN in the environment satisfies the token requirement."""
    monkeypatch.setenv("LB_ADMIN_TOKEN", TOKEN)
    config = parse_config(_public_admin_config(), "test")
    assert config.admin.host == "0.0.0.0"


def test_an_admin_listener_off_loopback_accepts_a_token_in_the_file(monkeypatch):
    """admin.token in the file satisfies the token requirement."""
    monkeypatch.delenv("LB_ADMIN_TOKEN", raising=False)
    raw = _public_admin_config()
    raw["admin"]["token"] = TOKEN
    assert parse_config(raw, "test").admin.token == TOKEN


async def test_a_pools_backends_are_listed_and_one_is_read_by_its_name(backends, start_proxy):
    """GET .../backends lists the pool's backends, GET .../backends/{name} shows one; both
    with the same fields as the pool's own state."""
    b0, b1 = await backends(2)
    app = await start_proxy(proxy_config([pool("chat", [b0, b1])]))
    status, listed = await _get(app, "/api/v1/pools/chat/backends")
    assert status == 200
    assert [b["name"] for b in listed["backends"]] == ["b0", "b1"]
    status, one = await _get(app, "/api/v1/pools/chat/backends/b1")
    assert status == 200
    assert one == _backend(await _state(app), "chat", "b1") | {
        k: one[k] for k in VOLATILE_BACKEND_FIELDS if k in one
    }
    status, missing = await _get(app, "/api/v1/pools/chat/backends/nope")
    assert (status, missing["error"]["type"]) == (404, "not_found")


@pytest.mark.parametrize("path", ["/api/v1/nothing-here", "/nope"])
async def test_an_unknown_admin_path_is_a_json_404(backends, start_proxy, path):
    (b0,) = await backends(1)
    app = await start_proxy(proxy_config([pool("chat", [b0])]))
    status, body = await _get(app, path)
    assert (status, body["error"]["type"]) == (404, "not_found")


async def test_the_admin_root_leads_to_the_dashboard(backends, start_proxy):
    (b0,) = await backends(1)
    app = await start_proxy(proxy_config([pool("chat", [b0])]))
    async with aiohttp.ClientSession() as s:
        for path in ("/", "/dashboard/"):
            async with s.get(admin(app, path), allow_redirects=False) as resp:
                assert (resp.status, resp.headers["Location"]) == (302, "/dashboard")


async def test_a_backends_own_5xx_is_listed_among_the_pools_recent_errors(backends, start_proxy):
    """A 500 the backend answered (passed on, no retry) shows in recent errors with its
    backend and status, next to the errors the proxy makes itself."""
    (b0,) = await backends(1)
    app = await start_proxy(proxy_config([pool("chat", [b0], retry={"max_retries": 0})]))
    async with aiohttp.ClientSession() as s, s.get(url(app, "/status/500")) as resp:
        assert resp.status == 500
    status, chat = await _get(app, "/api/v1/pools/chat")
    assert status == 200
    (error,) = chat["recent_errors"]
    assert (error["backend"], error["status"], error["type"]) == ("b0", 500, "backend_status")


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /healthz HTTP/9.9\r\nHost: a\r\n\r\n",
        b"POST /healthz HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: a\r\nX-Big: " + b"x" * 100_000 + b"\r\n\r\n",
    ],
    ids=["bad-version", "length-and-chunked", "huge-header"],
)
async def test_a_malformed_request_to_the_admin_listener_logs_no_error(
    backends, start_proxy, caplog, request_bytes
):
    """A 400 for the client's own malformed request is no error of the proxy's: no error
    record and no traceback, so a client cannot flood the log with them."""
    (b0,) = await backends(1)
    app = await start_proxy(proxy_config([pool("chat", [b0])]))
    with caplog.at_level(logging.INFO):
        raw = await raw_exchange(app.admin_port, request_bytes, read_timeout_s=2)
    assert raw.startswith(b"HTTP/1.") and b" 400 " in raw.split(b"\r\n", 1)[0], raw[:100]
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert all(r.exc_info is None for r in caplog.records)


def test_an_admin_token_of_whitespace_alone_is_no_token(monkeypatch):
    """Off loopback, a token of spaces (or a file's lone newline) does not pass for one."""
    monkeypatch.setenv("LB_ADMIN_TOKEN", " \n")
    with pytest.raises(ConfigError) as info:
        parse_config(_public_admin_config(), "test")
    assert info.value.key == "admin.token"


async def test_a_token_with_a_final_newline_still_matches_its_header(
    backends, start_proxy, monkeypatch
):
    """LB_ADMIN_TOKEN read from a file keeps its newline; the header's value has none: the
    token is taken without its surrounding whitespace, so the call goes through."""
    monkeypatch.setenv("LB_ADMIN_TOKEN", ADMIN_TOKEN + "\n")
    (b0,) = await backends(1)
    config = proxy_config([pool("chat", [b0])])
    del config["admin"]["token"]
    app = await start_proxy(config)
    status, _ = await _post(app, "/api/v1/pools/chat/backends/b0/drain", headers=ADMIN_AUTH)
    assert status == 200
    assert _backend(await _state(app), "chat", "b0")["drained"] is True
