"""Routing by the model a request's JSON body names, and ``GET /v1/models`` answered by the
proxy, with real simulated model servers and echo backends behind a real proxy on 127.0.0.1."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from backends.sim import SimServer, start_sim
from tests.conftest import free_port, pool, proxy_config, url

CHAT = "/v1/chat/completions"
FAST: dict[str, Any] = {"decode_ms": 1, "ttft_ms": 1, "max_batch": 64}
MODEL_ROUTES = [
    {"model": "llama", "pool": "a"},
    {"model": ["mistral", "mistral-large"], "pool": "b"},
]

SimFactory = Callable[..., Awaitable[SimServer]]


@pytest.fixture
async def sim() -> AsyncIterator[SimFactory]:
    """Factory: ``await sim(model)`` starts one fast simulated server serving ``model``."""
    started: list[SimServer] = []

    async def start(model: str, **knobs: Any) -> SimServer:
        server = await start_sim(model=model, **{**FAST, **knobs})
        started.append(server)
        return server

    yield start
    for server in started:
        await server.close()


def chat_body(model: str, text: str = "Hello") -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 2}


async def post_chat(session: aiohttp.ClientSession, app: Any, model: str) -> tuple[int, Any]:
    async with session.post(url(app, CHAT), json=chat_body(model)) as resp:
        return resp.status, await resp.json()


async def list_models(session: aiohttp.ClientSession, app: Any) -> tuple[int, Any]:
    async with session.get(url(app, "/v1/models")) as resp:
        return resp.status, await resp.json()


async def test_chat_requests_go_to_the_pool_serving_the_model_their_body_names(sim, start_proxy):
    """``llama`` goes to pool a and both ``mistral`` names go to pool b, whatever the order."""
    llama, mistral = await sim("llama"), await sim("mistral")
    app = await start_proxy(
        proxy_config([pool("a", [llama]), pool("b", [mistral])], routes=MODEL_ROUTES)
    )
    asked = ["mistral", "llama", "mistral-large", "llama", "mistral"]
    async with aiohttp.ClientSession() as s:
        answered_by = []
        for model in asked:
            status, got = await post_chat(s, app, model)
            assert status == 200
            answered_by.append(got["model"])  # each sim names the model it serves
    assert answered_by == ["mistral", "llama", "mistral", "llama", "mistral"]
    assert (llama.requests_by_path[CHAT], mistral.requests_by_path[CHAT]) == (2, 3)


async def test_the_body_of_a_model_routed_request_is_forwarded_byte_for_byte(backends, start_proxy):
    """The body read for routing reaches the backend unchanged: whitespace, order, escapes."""
    b0, b1 = await backends(2)
    app = await start_proxy(proxy_config([pool("a", [b0]), pool("b", [b1])], routes=MODEL_ROUTES))
    body = (
        b'{  "messages" : [ {"role":"user","content":"caf\\u00e9 \xe2\x98\x95 '
        + b"x" * 5000
        + b'"} ],\n\t"model":"mistral-large" , "extra": [1, 2.50, null] }'
    )
    async with (
        aiohttp.ClientSession() as s,
        s.post(url(app, CHAT), data=body, headers={"content-type": "application/json"}) as resp,
    ):
        assert resp.status == 200
        got = await resp.json()
    assert got["backend"] == "b1"
    assert got["body_len"] == len(body)
    assert got["body_sha256"] == hashlib.sha256(body).hexdigest()


async def test_a_chunked_body_is_routed_by_its_model_and_forwarded_intact(backends, start_proxy):
    """A request body sent chunked, in several pieces, is read for its model and forwarded whole."""
    b0, b1 = await backends(2)
    app = await start_proxy(proxy_config([pool("a", [b0]), pool("b", [b1])], routes=MODEL_ROUTES))
    body = json.dumps(chat_body("llama", "y" * 20000)).encode()

    async def pieces() -> AsyncIterable[bytes]:
        for start in range(0, len(body), 4096):
            yield body[start : start + 4096]

    async with aiohttp.ClientSession() as s, s.post(url(app, CHAT), data=pieces()) as resp:
        assert resp.status == 200
        got = await resp.json()
    assert got["backend"] == "b0"
    assert got["body_sha256"] == hashlib.sha256(body).hexdigest()


async def test_a_body_that_is_not_json_on_a_model_route_is_a_400_and_reaches_no_backend(
    backends, start_proxy
):
    """A model route cannot read a model from a body that is not JSON: 400, nothing forwarded."""
    b0, b1 = await backends(2)
    app = await start_proxy(proxy_config([pool("a", [b0]), pool("b", [b1])], routes=MODEL_ROUTES))
    not_json = b'{"model": "llama", oops'
    async with aiohttp.ClientSession() as s, s.post(url(app, CHAT), data=not_json) as resp:
        assert resp.status == 400
        assert resp.headers["content-type"].startswith("application/json")
        got = await resp.json()
    assert got["error"]["type"] == "bad_request"
    assert "JSON" in got["error"]["message"]
    assert (b0.hits, b1.hits) == (0, 0)


async def test_a_model_no_route_serves_is_a_404_in_the_openai_error_shape(backends, start_proxy):
    """An unserved model is answered 404 with OpenAI's ``model_not_found`` code and ``model``
    param, and reaches no backend."""
    b0, b1 = await backends(2)
    app = await start_proxy(proxy_config([pool("a", [b0]), pool("b", [b1])], routes=MODEL_ROUTES))
    async with aiohttp.ClientSession() as s:
        status, got = await post_chat(s, app, "gpt-unknown")
    assert status == 404
    error = got["error"]
    assert error["code"] == "model_not_found"
    assert error["param"] == "model"
    assert error["type"] == "invalid_request_error"
    assert "gpt-unknown" in error["message"]
    assert (b0.hits, b1.hits) == (0, 0)


async def test_the_openai_sdk_raises_not_found_for_a_model_no_route_serves(backends, start_proxy):
    """The official ``openai`` SDK turns the proxy's answer into its ``NotFoundError``."""
    openai = pytest.importorskip("openai")
    b0, b1 = await backends(2)
    app = await start_proxy(proxy_config([pool("a", [b0]), pool("b", [b1])], routes=MODEL_ROUTES))
    async with openai.AsyncOpenAI(
        base_url=url(app, "/v1"), api_key="test-key", max_retries=0, timeout=10.0
    ) as client:
        with pytest.raises(openai.NotFoundError) as caught:
            await client.chat.completions.create(
                model="gpt-unknown", messages=[{"role": "user", "content": "Hi"}]
            )
    assert caught.value.status_code == 404
    assert caught.value.code == "model_not_found"
    assert caught.value.param == "model"


