"""The proxy end to end: routing, balancing, streaming, header hygiene and error mapping, with
real aiohttp backends and a real proxy on 127.0.0.1."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import io
import json
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from lb import native
from lb.downstream import ClientConnection
from lb.exchange import STALE_WINDOW_S, Exchange
from lb.upstream import UpstreamConnection
from tests.conftest import free_port, pool, proxy_config, raw_exchange, url


async def _get_json(session: aiohttp.ClientSession, target: str, **kw: Any) -> Any:
    async with session.get(target, **kw) as resp:
        return await resp.json()


async def test_a_request_reaches_a_backend_and_the_answer_names_it(backends, start_proxy):
    """A POST is forwarded with its body intact and the response names the serving backend."""
    (b0,) = await backends(1)
    app = await start_proxy(proxy_config([pool("chat", [b0])]))
    body = b'{"model": "m", "messages": []}' * 100
    async with (
        aiohttp.ClientSession() as s,
        s.post(url(app, "/v1/chat/completions"), data=body) as resp,
    ):
        got = await resp.json()
        assert resp.status == 200
        assert resp.headers["x-lb-backend"] == "b0"
        assert resp.headers["x-served-by"] == "b0"
    assert got["method"] == "POST"
    assert got["path"] == "/v1/chat/completions"
    assert got["body_sha256"] == hashlib.sha256(body).hexdigest()


async def test_round_robin_respects_weights_over_many_requests(backends, start_proxy):
    """Weights 1 and 2 give exactly a third and two thirds of 300 requests."""
    b0, b1 = await backends(2)
    cfg = pool("chat", [b0, b1])
    cfg["backends"][1]["weight"] = 2
    app = await start_proxy(proxy_config([cfg]))
    async with aiohttp.ClientSession() as s:
        for _ in range(300):
            async with s.get(url(app, "/x")) as resp:
                assert resp.status == 200
    assert (b0.hits, b1.hits) == (100, 200)


async def test_least_connections_sends_new_requests_away_from_a_backend_holding_a_stream(
    backends, start_proxy
):
    """While one backend holds a long stream, every short request goes to the other one."""
    b0, b1 = await backends(2)
    app = await start_proxy(proxy_config([pool("chat", [b0, b1], "least_connections")]))
    async with aiohttp.ClientSession() as s:
        stream = await s.get(url(app, "/stream?hold=1&chunks=1"))
        holder = stream.headers["x-lb-backend"]
        served = Counter()
        for _ in range(20):
            async with s.get(url(app, "/echo")) as resp:
                served[resp.headers["x-lb-backend"]] += 1
        for b in (b0, b1):
            b.release.set()
        await stream.read()
        stream.release()
    other = "b1" if holder == "b0" else "b0"
    assert served == {other: 20}


async def _spread(app, n: int, concurrency: int) -> Counter[str]:
    served: Counter[str] = Counter()
    sem = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession() as s:

        async def one() -> None:
            async with sem, s.get(url(app, "/echo")) as resp:
                assert resp.status == 200
                served[resp.headers["x-lb-backend"]] += 1

        await asyncio.gather(*(one() for _ in range(n)))
    return served


async def test_latency_weighted_avoids_a_slow_backend_and_returns_when_it_recovers(
    backends, start_proxy
):
    """A backend five times slower gets a small share, and a fair one again once fast."""
    b0, b1 = await backends(2)
    b0.delay_s, b1.delay_s = 0.01, 0.05
    cfg = pool("chat", [b0, b1], "latency_weighted", strategy_options={"decay_s": 0.3})
    app = await start_proxy(proxy_config([cfg]))
    slow = await _spread(app, 120, concurrency=4)
    assert slow["b1"] < 0.25 * 120
    b1.delay_s = 0.01
    await asyncio.sleep(1.0)  # the slow estimate decays with no traffic (decay_s 0.3)
    recovered = await _spread(app, 120, concurrency=4)
    assert recovered["b1"] > 0.3 * 120


async def test_a_streamed_chunk_reaches_the_client_before_the_backend_finishes(
    backends, start_proxy
):
    """The first chunk of a stream arrives while the backend is still writing the rest."""
    (b0,) = await backends(1)
    app = await start_proxy(proxy_config([pool("chat", [b0])]))
    async with (
        aiohttp.ClientSession() as s,
        s.get(url(app, "/stream?chunks=5&interval_ms=200&sse=1")) as resp,
    ):
        assert resp.headers["content-type"].startswith("text/event-stream")
        first = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 5)
        assert first == b"data: 0\n\n"
        assert b0.active == 1  # the backend has not finished the stream
        rest = await resp.read()
    assert rest.count(b"data:") == 4


async def test_hop_by_hop_headers_are_dropped_and_forwarding_headers_set(backends, start_proxy):
    """The backend sees no hop-by-hop fields and gets X-Forwarded-* and a request id."""
    (b0,) = await backends(1)
    app = await start_proxy(proxy_config([pool("chat", [b0])]))
    headers = {
        "Connection": "keep-alive, X-Drop-Me",
        "X-Drop-Me": "1",
        "Keep-Alive": "timeout=5",
        "TE": "trailers",
        "Proxy-Authorization": "Basic eA==",
        "X-Forwarded-For": "10.1.2.3",
        "X-Custom": "kept",
    }
    async with aiohttp.ClientSession() as s, s.get(url(app, "/h"), headers=headers) as resp:
        got = await resp.json()
        rid = resp.headers["x-request-id"]
    seen = {k.lower(): v for k, v in got["headers"]}
    for name in ("x-drop-me", "keep-alive", "te", "proxy-authorization"):
        assert name not in seen
    assert seen["x-custom"] == "kept"
    assert seen["x-forwarded-for"] == "10.1.2.3, 127.0.0.1"
    assert seen["x-forwarded-proto"] == "http"
    assert seen["x-forwarded-host"] == f"127.0.0.1:{app.port}"
    assert seen["x-request-id"] == rid


async def test_a_field_named_by_a_second_connection_field_is_dropped_after_a_keep_alive_one(
    backends, start_proxy
):
    """``Connection: keep-alive`` alone names nothing to drop, but a later Connection field
    still does: the field it names never reaches the backend."""
    (b0,) = await backends(1)
    app = await start_proxy(proxy_config([pool("chat", [b0])]))
    raw = await raw_exchange(
        app.port,
        b"GET /h HTTP/1.1\r\nHost: t\r\nConnection: keep-alive\r\nX-Kept: 1\r\n"
        b"Connection: X-Drop-Me, close\r\nX-Drop-Me: secret\r\n\r\n",
    )
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    seen = {k.lower(): v for k, v in json.loads(body)["headers"]}
    assert seen["x-kept"] == "1"
    assert "x-drop-me" not in seen


async def test_a_client_request_id_is_passed_through_and_returned(backends, start_proxy):
    """An incoming X-Request-ID reaches the backend unchanged and comes back to the client."""
    (b0,) = await backends(1)
    app = await start_proxy(proxy_config([pool("chat", [b0])]))
    async with (
        aiohttp.ClientSession() as s,
        s.get(url(app, "/"), headers={"X-Request-ID": "abc-123"}) as resp,
    ):
        got = await resp.json()
        assert resp.headers["x-request-id"] == "abc-123"
    assert dict((k.lower(), v) for k, v in got["headers"])["x-request-id"] == "abc-123"


async def test_the_backend_header_can_be_turned_off(backends, start_proxy):
    """With ``headers.backend_header: null`` the response does not name the backend."""
    (b0,) = await backends(1)
    app = await start_proxy(proxy_config([pool("chat", [b0])], headers={"backend_header": None}))
    async with aiohttp.ClientSession() as s, s.get(url(app, "/")) as resp:
        assert resp.status == 200
        assert "x-lb-backend" not in resp.headers


async def test_a_body_over_the_limit_gets_413_and_never_reaches_a_backend(backends, start_proxy):
    """A Content-Length above ``limits.max_body_bytes`` is answered 413 in the JSON shape."""
    (b0,) = await backends(1)
    app = await start_proxy(proxy_config([pool("chat", [b0])], limits={"max_body_bytes": 1000}))
    async with aiohttp.ClientSession() as s, s.post(url(app, "/"), data=b"x" * 1001) as resp:
        assert resp.status == 413
        got = await resp.json()
    assert got["error"]["type"] == "body_too_large"
    assert b0.hits == 0


@pytest.mark.parametrize(
    ("strategy", "options"),
    [("cache_aware", {}), ("consistent_hash", {"key": "prompt"})],
)
async def test_a_body_too_large_to_read_for_a_prompt_key_is_forwarded_unkeyed(
    backends, start_proxy, strategy: str, options: dict[str, Any]
):
    """A prompt is only a hint to these strategies: a body past ``max_inspect_bytes`` (a
    large image, say) is placed without one and forwarded whole, not refused with 413."""
    b0, b1 = await backends(2)
    chat = pool("chat", [b0, b1], strategy, strategy_options=options)
    app = await start_proxy(proxy_config([chat], limits={"max_inspect_bytes": 4096}))
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "z" * 20000}]})
    async with aiohttp.ClientSession() as s, s.post(url(app, "/v1/chat"), data=body) as resp:
        assert resp.status == 200
        got = await resp.json()
    assert got["body_sha256"] == hashlib.sha256(body.encode()).hexdigest()
    assert b0.hits + b1.hits == 1


@pytest.fixture
async def body_readers() -> AsyncIterator[Callable[[int], Awaitable[tuple[str, list[int]]]]]:
    """Factory: ``await body_readers(status)`` starts a backend that reads each request body
    whole, records its length, and answers ``status``; gives its URL and the lengths."""
    runners: list[web.AppRunner] = []

    async def start(status: int) -> tuple[str, list[int]]:
        lengths: list[int] = []

        async def read_then_answer(request: web.Request) -> web.Response:
            lengths.append(len(await request.read()))
            return web.json_response({"read": lengths[-1]}, status=status)

        app = web.Application(client_max_size=64 << 20)
        app.router.add_route("*", "/{tail:.*}", read_then_answer)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        runners.append(runner)
        return f"http://127.0.0.1:{runner.addresses[0][1]}", lengths

    yield start
    for runner in runners:
        await runner.cleanup()


async def test_a_503_to_a_body_too_large_to_keep_is_not_retried_without_its_body(
    body_readers, start_proxy
):
    """A 2 MB body is past ``replay_max_bytes`` (1 MiB): it is not kept, so a 503 for it is
    passed on, not retried on another backend with the head alone (which then waited for a
    body that never came)."""
    busy_url, busy_reads = await body_readers(503)
    fine_url, fine_reads = await body_readers(200)
    chat = {
        "name": "chat",
        "strategy": "round_robin",
        "backends": [{"url": busy_url, "name": "busy"}, {"url": fine_url, "name": "fine"}],
        "health_check": {"enabled": False},
    }
    app = await start_proxy(proxy_config([chat]))
    body = b"x" * 2_000_000
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as s:
        statuses = []
        for _ in range(2):  # round robin: one of the two starts on the busy backend
            async with s.post(url(app, "/v1/chat"), data=io.BytesIO(body)) as resp:
                statuses.append((resp.status, resp.headers.get("x-lb-backend")))
                await resp.read()
    assert sorted(statuses) == [(200, "fine"), (503, "busy")]
    assert busy_reads == [len(body)] and fine_reads == [len(body)]


async def test_a_backend_that_refuses_connections_gives_502_json(backends, start_proxy):
    """Connection refused maps to 502 with the error type, a message and the pool name."""
    dead = free_port()
    app = await start_proxy(
        proxy_config([{"name": "chat", "backends": [{"url": f"http://127.0.0.1:{dead}"}]}])
    )
    async with aiohttp.ClientSession() as s, s.get(url(app, "/v1/completions")) as resp:
        assert resp.status == 502
        assert resp.headers["content-type"] == "application/json"
        got = await resp.json()
    assert got["error"]["type"] == "backend_unreachable"
    assert got["error"]["pool"] == "chat"
    assert "refused" in got["error"]["message"].lower()


async def test_a_refused_backend_is_skipped_for_a_working_one(backends, start_proxy):
    """A connect failure is retried on another backend, so the client sees a success."""
    (b0,) = await backends(1)
    dead = {"url": f"http://127.0.0.1:{free_port()}", "name": "dead"}
    cfg = {"name": "chat", "backends": [dead, {"url": b0.url, "name": "b0"}]}
    app = await start_proxy(proxy_config([cfg]))
    async with aiohttp.ClientSession() as s:
        for _ in range(6):
            async with s.get(url(app, "/")) as resp:
                assert resp.status == 200
                assert resp.headers["x-lb-backend"] == "b0"


async def test_a_backend_that_sends_no_headers_in_time_gives_504(backends, start_proxy):
    """``timeouts.response_headers_s`` bounds the wait for headers; the client gets 504 JSON."""
    (b0,) = await backends(1)
    app = await start_proxy(
        proxy_config([pool("chat", [b0])], timeouts={"response_headers_s": 0.3})
    )
    async with aiohttp.ClientSession() as s, s.get(url(app, "/hang")) as resp:
        assert resp.status == 504
        got = await resp.json()
    assert got["error"]["type"] == "timeout"


async def test_a_stream_that_goes_quiet_is_cut_after_the_idle_timeout(backends, start_proxy):
    """A started response with no bytes for ``idle_s`` is cut, visibly truncated."""
    (b0,) = await backends(1)
    app = await start_proxy(proxy_config([pool("chat", [b0])], timeouts={"idle_s": 0.3}))
    async with aiohttp.ClientSession() as s:
        resp = await s.get(url(app, "/stream?hold=1&chunks=3"))
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await asyncio.wait_for(resp.read(), 5)
        resp.release()


async def test_a_long_stream_with_steady_chunks_is_not_cut_by_the_idle_timeout(
    backends, start_proxy
):
    """A stream lasting several idle periods survives while its chunks keep coming."""
    (b0,) = await backends(1)
    app = await start_proxy(proxy_config([pool("chat", [b0])], timeouts={"idle_s": 0.2}))
    async with (
        aiohttp.ClientSession() as s,
        s.get(url(app, "/stream?chunks=12&interval_ms=50")) as resp,
    ):
        body = await asyncio.wait_for(resp.read(), 10)
    assert body.count(b"chunk-") == 12


async def test_a_quiet_response_on_a_reused_upstream_connection_is_cut_after_the_idle_timeout(
    backends, start_proxy
):
    """The idle deadline outlives each exchange on a kept-alive upstream connection: after a
    steady stream, the next response on that connection that goes quiet is still cut."""
    (b0,) = await backends(1)
    app = await start_proxy(proxy_config([pool("chat", [b0])], timeouts={"idle_s": 0.3}))
    async with aiohttp.ClientSession() as s:
        async with s.get(url(app, "/stream?chunks=8&interval_ms=50")) as resp:
            assert (await asyncio.wait_for(resp.read(), 10)).count(b"chunk-") == 8
        resp = await s.get(url(app, "/stream?hold=1&chunks=1"))
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await asyncio.wait_for(resp.read(), 5)
        resp.release()
    (chat,) = app.proxy.pools.values()
    assert [p.connects_total for p in chat.upstreams.values()] == [1]  # one connection, reused


async def test_a_backend_dying_mid_body_gives_a_truncated_response(backends, start_proxy):
    """A backend that cuts its connection mid-body leaves the client a detectable truncation."""
    (b0,) = await backends(1)
    app = await start_proxy(proxy_config([pool("chat", [b0])]))
    async with aiohttp.ClientSession() as s:
        resp = await s.get(url(app, "/drop"))
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await asyncio.wait_for(resp.read(), 5)
        resp.release()


async def test_connections_of_streams_the_clients_dropped_are_freed_without_a_gc_pass(
    backends, start_proxy
):
    """Memory stays flat when clients drop streams: a closed connection (client or upstream)
    holds no reference cycle, so it is freed at once, not by the rare full collection."""
    (b0,) = await backends(1)
    app = await start_proxy(proxy_config([pool("chat", [b0])]))
    gc.collect()
    gc.disable()
    try:
        for _ in range(10):
            reader, writer = await asyncio.open_connection("127.0.0.1", app.port)
            writer.write(b"GET /stream?chunks=100&interval_ms=50 HTTP/1.1\r\nHost: t\r\n\r\n")
            await asyncio.wait_for(reader.readuntil(b";"), 5)
            writer.transport.abort()
        for _ in range(100):
            if b0.aborted == 10:
                break
            await asyncio.sleep(0.02)
        assert b0.aborted == 10
        await asyncio.sleep(0.05)
        left = [
            o
            for o in gc.get_objects()
            if isinstance(o, ClientConnection | UpstreamConnection) and o.closed
        ]
        assert left == []
    finally:
        gc.enable()


async def test_a_client_that_leaves_mid_stream_aborts_the_upstream_request(backends, start_proxy):
    """Closing the client connection closes the backend's, and in-flight returns to zero."""
    (b0,) = await backends(1)
    app = await start_proxy(proxy_config([pool("chat", [b0])]))
    async with aiohttp.ClientSession() as s:
        resp = await s.get(url(app, "/stream?chunks=100&interval_ms=50"))
        await asyncio.wait_for(resp.content.readuntil(b";"), 5)
        resp.close()
    for _ in range(100):
        if b0.aborted:
            break
        await asyncio.sleep(0.02)
    assert b0.aborted == 1
    assert app.proxy is not None
    backend = app.proxy.pools["chat"].backends[0]
    assert backend.in_flight == 0
    assert backend.failures_total == 0  # the client left; the backend did nothing wrong


RawHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
OK_ANSWER = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"


@pytest.fixture
async def raw_backend() -> AsyncIterator[Callable[[RawHandler], Awaitable[str]]]:
    """Factory: ``await raw_backend(handle)`` serves raw TCP on 127.0.0.1 with ``handle`` and
    gives its URL; every connection it took is cut when the test ends."""
    servers: list[asyncio.Server] = []
    writers: list[asyncio.StreamWriter] = []

    async def start(handle: RawHandler) -> str:
        async def tracked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writers.append(writer)
            await handle(reader, writer)

        server = await asyncio.start_server(tracked, "127.0.0.1", 0)
        servers.append(server)
        return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"

    yield start
    for server in servers:
        server.close()
    for writer in writers:
        writer.transport.abort()
    await asyncio.sleep(0)


async def test_a_dead_pooled_connection_is_replaced_without_failing_the_request(
    start_proxy, raw_backend
):
    """A keep-alive connection the backend closed unseen is retried on a fresh connection."""
    served = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Answers the first request of each connection; drops the second one unanswered,
        # like a server that closed an idle connection just as the proxy reused it.
        nonlocal served
        for n in range(2):
            try:
                await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                break
            if n == 1:
                writer.transport.abort()
                return
            served += 1
            writer.write(OK_ANSWER)
            await writer.drain()
        writer.close()

    backend = await raw_backend(handle)
    app = await start_proxy(proxy_config([{"name": "p", "backends": [{"url": backend}]}]))
    async with aiohttp.ClientSession() as s:
        for _ in range(3):
            async with s.get(url(app, "/")) as resp:
                assert resp.status == 200
                assert await resp.read() == b"ok"
    assert served == 3


