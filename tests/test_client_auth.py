"""Client API keys on a route: 401 before any backend sees the request, the key header kept from
the backend (unless ``forward_key``), keys from the environment, and keys kept out of logs."""

from __future__ import annotations

import io
import json
import logging
from typing import Any

import aiohttp
import pytest

from lb.access_log import AccessLogger
from lb.app import App
from lb.config import ConfigError, parse_config
from tests.conftest import pool, proxy_config, raw_exchange, url

KEY = "k-123456"


def _config(backends: list[Any], **auth: Any) -> dict[str, Any]:
    """One pool; ``/open/`` needs no key, everything else needs one of ``auth``'s keys."""
    return proxy_config(
        [pool("chat", backends)],
        routes=[
            {"path_prefix": "/open/", "pool": "chat"},
            {"path_prefix": "/", "pool": "chat", "auth": auth or {"api_keys": [KEY]}},
        ],
    )


async def _echo(app: App, headers: dict[str, str], path: str = "/v1/echo") -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s, s.get(url(app, path), headers=headers) as resp:
        return resp.status, await resp.json()


def _header_names(echo: dict[str, Any]) -> set[str]:
    return {name.lower() for name, _ in echo["headers"]}


async def test_a_request_without_a_key_is_401_and_never_reaches_a_backend(backends, start_proxy):
    """No key: a JSON 401 of type unauthorized with WWW-Authenticate, and zero backend hits."""
    (b0,) = await backends(1)
    app = await start_proxy(_config([b0]))
    async with aiohttp.ClientSession() as s, s.post(url(app, "/v1/chat"), data=b"{}") as resp:
        assert resp.status == 401
        assert resp.content_type == "application/json"
        assert resp.headers["www-authenticate"].startswith("Bearer")
        body = await resp.json()
    assert body["error"]["type"] == "unauthorized"
    assert body["error"]["message"]
    assert b0.hits == 0


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": "Bearer k-654321"},
        {"api-key": "k-654321"},
        {"Authorization": f"Basic {KEY}"},
        {"Authorization": KEY},
        {"Authorization": "Bearer "},
    ],
    ids=["wrong bearer", "wrong api-key", "basic scheme", "no scheme", "empty bearer"],
)
async def test_a_wrong_key_is_401_and_never_reaches_a_backend(backends, start_proxy, headers):
    """A key that is not accepted, or not presented as Bearer or api-key, is answered 401."""
    (b0,) = await backends(1)
    app = await start_proxy(_config([b0]))
    status, body = await _echo(app, headers)
    assert status == 401
    assert body["error"]["type"] == "unauthorized"
    assert b0.hits == 0


async def test_a_key_that_is_not_utf8_is_401(backends, start_proxy):
    """A key header holding bytes that are not UTF-8 is a wrong key, answered 401."""
    (b0,) = await backends(1)
    app = await start_proxy(_config([b0]))
    raw = await raw_exchange(
        app.port,
        b"GET /v1/echo HTTP/1.1\r\nhost: lb\r\napi-key: k-\xff\xfe\r\nconnection: close\r\n\r\n",
    )
    assert raw.startswith(b"HTTP/1.1 401 "), raw[:200]
    assert b0.hits == 0


async def test_a_bearer_key_is_accepted(backends, start_proxy):
    """``Authorization: Bearer KEY`` with an accepted key is forwarded and answered 200."""
    (b0,) = await backends(1)
    app = await start_proxy(_config([b0]))
    status, _ = await _echo(app, {"Authorization": f"Bearer {KEY}"})
    assert status == 200
    assert b0.hits == 1


async def test_an_api_key_header_is_accepted(backends, start_proxy):
    """``api-key: KEY`` with an accepted key is forwarded and answered 200."""
    (b0,) = await backends(1)
    app = await start_proxy(_config([b0]))
    status, _ = await _echo(app, {"api-key": KEY})
    assert status == 200
    assert b0.hits == 1