async def test_a_get_without_a_body_matches_a_route_that_names_no_model(backends, start_proxy):
    """Model routes are skipped for a request with no body, which falls to a plain route."""
    b0, b1, b2 = await backends(3)
    routes = [*MODEL_ROUTES, {"path_prefix": "/", "pool": "c"}]
    app = await start_proxy(
        proxy_config([pool("a", [b0]), pool("b", [b1]), pool("c", [b2])], routes=routes)
    )
    async with aiohttp.ClientSession() as s, s.get(url(app, "/v1/files")) as resp:
        assert resp.status == 200
        got = await resp.json()
    assert got["backend"] == "b2"
    assert (b0.hits, b1.hits, b2.hits) == (0, 0, 1)


async def test_a_body_that_is_not_json_goes_to_a_later_route_that_names_no_model(
    backends, start_proxy
):
    """A multipart upload (``/v1/audio/transcriptions``) cannot name a model in JSON, but a
    catch-all route takes it: forwarded whole there, not refused for the model routes' sake."""
    b0, b1, b2 = await backends(3)
    routes = [*MODEL_ROUTES, {"path_prefix": "/", "pool": "c"}]
    app = await start_proxy(
        proxy_config([pool("a", [b0]), pool("b", [b1]), pool("c", [b2])], routes=routes)
    )
    form = aiohttp.FormData()
    form.add_field("model", "whisper-1")
    form.add_field("file", b"RIFF" + b"\0" * 2000, filename="a.wav")
    async with (
        aiohttp.ClientSession() as s,
        s.post(url(app, "/v1/audio/transcriptions"), data=form) as resp,
    ):
        assert resp.status == 200
        got = await resp.json()
    assert got["backend"] == "b2"
    assert (b0.hits, b1.hits, b2.hits) == (0, 0, 1)