def one_backend_pool(backend: str, max_retries: int) -> dict[str, Any]:
    return {
        "name": "p",
        "backends": [{"url": backend}],
        "health_check": {"enabled": False},
        "retry": {"max_retries": max_retries},
    }


@pytest.mark.parametrize(("max_retries", "sent"), [(0, 1), (2, 4)])
async def test_a_post_on_a_pooled_connection_that_dies_at_once_is_resent_only_if_retries_allow(
    start_proxy, raw_backend, max_retries: int, sent: int
):
    """A pooled connection cut the moment a POST went out may be an idle close, or a
    backend that read the POST and crashed: the two look the same. With retries off the POST
    is not sent again (the client gets the 502); where the route retries resets, it is
    replayed on a fresh connection, then retried twice as the policy says."""
    received: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                target = head.split(b" ", 2)[1]
                received.append(target)
                if target == b"/generate":
                    await reader.readexactly(4)
                    writer.transport.abort()  # read it, then gone
                    return
                writer.write(OK_ANSWER)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    app = await start_proxy(
        proxy_config([one_backend_pool(await raw_backend(handle), max_retries)])
    )
    async with aiohttp.ClientSession() as s:
        async with s.get(url(app, "/warm")) as resp:
            assert resp.status == 200
        async with s.post(url(app, "/generate"), data=b"body") as resp:
            assert resp.status == 502
    assert received.count(b"/generate") == sent