@pytest.mark.parametrize(
    ("header", "value"), [("Authorization", f"Bearer {KEY}"), ("api-key", KEY)]
)
async def test_the_key_header_is_not_forwarded_to_the_backend(backends, start_proxy, header, value):
    """By default the header carrying the client's key is removed before forwarding."""
    (b0,) = await backends(1)
    app = await start_proxy(_config([b0]))
    status, echo = await _echo(app, {header: value, "x-other": "kept"})
    assert status == 200
    assert header.lower() not in _header_names(echo)
    assert "x-other" in _header_names(echo)
    assert KEY not in str(echo["headers"])


@pytest.mark.parametrize(
    ("header", "value"), [("Authorization", f"Bearer {KEY}"), ("api-key", KEY)]
)
async def test_the_key_header_is_forwarded_with_forward_key(backends, start_proxy, header, value):
    """With ``forward_key: true`` the backend receives the client's key header unchanged."""
    (b0,) = await backends(1)
    app = await start_proxy(_config([b0], api_keys=[KEY], forward_key=True))
    status, echo = await _echo(app, {header: value})
    assert status == 200
    assert [header.lower(), value] in [[n.lower(), v] for n, v in echo["headers"]]


@pytest.mark.parametrize("key", ["a-1", "b-2"])
async def test_keys_from_api_keys_env_are_accepted(backends, start_proxy, monkeypatch, key):
    """Every comma-separated key in the variable named by ``api_keys_env`` is accepted."""
    monkeypatch.setenv("MY_KEYS", "a-1,b-2")
    (b0,) = await backends(1)
    app = await start_proxy(_config([b0], api_keys_env="MY_KEYS"))
    status, _ = await _echo(app, {"Authorization": f"Bearer {key}"})
    assert status == 200
    status, _ = await _echo(app, {"Authorization": "Bearer a-1,b-2"})
    assert status == 401


async def test_keys_from_the_list_and_the_environment_are_both_accepted(
    backends, start_proxy, monkeypatch
):
    """``api_keys`` and ``api_keys_env`` add up: a key from either one is accepted."""
    monkeypatch.setenv("MY_KEYS", "a-1")
    (b0,) = await backends(1)
    app = await start_proxy(_config([b0], api_keys=[KEY], api_keys_env="MY_KEYS"))
    assert (await _echo(app, {"api-key": KEY}))[0] == 200
    assert (await _echo(app, {"api-key": "a-1"}))[0] == 200


async def test_a_route_without_auth_needs_no_key(backends, start_proxy):
    """A request matching a route that has no ``auth`` is forwarded without any key."""
    (b0,) = await backends(1)
    app = await start_proxy(_config([b0]))
    status, echo = await _echo(app, {}, path="/open/echo")
    assert status == 200
    assert echo["path"] == "/open/echo"


async def test_the_key_never_appears_in_the_access_log(backends, start_proxy):
    """Requests with a right and with a wrong key leave neither key in the access log."""
    (b0,) = await backends(1)
    wrong = "k-wrong-98765"
    app = await start_proxy(_config([b0]))
    assert app.proxy is not None
    buf = io.StringIO()
    app.proxy.access_log = AccessLogger(stream=buf)
    assert (await _echo(app, {"Authorization": f"Bearer {KEY}"}))[0] == 200
    assert (await _echo(app, {"api-key": KEY}))[0] == 200
    assert (await _echo(app, {"Authorization": f"Bearer {wrong}"}))[0] == 401
    app.proxy.access_log.flush()
    text = buf.getvalue()
    assert len(text.splitlines()) == 3
    assert KEY not in text
    assert wrong not in text


async def test_the_key_never_appears_in_any_log_record(backends, start_proxy, caplog):
    """At DEBUG, no log record of a run with right and wrong keys mentions either key."""
    caplog.set_level(logging.DEBUG)
    (b0,) = await backends(1)
    wrong = "k-wrong-98765"
    app = await start_proxy(_config([b0]))
    assert (await _echo(app, {"Authorization": f"Bearer {KEY}"}))[0] == 200
    assert (await _echo(app, {"api-key": wrong}))[0] == 401
    await app.shutdown()
    assert caplog.records
    for record in caplog.records:
        text = record.getMessage() + repr(vars(record))
        assert KEY not in text
        assert wrong not in text