async def test_a_body_too_large_to_read_goes_to_a_later_route_that_names_no_model(
    backends, start_proxy
):
    """An upload past ``max_inspect_bytes`` cannot be read for a model, but a catch-all route
    takes it, whole; only where no route would is it a 413."""
    b0, b1, b2 = await backends(3)
    routes = [*MODEL_ROUTES, {"path_prefix": "/", "pool": "c"}]
    app = await start_proxy(
        proxy_config(
            [pool("a", [b0]), pool("b", [b1]), pool("c", [b2])],
            routes=routes,
            limits={"max_inspect_bytes": 4096},
        )
    )
    upload = b"RIFF" + b"\0" * 20000
    async with aiohttp.ClientSession() as s, s.post(url(app, CHAT), data=upload) as resp:
        assert resp.status == 200
        got = await resp.json()
    assert (got["backend"], got["body_len"]) == ("b2", len(upload))


@pytest.mark.parametrize(
    ("body", "code", "message"),
    [
        (b"", "model_missing", "you must provide a model parameter"),
        (b'{"model": 7}', "model_missing", "'model' must be a string (got a number)"),
    ],
)
async def test_an_empty_body_or_a_model_that_is_no_string_is_an_openai_400_on_a_model_route(
    backends, start_proxy, body: bytes, code: str, message: str
):
    """Where only model routes match, an empty POST asks for a model as ``{}`` does, and a
    model of the wrong type is named as such, not taken for a missing one."""
    b0, b1 = await backends(2)
    app = await start_proxy(proxy_config([pool("a", [b0]), pool("b", [b1])], routes=MODEL_ROUTES))
    headers = {"content-type": "application/json"}
    async with (
        aiohttp.ClientSession() as s,
        s.post(url(app, CHAT), data=body, headers=headers) as resp,
    ):
        assert resp.status == 400
        error = (await resp.json())["error"]
    assert (error["code"], error["message"]) == (code, message)
    assert (b0.hits, b1.hits) == (0, 0)


async def test_v1_models_lists_the_configured_pool_models_and_route_matchers(backends, start_proxy):
    """The proxy answers ``GET /v1/models`` itself with the union of every pool's ``models``
    and the routes' model matchers, without asking a backend."""
    b0, b1 = await backends(2)
    app = await start_proxy(
        proxy_config(
            [pool("a", [b0], models=["llama", "llama-70b"]), pool("b", [b1])],
            routes=MODEL_ROUTES,
        )
    )
    async with aiohttp.ClientSession() as s:
        status, got = await list_models(s, app)
    assert status == 200
    assert got["object"] == "list"
    owners = {m["id"]: m["owned_by"] for m in got["data"]}
    assert owners == {
        "llama": "lb:a",
        "llama-70b": "lb:a",
        "mistral": "lb:b",
        "mistral-large": "lb:b",
    }
    assert all(m["object"] == "model" for m in got["data"])
    assert (b0.hits, b1.hits) == (0, 0)


async def test_v1_models_asks_the_backends_of_a_pool_that_names_no_models(sim, start_proxy):
    """Pools without configured models contribute what their backends' ``/v1/models`` say."""
    llama, qwen, phi = await sim("llama"), await sim("qwen"), await sim("phi")
    routes = [{"path_prefix": "/q/", "pool": "q"}, {"path_prefix": "/p/", "pool": "p"}]
    app = await start_proxy(
        proxy_config(
            [pool("a", [llama], models=["llama"]), pool("q", [qwen]), pool("p", [phi])],
            routes=[*routes, {"path_prefix": "/", "pool": "a"}],
        )
    )
    async with aiohttp.ClientSession() as s:
        status, got = await list_models(s, app)
    assert status == 200
    assert {m["id"]: m["owned_by"] for m in got["data"]} == {
        "llama": "lb:a",
        "qwen": "lb:q",
        "phi": "lb:p",
    }
    assert llama.requests_by_path["/v1/models"] == 0  # its pool's models are configured
    assert qwen.requests_by_path["/v1/models"] == 1
    assert phi.requests_by_path["/v1/models"] == 1


async def test_v1_models_is_the_union_of_the_backends_lists_when_no_model_is_configured(
    sim, start_proxy
):
    """With no model named anywhere in the configuration, the proxy still answers
    ``/v1/models``: every pool's backends are asked, and the answer is their union."""
    qwen, phi = await sim("qwen"), await sim("phi")
    routes = [{"path_prefix": "/q/", "pool": "q"}, {"path_prefix": "/", "pool": "p"}]
    app = await start_proxy(proxy_config([pool("q", [qwen]), pool("p", [phi])], routes=routes))
    async with aiohttp.ClientSession() as s:
        status, got = await list_models(s, app)
    assert status == 200
    assert {m["id"]: m["owned_by"] for m in got["data"]} == {"qwen": "lb:q", "phi": "lb:p"}