async def test_a_request_the_backend_held_before_closing_is_not_replayed(start_proxy, raw_backend):
    """A pooled connection that fails long after the request was written (the backend read
    it, held it, then went away) is no idle-close race: the POST is not sent again, and with
    retries off the client gets the 502."""
    received: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            for n in range(2):
                head = await reader.readuntil(b"\r\n\r\n")
                received.append(head.split(b" ", 2)[1])
                if n == 1:
                    await reader.readexactly(4)  # the whole body: the request is taken
                    await asyncio.sleep(STALE_WINDOW_S + 0.5)
                    writer.close()
                    return
                writer.write(OK_ANSWER)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    app = await start_proxy(proxy_config([one_backend_pool(await raw_backend(handle), 0)]))
    async with aiohttp.ClientSession() as s:
        async with s.get(url(app, "/warm")) as resp:
            assert resp.status == 200
        async with s.post(url(app, "/generate"), data=b"body") as resp:
            assert resp.status == 502
            assert (await resp.json())["error"]["type"] == "backend_error"
    assert received == [b"/warm", b"/generate"]


async def test_a_strategy_is_loaded_from_a_dotted_path(backends, start_proxy):
    """``strategy: module:Class`` plugs in a user strategy without touching lb/."""
    b0, b1 = await backends(2)
    cfg = pool("chat", [b0, b1], "tests.strategies.custom_strategy:FirstBackend")
    app = await start_proxy(proxy_config([cfg]))
    async with aiohttp.ClientSession() as s:
        for _ in range(10):
            async with s.get(url(app, "/")) as resp:
                assert resp.headers["x-lb-backend"] == "b0"
    assert (b0.hits, b1.hits) == (10, 0)