@pytest.mark.parametrize(
    "auth",
    [{"api_keys": []}, {"api_keys_env": "LB_TEST_UNSET_KEYS"}, {}],
    ids=["empty list", "unset env var", "nothing"],
)
def test_a_route_requiring_keys_with_no_keys_at_all_is_a_config_error(monkeypatch, auth):
    """``auth`` that yields no key is refused at ``routes[0].auth``."""
    monkeypatch.delenv("LB_TEST_UNSET_KEYS", raising=False)
    raw = proxy_config(
        [{"name": "chat", "backends": [{"url": "http://127.0.0.1:9"}]}],
        routes=[{"path_prefix": "/", "pool": "chat", "auth": auth}],
    )
    with pytest.raises(ConfigError) as info:
        parse_config(raw, "test")
    assert info.value.key == "routes[0].auth"


def test_an_empty_api_key_in_the_list_is_a_config_error():
    """A blank string among ``api_keys`` is refused rather than silently accepted."""
    raw = proxy_config(
        [{"name": "chat", "backends": [{"url": "http://127.0.0.1:9"}]}],
        routes=[{"path_prefix": "/", "pool": "chat", "auth": {"api_keys": [KEY, " "]}}],
    )
    with pytest.raises(ConfigError) as info:
        parse_config(raw, "test")
    assert info.value.key.startswith("routes[0].auth.api_keys")


def _model_config(backends: list[Any]) -> dict[str, Any]:
    """A model route and the proxy's /v1/models, both behind a key."""
    cfg = proxy_config(
        [{**pool("chat", backends), "models": ["m1"]}],
        routes=[{"model": "m1", "pool": "chat", "auth": {"api_keys": [KEY]}},
                {"path_prefix": "/", "pool": "chat", "auth": {"api_keys": [KEY]}}],
    )  # fmt: skip
    return cfg


async def test_a_model_route_refuses_a_missing_key_before_reading_the_body(backends, start_proxy):
    """Without a key, a request whose body would be read for its model is 401 at once."""
    (b0,) = await backends(1)
    app = await start_proxy(_model_config([b0]))
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Length: 100000\r\n\r\n"
    out = await raw_exchange(app.port, head + b"{", read_timeout_s=2)
    assert out.startswith(b"HTTP/1.1 401 ")
    assert b0.hits == 0


async def test_the_proxys_model_list_needs_the_key_its_routes_need(backends, start_proxy):
    """GET /v1/models answered by the proxy is not an open door past the routes' keys."""
    (b0,) = await backends(1)
    app = await start_proxy(_model_config([b0]))
    async with aiohttp.ClientSession() as s:
        async with s.get(url(app, "/v1/models")) as resp:
            assert resp.status == 401
        async with s.get(url(app, "/v1/models"), headers={"api-key": KEY}) as resp:
            assert resp.status == 200
            assert [m["id"] for m in (await resp.json())["data"]] == ["m1"]


@pytest.mark.parametrize(
    "path", [b"/open/../v1/echo", b"/%6fpen/x/../../v1/echo", b"/open/%2e%2e/v1/echo"]
)
async def test_a_path_that_normalizes_onto_a_guarded_route_needs_its_key(
    backends, start_proxy, path
):
    """Dot segments and encoded letters are resolved before routes match (raw bytes on the
    wire, no client library to tidy them): a path that looks like the open route but is the
    guarded one needs the key, reaches no backend without it, and the backend sees it tidied."""
    (b0,) = await backends(1)
    app = await start_proxy(_config([b0]))
    head = b"GET %s HTTP/1.1\r\nHost: t\r\nConnection: close\r\n" % path
    refused = await raw_exchange(app.port, head + b"\r\n")
    assert refused.startswith(b"HTTP/1.1 401 "), refused
    assert b0.hits == 0
    served = await raw_exchange(app.port, head + b"Authorization: Bearer %s\r\n\r\n" % KEY.encode())
    assert served.startswith(b"HTTP/1.1 200 "), served
    assert json.loads(served.partition(b"\r\n\r\n")[2])["path"] == "/v1/echo"