async def test_v1_models_leaves_out_pools_no_route_reaches(sim, start_proxy):
    """A pool no route sends to (here a mirror's shadow, and one named by nothing) answers
    no client: its models are not listed, where they would only 404 or go elsewhere."""
    llama, qwen, phi = await sim("llama"), await sim("qwen"), await sim("phi")
    routes = [{"path_prefix": "/", "pool": "a", "mirror": {"pool": "shadow", "percent": 10}}]
    app = await start_proxy(
        proxy_config(
            [
                pool("a", [llama], models=["llama"]),
                pool("shadow", [qwen], models=["qwen"]),
                pool("orphan", [phi]),
            ],
            routes=routes,
        )
    )
    async with aiohttp.ClientSession() as s:
        status, got = await list_models(s, app)
        async with s.get(url(app, "/v1/models/qwen")) as resp:
            assert resp.status == 404
    assert status == 200
    assert [m["id"] for m in got["data"]] == ["llama"]
    assert phi.requests_by_path["/v1/models"] == 0


async def test_v1_models_asks_past_backends_that_do_not_answer(sim, start_proxy):
    """Discovery asks the pool's backends in turn: two that refuse connections do not hide
    the model the third serves."""
    qwen = await sim("qwen")
    dead = [{"url": f"http://127.0.0.1:{free_port()}", "name": f"dead{i}"} for i in range(2)]
    entry = {
        "name": "q",
        "backends": [*dead, {"url": qwen.url, "name": "live"}],
        "health_check": {"enabled": False},
    }
    app = await start_proxy(proxy_config([entry]))
    async with aiohttp.ClientSession() as s:
        status, got = await list_models(s, app)
    assert status == 200
    assert [m["id"] for m in got["data"]] == ["qwen"]


async def test_one_model_is_retrieved_by_its_id_and_an_unknown_one_is_an_openai_404(
    backends, start_proxy
):
    """``GET /v1/models/{id}`` (the SDKs' models.retrieve) answers from the same union."""
    (b0,) = await backends(1)
    app = await start_proxy(proxy_config([pool("a", [b0], models=["org/llama-3"])]))
    async with aiohttp.ClientSession() as s:
        async with s.get(url(app, "/v1/models/org/llama-3")) as resp:
            assert resp.status == 200
            got = await resp.json()
        async with s.get(url(app, "/v1/models/nope")) as resp:
            assert resp.status == 404
            error = (await resp.json())["error"]
    assert (got["id"], got["object"], got["owned_by"]) == ("org/llama-3", "model", "lb:a")
    assert (error["code"], error["param"]) == ("model_not_found", "model")
    assert b0.hits == 0


async def test_a_body_naming_no_model_on_a_model_route_is_an_openai_400(backends, start_proxy):
    """A JSON body without ``model`` where only model routes match: 400, nothing forwarded."""
    b0, b1 = await backends(2)
    app = await start_proxy(proxy_config([pool("a", [b0]), pool("b", [b1])], routes=MODEL_ROUTES))
    async with (
        aiohttp.ClientSession() as s,
        s.post(url(app, CHAT), json={"messages": [{"role": "user", "content": "hi"}]}) as resp,
    ):
        assert resp.status == 400
        error = (await resp.json())["error"]
    assert (error["type"], error["code"], error["param"]) == (
        "invalid_request_error",
        "model_missing",
        "model",
    )
    assert (b0.hits, b1.hits) == (0, 0)


async def test_a_body_over_the_inspect_limit_on_a_model_route_is_a_413(backends, start_proxy):
    """A body a model route would have to read past ``limits.max_inspect_bytes`` is refused
    with 413, and nothing reaches a backend."""
    b0, b1 = await backends(2)
    app = await start_proxy(
        proxy_config(
            [pool("a", [b0]), pool("b", [b1])],
            routes=MODEL_ROUTES,
            limits={"max_inspect_bytes": 4096},
        )
    )
    body = json.dumps(chat_body("llama", "z" * 16384)).encode()
    async with aiohttp.ClientSession() as s, s.post(url(app, CHAT), data=body) as resp:
        assert resp.status == 413
        got = await resp.json()
    assert got["error"]["type"] == "body_too_large"
    assert (b0.hits, b1.hits) == (0, 0)