async def test_routes_send_requests_to_pools_by_path_prefix(backends, start_proxy):
    """The first matching route's pool serves; a request no route matches gets 404 JSON."""
    b0, b1 = await backends(2)
    routes = [
        {"path_prefix": "/v1/embeddings", "pool": "embed"},
        {"path_prefix": "/v1/", "pool": "chat"},
    ]
    app = await start_proxy(proxy_config([pool("chat", [b0]), pool("embed", [b1])], routes=routes))
    async with aiohttp.ClientSession() as s:
        assert (await _get_json(s, url(app, "/v1/embeddings")))["backend"] == "b1"
        assert (await _get_json(s, url(app, "/v1/chat/completions")))["backend"] == "b0"
        async with s.get(url(app, "/other")) as resp:
            assert resp.status == 404
            assert (await resp.json())["error"]["type"] == "no_route"


async def test_metrics_count_requests_by_pool_and_backend(backends, start_proxy):
    """After five requests the scrape shows five 2xx answers and no request in flight."""
    (b0,) = await backends(1)
    app = await start_proxy(proxy_config([pool("chat", [b0])]))
    async with aiohttp.ClientSession() as s:
        for _ in range(5):
            async with s.get(url(app, "/")) as resp:
                assert resp.status == 200
        async with s.get(f"http://127.0.0.1:{app.admin_port}/metrics") as resp:
            text = await resp.text()
    assert 'lb_requests_total{code_class="2xx",pool="chat"} 5.0' in text
    assert 'lb_upstream_responses_total{backend="b0",code_class="2xx",pool="chat"} 5.0' in text
    assert 'lb_upstream_in_flight{backend="b0",pool="chat"} 0.0' in text
    assert 'lb_request_duration_seconds_count{pool="chat"} 5.0' in text


async def test_readyz_turns_503_while_draining(backends, start_proxy):
    """Readiness answers 200 while serving and 503 once shutdown has begun."""
    (b0,) = await backends(1)
    app = await start_proxy(proxy_config([pool("chat", [b0])], shutdown={"grace_s": 5}))
    admin = f"http://127.0.0.1:{app.admin_port}"
    async with aiohttp.ClientSession() as s:
        async with s.get(admin + "/readyz") as resp:
            assert resp.status == 200
        stream = await s.get(url(app, "/stream?chunks=6&interval_ms=50"))
        draining = asyncio.create_task(app.shutdown())
        await asyncio.sleep(0.05)
        async with s.get(admin + "/readyz") as resp:
            assert resp.status == 503
            assert json.loads(await resp.text())["status"] == "draining"
        assert (await stream.read()).count(b"chunk-") == 6
        stream.release()
        await asyncio.wait_for(draining, 5)


async def test_a_request_with_bad_framing_never_crashes_the_proxy(backends, start_proxy):
    """Garbage on one connection gets a 400; the next client is served normally."""
    (b0,) = await backends(1)
    app = await start_proxy(proxy_config([pool("chat", [b0])]))
    out = await raw_exchange(app.port, b"\x00\x01\x02 nonsense\r\n\r\n", read_timeout_s=2)
    assert out.startswith(b"HTTP/1.1 400 ")
    async with aiohttp.ClientSession() as s, s.get(url(app, "/")) as resp:
        assert resp.status == 200


@pytest.mark.skipif(
    native.build_in_use == "compiled",
    reason="the fault is injected by patching a method, which a compiled class never looks up;"
    " make test runs this on the pure-Python build",
)
async def test_a_fault_inside_an_attempt_answers_500_and_frees_the_backends_slot(
    backends, start_proxy, monkeypatch, caplog
):
    """Should the proxy's own code fail mid-attempt (a bug, injected here), the client gets a
    JSON 500, the error is logged, and the backend's in-flight count does not leak."""
    (b0,) = await backends(1)
    app = await start_proxy(proxy_config([pool("chat", [b0])]))

    def broken_start(self: Exchange, head: bytes) -> None:
        raise RuntimeError("injected fault")

    monkeypatch.setattr(Exchange, "start", broken_start)
    async with aiohttp.ClientSession() as s, s.get(url(app, "/echo")) as resp:
        assert resp.status == 500
        assert (await resp.json())["error"]["type"] == "internal_error"
    assert "injected fault" in caplog.text
    assert app.proxy is not None
    assert app.proxy.pools["chat"].backends[0].in_flight == 0
