"""Hostile peers on both sides of the proxy: raw client sockets that send what no client should,
and raw backends that answer what no server should. Whatever they send, a client gets a JSON
error or a visibly cut response, nothing malformed crosses the proxy, and it keeps serving."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp
import httptools
import pytest

from lb.app import App
from lb.exchange import DISCARD_WAIT_S
from lb.proxy import Proxy
from tests.conftest import pool, proxy_config, raw_exchange

if TYPE_CHECKING:  # imported at run time, pytest would try to collect it as a test class
    from tests.conftest import TestBackend

READ_TIMEOUT_S = 5.0
FAST_TIMEOUTS = {"connect_s": 1, "response_headers_s": 0.5, "idle_s": 0.5}

StartProxy = Callable[[dict[str, Any]], Awaitable[App]]
StartBackends = Callable[..., Awaitable[list["TestBackend"]]]


# -- a raw backend that misbehaves on purpose, and records every byte it was sent -------------


@dataclass
class RawBackend:
    """A TCP server on 127.0.0.1 whose ``behave`` coroutine answers each connection."""

    port: int = 0
    received: bytearray = field(default_factory=bytearray)
    connections: int = 0


Behaviour = Callable[[asyncio.StreamReader, asyncio.StreamWriter, RawBackend], Awaitable[None]]


async def read_head(reader: asyncio.StreamReader, backend: RawBackend) -> bytes:
    """One request head, recorded; the tests' requests carry no body unless they say so."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT_S)
    backend.received += head
    return head


async def read_all(reader: asyncio.StreamReader, backend: RawBackend) -> None:
    """Record whatever arrives until the proxy closes or goes quiet for a moment."""
    while True:
        try:
            data = await asyncio.wait_for(reader.read(65536), 0.5)
        except TimeoutError:
            return
        if not data:
            return
        backend.received += data


def answers(data: bytes, then: str = "close") -> Behaviour:
    """A backend writing ``data`` to each request; ``then``: ``close``, ``rst``, ``stall`` or
    ``serve`` (answer the requests that follow on that connection with a plain 200)."""

    async def behave(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, b: RawBackend
    ) -> None:
        await read_head(reader, b)
        writer.write(data)
        await writer.drain()
        if then == "rst":
            await asyncio.sleep(0.05)
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        elif then == "stall":
            await asyncio.sleep(READ_TIMEOUT_S)
        elif then == "serve":
            for _ in range(10):
                await read_head(reader, b)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnext")
                await writer.drain()

    return behave


async def records(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, b: RawBackend
) -> None:
    """Record everything, answer nothing: for requests that must never be forwarded."""
    await read_all(reader, b)


@pytest.fixture
async def raw_backend() -> AsyncIterator[Callable[[Behaviour], Awaitable[RawBackend]]]:
    """Factory: ``await raw_backend(behave)`` starts a raw backend running ``behave``."""
    servers: list[asyncio.Server] = []
    writers: list[asyncio.StreamWriter] = []

    async def start(behave: Behaviour) -> RawBackend:
        backend = RawBackend()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            backend.connections += 1
            writers.append(writer)
            try:
                await asyncio.wait_for(behave(reader, writer, backend), 2 * READ_TIMEOUT_S)
            except (OSError, TimeoutError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        servers.append(server)
        backend.port = server.sockets[0].getsockname()[1]
        return backend

    yield start
    for writer in writers:
        writer.close()
    for server in servers:
        server.close()
        await server.wait_closed()


def raw_pool(backend: RawBackend, **extra: Any) -> dict[str, Any]:
    """A pool of one raw backend: no health probes or retries to blur what it was sent."""
    return {
        "name": "p",
        "backends": [{"url": f"http://127.0.0.1:{backend.port}", "name": "raw"}],
        "health_check": {"enabled": False},
        "retry": {"max_retries": 0},
        "timeouts": FAST_TIMEOUTS,
        **extra,
    }


# -- a client that reads exactly what the proxy writes -----------------------------------------


@dataclass
class Response:
    status: int = 0
    headers: dict[bytes, bytes] = field(default_factory=dict)
    body: bytes = b""
    complete: bool = False


def parse_responses(raw: bytes) -> list[Response]:
    """Every response in ``raw``, the last one possibly incomplete; fails on malformed bytes."""
    out: list[Response] = []

    class Callbacks:
        def on_message_begin(self) -> None:
            out.append(Response())

        def on_header(self, name: bytes, value: bytes) -> None:
            out[-1].headers[name.lower()] = value

        def on_headers_complete(self) -> None:
            out[-1].status = parser.get_status_code()

        def on_body(self, body: bytes) -> None:
            out[-1].body += body

        def on_message_complete(self) -> None:
            out[-1].complete = True

    parser = httptools.HttpResponseParser(Callbacks())
    parser.feed_data(raw)
    return out


async def exchange(port: int, *pieces: bytes, responses: int = 1) -> bytes:
    """Send ``pieces`` (a short pause between them), then read until ``responses`` complete
    responses arrived, the proxy closed, or ``READ_TIMEOUT_S`` passed."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for piece in pieces:
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.05)
        out = b""
        async with asyncio.timeout(READ_TIMEOUT_S):
            while _complete(out) < responses:
                try:
                    data = await reader.read(65536)
                except ConnectionResetError:
                    return out
                if not data:
                    return out
                out += data
        return out
    finally:
        writer.close()


def _complete(raw: bytes) -> int:
    try:
        return sum(r.complete for r in parse_responses(raw))
    except httptools.HttpParserError:
        return 0


def assert_json_error(resp: Response, status: int, error_type: str) -> None:
    assert resp.status == status, resp.body
    assert resp.complete
    assert resp.headers[b"content-type"] == b"application/json"
    assert json.loads(resp.body)["error"]["type"] == error_type


def proxy_of(app: App) -> Proxy:
    assert app.proxy is not None
    return app.proxy


GET = b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n"


# -- what a client sends that must never reach a backend ----------------------------------------


@pytest.mark.parametrize(
    "head",
    [
        pytest.param(
            b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n",
            id="te-then-cl",
        ),
        pytest.param(
            b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n"
            b"Transfer-Encoding: chunked\r\n",
            id="te-chunked-twice",
        ),
        pytest.param(
            b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked, identity\r\n",
            id="te-chunked-not-last",
        ),
        pytest.param(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 2, 2\r\n", id="cl-list"),
        pytest.param(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: -1\r\n", id="cl-negative"),
        pytest.param(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 0x10\r\n", id="cl-hex"),
        pytest.param(
            b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 99999999999999999999999\r\n",
            id="cl-overflow",
        ),
        pytest.param(b"GET / HTTP/1.1\r\nHost: t\r\nX-A: a\x00b\r\n", id="nul-in-value"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: t\r\nX-A: a\rb\r\n", id="cr-in-value"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: t\r\nX-A : a\r\n", id="space-before-colon"),
        pytest.param(b"GET / HTTP/1.2\r\nHost: t\r\n", id="http-1.2"),
        pytest.param(b"PRI * HTTP/2.0\r\n", id="h2-preface"),
        pytest.param(b"get / HTTP/1.1\r\nHost: t\r\n", id="lowercase-method"),
    ],
)
async def test_an_ambiguous_or_malformed_head_gets_400_and_not_one_byte_reaches_the_backend(
    raw_backend: Callable[[Behaviour], Awaitable[RawBackend]], start_proxy: StartProxy, head: bytes
) -> None:
    """Smuggling-shaped framing and invalid header bytes get a 400 JSON error; the backend is
    never even connected to."""
    backend = await raw_backend(records)
    app = await start_proxy(proxy_config([raw_pool(backend)]))
    raw = await exchange(app.port, head + b"\r\n0\r\n\r\n")
    (resp,) = parse_responses(raw)
    assert_json_error(resp, 400, "bad_request")
    assert backend.connections == 0
    assert backend.received == b""


async def test_a_chunked_body_with_extensions_and_a_trailer_is_reframed_exactly(
    raw_backend: Callable[[Behaviour], Awaitable[RawBackend]], start_proxy: StartProxy
) -> None:
    """Chunk extensions are dropped and the body re-framed by the proxy: the backend sees clean
    chunks, the trailer, and no hop-by-hop header of the client's."""

    async def behave(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, b: RawBackend
    ) -> None:
        await read_head(reader, b)
        for _ in range(20):
            if b.received.endswith(b"0\r\nX-Sum: 7\r\n\r\n"):
                break
            b.received += await asyncio.wait_for(reader.read(65536), READ_TIMEOUT_S)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()

    backend = await raw_backend(behave)
    app = await start_proxy(proxy_config([raw_pool(backend)]))
    raw = await exchange(
        app.port,
        b"POST /up HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n"
        b"Connection: close, X-Hop\r\nX-Hop: secret\r\n\r\n"
        b'3;name="a;b"\r\nabc\r\n2;x\r\nde\r\n0;last\r\nX-Sum: 7\r\n\r\n',
    )
    assert parse_responses(raw)[0].status == 200
    head, _, body = bytes(backend.received).partition(b"\r\n\r\n")
    assert body == b"3\r\nabc\r\n2\r\nde\r\n0\r\nX-Sum: 7\r\n\r\n"
    assert b"x-hop" not in head.lower()
    assert b"\r\ntransfer-encoding: chunked" in head.lower()
    assert b"content-length" not in head.lower()


async def test_a_content_length_with_leading_zeros_is_forwarded_as_a_plain_number(
    raw_backend: Callable[[Behaviour], Awaitable[RawBackend]], start_proxy: StartProxy
) -> None:
    """The proxy writes the framing it parsed, not the client's spelling of it."""

    async def behave(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, b: RawBackend
    ) -> None:
        await read_head(reader, b)
        b.received += await asyncio.wait_for(reader.readexactly(2), READ_TIMEOUT_S)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()

    backend = await raw_backend(behave)
    app = await start_proxy(proxy_config([raw_pool(backend)]))
    await exchange(app.port, b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 0002\r\n\r\nhi")
    assert backend.received.endswith(b"\r\ncontent-length: 2\r\n\r\nhi")


async def test_a_content_length_beyond_any_limit_is_a_413_before_a_backend_is_asked(
    raw_backend: Callable[[Behaviour], Awaitable[RawBackend]], start_proxy: StartProxy
) -> None:
    """2^64 - 1 bytes declared: 413 at once, no connection to the backend."""
    backend = await raw_backend(records)
    app = await start_proxy(proxy_config([raw_pool(backend)]))
    raw = await exchange(
        app.port, b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 18446744073709551615\r\n\r\n"
    )
    assert_json_error(parse_responses(raw)[0], 413, "body_too_large")
    assert backend.connections == 0


async def test_two_hundred_pipelined_requests_in_one_send_are_answered_in_order(
    backends: StartBackends, start_proxy: StartProxy
) -> None:
    """A burst of pipelined requests comes back complete and in request order."""
    (backend,) = await backends(1)
    app = await start_proxy(proxy_config([pool("p", [backend])]))
    burst = b"".join(b"GET /n%d HTTP/1.1\r\nHost: t\r\n\r\n" % i for i in range(200))
    last = b"GET /last HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    raw = await exchange(app.port, burst + last, responses=201)
    responses = parse_responses(raw)
    assert len(responses) == 201
    assert [json.loads(r.body)["path"] for r in responses[:200]] == [f"/n{i}" for i in range(200)]
    assert backend.hits == 201


async def test_pipelined_requests_far_beyond_the_head_limit_in_all_are_each_one_head(
    backends: StartBackends, start_proxy: StartProxy
) -> None:
    """2,000 small requests in one send (320 KB, five times max_header_bytes): the limit is
    each head's, not the read's, so none gets a 431 however the bytes split into reads."""
    (backend,) = await backends(1)
    config = proxy_config([pool("p", [backend])])
    config["limits"] = {"max_header_bytes": 65536}
    app = await start_proxy(config)
    one = b"GET /n HTTP/1.1\r\nHost: t\r\nX-Pad: " + b"p" * 120 + b"\r\n\r\n"
    count = 2000
    reader, writer = await asyncio.open_connection("127.0.0.1", app.port)
    try:
        writer.write(one * (count - 1) + one.replace(b"Host: t", b"Host: t\r\nConnection: close"))
        out = b""
        async with asyncio.timeout(30):
            while data := await reader.read(1 << 16):
                out += data
    finally:
        writer.close()
    statuses = [r.status for r in parse_responses(out)]
    assert statuses == [200] * count


async def test_answers_the_proxy_makes_wait_for_a_client_that_reads_none_of_them(
    backends: StartBackends, start_proxy: StartProxy
) -> None:
    """Thousands of pipelined requests the proxy answers itself (GET /v1/models), their
    answers never read: the proxy stops answering once the client's socket is full instead
    of piling answers up in memory, and answers them all when the client reads."""
    (backend,) = await backends(1)
    config = proxy_config([pool("p", [backend], models=[f"model-{i}" for i in range(8)])])
    app = await start_proxy(config)
    count = 20_000  # about 10 MB of answers
    request = b"GET /v1/models HTTP/1.1\r\nHost: t\r\n\r\n"
    reader, writer = await asyncio.open_connection("127.0.0.1", app.port)
    try:
        sending = asyncio.create_task(_send_all(writer, request * (count - 1)))
        await asyncio.sleep(0.5)
        (conn,) = proxy_of(app).connections
        assert conn.transport.get_write_buffer_size() < 1 << 20
        received = await _count_ok_answers(reader, count - 1)
        await sending
    finally:
        writer.close()
    assert received == count - 1


async def test_requests_sent_one_by_one_also_wait_for_a_client_that_reads_nothing(
    backends: StartBackends, start_proxy: StartProxy
) -> None:
    """Each request in a read of its own, nothing running when it comes: still, once the
    client's socket is full, the proxy answers no more until the client reads."""
    (backend,) = await backends(1)
    models = [f"model-with-a-rather-long-name-{i}" for i in range(64)]
    app = await start_proxy(proxy_config([pool("p", [backend], models=models)]))
    count = 1000  # about 4 MB of answers, more than the loopback buffers hold
    reader, writer = await asyncio.open_connection("127.0.0.1", app.port)
    try:
        for _ in range(count):
            writer.write(b"GET /v1/models HTTP/1.1\r\nHost: t\r\n\r\n")
            await asyncio.sleep(0.001)  # a read of its own, mostly
        (conn,) = proxy_of(app).connections
        assert conn.transport.get_write_buffer_size() < 1 << 20
        received = await _count_ok_answers(reader, count)
    finally:
        writer.close()
    assert received == count


async def _count_ok_answers(reader: asyncio.StreamReader, expected: int) -> int:
    """Read until ``expected`` 200 status lines came (at most 30 s); fails if the peer closes
    first."""
    received = 0
    tail = b""
    async with asyncio.timeout(30):
        while received < expected:
            data = await reader.read(1 << 16)
            assert data, f"closed after {received} answers"
            seen = tail + data  # a status line may straddle two reads
            received += seen.count(b"HTTP/1.1 200 ")
            tail = seen[-12:]  # shorter than the line: never counted twice
    return received


async def _send_all(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(data)
    await writer.drain()


async def test_a_malformed_request_behind_a_good_one_lets_the_good_one_finish(
    backends: StartBackends, start_proxy: StartProxy
) -> None:
    """The first pipelined request is answered, then the garbage after it gets its 400 and
    the connection closes."""
    (backend,) = await backends(1)
    app = await start_proxy(proxy_config([pool("p", [backend])]))
    raw = await exchange(
        app.port, b"GET /good HTTP/1.1\r\nHost: t\r\n\r\nGARBAGE\r\n\r\n", responses=3
    )
    responses = parse_responses(raw)
    assert len(responses) == 2
    assert responses[0].status == 200 and responses[0].complete
    assert json.loads(responses[0].body)["path"] == "/good"
    assert_json_error(responses[1], 400, "bad_request")
    assert backend.hits == 1


@pytest.mark.parametrize("pieces", [1, 3], ids=["one-read", "three-reads"])
async def test_pipelined_requests_ahead_of_a_malformed_one_are_all_answered_first(
    backends: StartBackends, start_proxy: StartProxy, pieces: int
) -> None:
    """However the bytes arrive, every good request before the bad one is answered in order,
    then the 400, then the close: none is dropped unanswered."""
    (backend,) = await backends(1)
    app = await start_proxy(proxy_config([pool("p", [backend])]))
    parts = [
        b"GET /stream?chunks=3&interval_ms=30 HTTP/1.1\r\nHost: t\r\n\r\n",
        b"GET /second HTTP/1.1\r\nHost: t\r\n\r\nPOST /third HTTP/1.1\r\nHost: t\r\n"
        b"Content-Length: 2\r\n\r\nok",
        b"GARBAGE\r\n\r\n",
    ]
    sent = [b"".join(parts)] if pieces == 1 else parts
    raw = await exchange(app.port, *sent, responses=5)
    responses = parse_responses(raw)
    assert [r.status for r in responses] == [200, 200, 200, 400]
    assert json.loads(responses[1].body)["path"] == "/second"
    assert json.loads(responses[2].body)["path"] == "/third"
    assert_json_error(responses[3], 400, "bad_request")
    assert backend.hits == 3


async def test_a_queued_request_whose_body_is_malformed_gets_the_400_after_those_before_it(
    backends: StartBackends, start_proxy: StartProxy
) -> None:
    """The bad input is the chunked body of a queued request: the requests before it are
    answered, the bad one never reaches a backend."""
    (backend,) = await backends(1)
    app = await start_proxy(proxy_config([pool("p", [backend])]))
    raw = await exchange(
        app.port,
        b"GET /stream?chunks=3&interval_ms=30 HTTP/1.1\r\nHost: t\r\n\r\n"
        b"GET /second HTTP/1.1\r\nHost: t\r\n\r\n"
        b"POST /bad HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        responses=4,
    )
    responses = parse_responses(raw)
    assert [r.status for r in responses] == [200, 200, 400]
    assert json.loads(responses[1].body)["path"] == "/second"
    assert backend.hits == 2


async def test_a_pipeline_ends_with_the_request_that_asked_to_close(
    backends: StartBackends, start_proxy: StartProxy
) -> None:
    """Requests after one with Connection: close are neither forwarded nor answered, and the
    requests before it all are."""
    (backend,) = await backends(1)
    app = await start_proxy(proxy_config([pool("p", [backend])]))
    raw = await exchange(
        app.port,
        b"GET /stream?chunks=3&interval_ms=30 HTTP/1.1\r\nHost: t\r\n\r\n"
        b"GET /last HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
        b"GET /after HTTP/1.1\r\nHost: t\r\n\r\n",
        responses=3,
    )
    responses = parse_responses(raw)
    assert [r.status for r in responses] == [200, 200]
    assert json.loads(responses[1].body)["path"] == "/last"
    assert responses[1].headers.get(b"connection") == b"close"
    assert backend.hits == 2


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b'{"model": ', id="truncated"),
        pytest.param(b"[1, 2, 3]", id="array"),
        pytest.param(b'"m1"', id="string"),
        pytest.param(b"null", id="null"),
        pytest.param(b'{"model": "\xff\xfe"}', id="not-utf8"),
        # Nested past the parser's stack: still the 400 of a body that is not JSON, not a 500.
        pytest.param(b'{"model": "m1", "x": ' + b"[" * 30000 + b"]" * 30000 + b"}", id="deep"),
    ],
)
async def test_a_model_route_answers_a_body_that_is_no_json_object_with_400(
    backends: StartBackends, start_proxy: StartProxy, body: bytes
) -> None:
    """A body a model route cannot read gets a 400 JSON error and reaches no backend."""
    (backend,) = await backends(1)
    app = await start_proxy(
        proxy_config([pool("p", [backend])], routes=[{"model": "m1", "pool": "p"}])
    )
    raw = await exchange(
        app.port,
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%s"
        % (len(body), body),
    )
    assert_json_error(parse_responses(raw)[0], 400, "bad_request")
    assert backend.hits == 0


# -- what a backend answers that must never reach a client as it is ------------------------------


@pytest.mark.parametrize(
    ("answer", "then"),
    [
        pytest.param(b"HELLO GARBAGE\r\n\r\n", "close", id="garbage"),
        pytest.param(b"\x00\x01\x02\x03" * 64, "stall", id="binary"),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Le", "close", id="half-head-then-close"),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Le", "rst", id="half-head-then-reset"),
        pytest.param(b"", "rst", id="reset-at-once"),
        pytest.param(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: upgrade\r\n\r\nraw",
            "stall",
            id="101-unasked",
        ),
        pytest.param(b"HTTP/1.1 100 Continue\r\n\r\n" * 12000, "stall", id="endless-1xx"),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nX-Big: " + b"v" * (300 << 10) + b"\r\n\r\n",
            "stall",
            id="huge-head",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 2\r\n\r\nok", "stall", id="nul"
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nX-A: a\r\n b\r\nContent-Length: 2\r\n\r\nok", "stall", id="fold"
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok!",
            "stall",
            id="two-cl",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            "stall",
            id="cl-and-te",
        ),
        pytest.param(
            b"HTTP/1.1 1000 Big\r\nContent-Length: 2\r\n\r\nok", "stall", id="status-1000"
        ),
    ],
)
async def test_a_backend_that_breaks_http_before_its_head_gets_the_client_a_502(
    raw_backend: Callable[[Behaviour], Awaitable[RawBackend]],
    start_proxy: StartProxy,
    answer: bytes,
    then: str,
) -> None:
    """Garbage, a cut or reset head, an unasked 101, endless 1xx, an oversized or invalid head:
    the client gets one well-formed 502 JSON error, nothing of the backend's bytes."""
    backend = await raw_backend(answers(answer, then))
    app = await start_proxy(proxy_config([raw_pool(backend)]))
    raw = await exchange(app.port, GET)
    (resp,) = parse_responses(raw)
    assert_json_error(resp, 502, "backend_error")
    assert not proxy_of(app).active_requests


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(b"", id="silent"),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Le", id="half-head"),
        pytest.param(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n", id="interim-only"),
    ],
)
async def test_a_backend_that_never_finishes_its_head_gets_the_client_a_504_in_time(
    raw_backend: Callable[[Behaviour], Awaitable[RawBackend]],
    start_proxy: StartProxy,
    answer: bytes,
) -> None:
    """No final head within ``response_headers_s``: a 504 JSON error, not a hang."""
    backend = await raw_backend(answers(answer, "stall"))
    app = await start_proxy(proxy_config([raw_pool(backend)]))
    raw = await exchange(app.port, GET)
    (resp,) = parse_responses(raw)
    assert_json_error(resp, 504, "timeout")


@pytest.mark.parametrize(
    ("answer", "then"),
    [
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc", "close", id="short-close"
        ),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc", "rst", id="short-reset"),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc", "stall", id="short-stall"
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\nZZ\r\n",
            "stall",
            id="bad-chunk",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n",
            "rst",
            id="chunked-reset",
        ),
    ],
)
async def test_a_response_that_breaks_mid_body_reaches_the_client_visibly_cut(
    raw_backend: Callable[[Behaviour], Awaitable[RawBackend]],
    start_proxy: StartProxy,
    answer: bytes,
    then: str,
) -> None:
    """Once the head went out, a broken body cuts the client connection: the response is
    incomplete by its own framing, and the bytes before the break arrived."""
    backend = await raw_backend(answers(answer, then))
    app = await start_proxy(proxy_config([raw_pool(backend)]))
    raw = await exchange(app.port, GET)
    (resp,) = parse_responses(raw)
    assert resp.status == 200
    assert not resp.complete
    assert resp.body == b"abc"


@pytest.mark.parametrize("then", ["close", "rst", "stall"])
async def test_an_sse_stream_that_breaks_ends_with_an_error_event_then_a_cut(
    raw_backend: Callable[[Behaviour], Awaitable[RawBackend]], start_proxy: StartProxy, then: str
) -> None:
    """A token stream whose backend closes, resets or goes quiet past ``idle_s`` gets an
    ``event: error`` with the JSON error, and no terminating chunk."""
    backend = await raw_backend(
        answers(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n9\r\ndata: 1\n\n\r\n",
            then,
        )
    )
    app = await start_proxy(proxy_config([raw_pool(backend)]))
    raw = await exchange(app.port, GET)
    (resp,) = parse_responses(raw)
    assert not resp.complete
    first, error = resp.body.split(b"\n\n", 1)
    assert first == b"data: 1"
    assert error.startswith(b"event: error\ndata: {")
    assert json.loads(error.split(b"data: ", 1)[1])["error"]["type"] in ("backend_error", "timeout")


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabcEXTRA", id="extra-bytes"),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc"
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nSMUGG",
            id="extra-response",
        ),
        pytest.param(b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\nhello", id="204-body"),
        pytest.param(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\nhello", id="304-body"),
    ],
)
async def test_bytes_beyond_a_responses_framing_never_reach_the_next_request(
    raw_backend: Callable[[Behaviour], Awaitable[RawBackend]],
    start_proxy: StartProxy,
    answer: bytes,
) -> None:
    """What a backend writes past the end of its response is dropped with its connection: the
    next request on the same client connection gets a clean answer from a fresh connection."""
    backend = await raw_backend(answers(answer, "serve"))
    app = await start_proxy(proxy_config([raw_pool(backend)]))
    raw = await exchange(
        app.port, GET, b"GET /next HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n", responses=2
    )
    first, second = parse_responses(raw)
    assert first.complete and second.complete
    assert first.body in (b"abc", b"")
    assert second.body in (b"abc", b"")
    assert b"EXTRA" not in raw and b"SMUGG" not in raw and b"hello" not in raw
    assert backend.connections == 2


async def test_a_close_delimited_response_reaches_an_http11_client_chunked_and_complete(
    raw_backend: Callable[[Behaviour], Awaitable[RawBackend]], start_proxy: StartProxy
) -> None:
    """A body ended by the backend's close is re-framed, so the client sees its proper end."""
    backend = await raw_backend(
        answers(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil-close")
    )
    app = await start_proxy(proxy_config([raw_pool(backend)]))
    raw = await exchange(app.port, GET)
    (resp,) = parse_responses(raw)
    assert resp.complete
    assert resp.headers[b"transfer-encoding"] == b"chunked"
    assert resp.body == b"until-close"


async def test_hop_by_hop_fields_a_backend_names_never_reach_the_client(
    raw_backend: Callable[[Behaviour], Awaitable[RawBackend]], start_proxy: StartProxy
) -> None:
    """Fields the backend lists in Connection, and its own hop-by-hop ones, are dropped."""
    backend = await raw_backend(
        answers(
            b"HTTP/1.1 200 OK\r\nConnection: X-Secret\r\nX-Secret: s\r\nKeep-Alive: timeout=5\r\n"
            b"Upgrade: h2c\r\nContent-Length: 2\r\n\r\nok",
            "stall",
        )
    )
    app = await start_proxy(proxy_config([raw_pool(backend)]))
    (resp,) = parse_responses(await exchange(app.port, GET))
    assert resp.body == b"ok"
    assert not {b"x-secret", b"keep-alive", b"upgrade", b"connection"} & set(resp.headers)


# -- clients that leave, and what they leave behind ---------------------------------------------


@pytest.mark.parametrize(
    "request_bytes",
    [
        pytest.param(b"GET /hang HTTP/1.1\r\nHost: t\r\n\r\n", id="after-the-head"),
        pytest.param(
            b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 100000\r\n\r\nabc", id="mid-body"
        ),
        pytest.param(
            b"POST /x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n10\r\nabc",
            id="mid-chunk",
        ),
        pytest.param(
            b"GET /stream?chunks=500&interval_ms=10 HTTP/1.1\r\nHost: t\r\n\r\n", id="mid-stream"
        ),
    ],
)
@pytest.mark.parametrize("how", ["close", "reset"])
async def test_a_client_that_leaves_frees_its_backend_slot_and_its_connection(
    backends: StartBackends, start_proxy: StartProxy, request_bytes: bytes, how: str
) -> None:
    """Whenever a client goes, its in-flight count, its connection and its upstream request are
    released: nothing is left once the proxy has seen the close."""
    (backend,) = await backends(1)
    app = await start_proxy(proxy_config([pool("p", [backend])]))
    _, writer = await asyncio.open_connection("127.0.0.1", app.port)
    writer.write(request_bytes)
    await writer.drain()
    await asyncio.sleep(0.1)
    if how == "reset":
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.close()
    for _ in range(100):  # bounded: 5 s
        if not proxy_of(app).connections and not proxy_of(app).active_requests:
            break
        await asyncio.sleep(0.05)
    assert not proxy_of(app).connections
    assert not proxy_of(app).active_requests
    assert all(b.in_flight == 0 for p in proxy_of(app).pools.values() for b in p.backends)


async def test_a_batch_of_hostile_clients_leaves_the_proxy_serving_with_nothing_held(
    backends: StartBackends, start_proxy: StartProxy
) -> None:
    """Garbage, cut heads, oversized heads, bad framing and abrupt closes, all at once: every
    connection is let go and the next ordinary request is served."""
    (backend,) = await backends(1)
    app = await start_proxy(
        proxy_config(
            [pool("p", [backend])],
            limits={"max_header_bytes": 4096, "max_body_bytes": 1000, "header_timeout_s": 0.3},
        )
    )
    hostile = [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS ClientHello
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: t\r\nX-Big: " + b"v" * 8192 + b"\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 5000\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"GET /\xff\xfe HTTP/1.1\r\nHost: \xff\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: t\r\n",
        b"",
    ]
    await asyncio.gather(*(exchange(app.port, data) for data in hostile * 3))
    for _ in range(100):  # bounded: 5 s
        if not proxy_of(app).connections and not proxy_of(app).active_requests:
            break
        await asyncio.sleep(0.05)
    assert not proxy_of(app).active_requests
    raw = await exchange(app.port, b"GET /fine HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    (resp,) = parse_responses(raw)
    assert resp.status == 200
    assert json.loads(resp.body)["path"] == "/fine"


# -- a backend status below 100 is invalid HTTP, not an interim response ----------------------


@pytest.mark.parametrize("coding", [b"gzip", b"gzip, chunked"])
async def test_a_response_transfer_coding_other_than_chunked_is_a_502(
    raw_backend: Callable[[Behaviour], Awaitable[RawBackend]],
    start_proxy: StartProxy,
    coding: bytes,
) -> None:
    """Re-framed without its coding, such a body would reach the client as garbage."""
    answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: %s\r\n\r\n\x1f\x8bgz" % coding
    backend = await raw_backend(answers(answer, then="stall"))
    app = await start_proxy(proxy_config([raw_pool(backend)]))
    (resp,) = parse_responses(await exchange(app.port, GET))
    assert_json_error(resp, 502, "backend_error")


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 100\r\n\r\nabc", id="short"
        ),
        pytest.param(
            b"HTTP/1.1 429 Too Many\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n", id="chunked"
        ),
        pytest.param(b"HTTP/1.1 503 Service Unavailable\r\n\r\nabc", id="unframed"),
        pytest.param(
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 5\r\n\r\n", id="head-only"
        ),
    ],
)
async def test_a_retried_answer_whose_body_never_ends_does_not_hold_the_retry(
    raw_backend: Callable[[Behaviour], Awaitable[RawBackend]],
    start_proxy: StartProxy,
    answer: bytes,
) -> None:
    """A 503 (or 429) is read only to keep its connection: when the rest of its body does not
    come, the connection is cut and the request goes to the next backend, instead of the
    client waiting for a body nobody will see."""
    sick = await raw_backend(answers(answer, then="stall"))
    well = await raw_backend(answers(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"))
    config = proxy_config(
        [
            {
                "name": "p",
                "strategy": "round_robin",
                "backends": [
                    {"url": f"http://127.0.0.1:{sick.port}", "name": "sick"},
                    {"url": f"http://127.0.0.1:{well.port}", "name": "well"},
                ],
                "health_check": {"enabled": False},
                "retry": {"max_retries": 1, "backoff_base_s": 0},
                # Longer than the test's read timeout: only the discard's own wait can end it.
                "timeouts": {"connect_s": 1, "response_headers_s": 30, "idle_s": 30},
            }
        ]
    )
    app = await start_proxy(config)
    # Well within the sick backend's stall (READ_TIMEOUT_S), after which it would close.
    async with asyncio.timeout(3 * DISCARD_WAIT_S):
        raw = await exchange(app.port, b"GET /first HTTP/1.1\r\nHost: t\r\n\r\n")
    (response,) = parse_responses(raw)
    assert response.status == 200 and response.body == b"ok"
    assert sick.connections == 1 and well.connections == 1


async def test_an_answer_before_the_request_body_ended_says_the_connection_closes(
    raw_backend: Callable[[Behaviour], Awaitable[RawBackend]], start_proxy: StartProxy
) -> None:
    """The backend answers after the head alone: the client, still sending, is told the
    connection ends with this answer (the rest of its body is not read), and it does."""
    backend = await raw_backend(answers(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", "stall"))
    app = await start_proxy(proxy_config([raw_pool(backend)]))
    raw = await exchange(
        app.port,
        b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10,
        responses=2,
    )
    (response,) = parse_responses(raw)
    assert response.status == 200 and response.body == b"ok"
    assert response.headers.get(b"connection") == b"close"


@pytest.mark.parametrize("status", [b"000", b"099"])
async def test_a_status_below_100_gets_a_502_and_its_body_never_reaches_the_client(
    raw_backend: Callable[[Behaviour], Awaitable[RawBackend]],
    start_proxy: StartProxy,
    status: bytes,
) -> None:
    """The body of such an answer is not written ahead of a head: the client gets one 502."""
    answer = b"HTTP/1.1 %s X\r\nContent-Length: 8\r\n\r\nINJECTED" % status
    backend = await raw_backend(answers(answer, then="stall"))
    app = await start_proxy(proxy_config([raw_pool(backend)]))
    raw = await exchange(app.port, GET)
    assert raw.startswith(b"HTTP/1.1 502 ")
    (resp,) = parse_responses(raw)
    assert_json_error(resp, 502, "backend_error")


# -- exactly one Host reaches a backend -------------------------------------------------------


async def test_host_named_in_connection_is_still_forwarded(
    backends: StartBackends, start_proxy: StartProxy
) -> None:
    """``Connection: host`` cannot make the proxy send an HTTP/1.1 request without Host."""
    (backend,) = await backends(1)
    app = await start_proxy(proxy_config([pool("p", [backend])]))
    raw = await exchange(app.port, b"GET /h HTTP/1.1\r\nHost: t\r\nConnection: Host\r\n\r\n")
    seen = json.loads(parse_responses(raw)[0].body)["headers"]
    assert [v for k, v in seen if k.lower() == "host"] == ["t"]


# -- an error answered while the client still sends its body survives until it is read --------


@pytest.mark.parametrize(
    ("path", "status", "error_type"),
    [("/v1/big", 413, "body_too_large"), ("/v1/chat", 413, "body_too_large")],
)
async def test_a_client_writing_its_whole_body_before_reading_still_reads_the_error(
    backends: StartBackends, start_proxy: StartProxy, path: str, status: int, error_type: str
) -> None:
    """The proxy reads and drops the rest of a refused body before closing, so the kernel does
    not reset the connection over unread bytes and destroy the answer."""
    (backend,) = await backends(1)
    limits: dict[str, Any] = {"max_body_bytes": 2 << 20, "max_inspect_bytes": 1 << 16}
    routes = [{"path_prefix": "/v1/chat", "model": "m1", "pool": "p"}]
    app = await start_proxy(proxy_config([pool("p", [backend])], limits=limits, routes=routes))
    size = (4 << 20) if path == "/v1/big" else (1 << 20)
    reader, writer = await asyncio.open_connection("127.0.0.1", app.port)
    try:
        writer.write(
            b"POST %s HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % (path.encode(), size)
        )
        for _ in range(size >> 16):
            writer.write(b"x" * 65536)
            await asyncio.wait_for(writer.drain(), 5)
        raw = await asyncio.wait_for(reader.read(65536), 5)
    finally:
        writer.close()
    assert_json_error(parse_responses(raw)[0], status, error_type)


# -- a model name no UTF-8 text can hold does not break the metrics ---------------------------


async def test_a_model_with_a_lone_surrogate_leaves_metrics_scrapable(
    backends: StartBackends, start_proxy: StartProxy
) -> None:
    """``"model": "\\ud800"`` is counted under a replacement label and /metrics stays 200."""
    (backend,) = await backends(1)
    routes = [{"model": "m1", "pool": "p"}, {"path_prefix": "/", "pool": "p"}]
    app = await start_proxy(proxy_config([pool("p", [backend])], routes=routes))
    body = b'{"model": "\\ud800", "messages": []}'
    raw = await exchange(
        app.port,
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%s"
        % (len(body), body),
    )
    assert parse_responses(raw)[0].status == 200
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{app.admin_port}/metrics") as resp,
    ):
        assert resp.status == 200
        assert "lb_inference_requests_total" in await resp.text()


# -- a client that pipelines and leaves is noticed at once ------------------------------------


async def test_a_client_leaving_with_pipelined_requests_waiting_aborts_the_one_running(
    backends: StartBackends, start_proxy: StartProxy
) -> None:
    """Reading goes on behind a queued request, so the close is seen: the running request is
    cancelled and the queued ones never start."""
    (backend,) = await backends(1)
    app = await start_proxy(proxy_config([pool("p", [backend])]))
    _, writer = await asyncio.open_connection("127.0.0.1", app.port)
    writer.write(b"GET /hang HTTP/1.1\r\nHost: t\r\n\r\n" * 3)
    await writer.drain()
    await asyncio.sleep(0.1)
    writer.close()
    proxy = proxy_of(app)
    for _ in range(40):  # bounded: 2 s, far below response_headers_s
        if not proxy.active_requests and not proxy.connections:
            break
        await asyncio.sleep(0.05)
    assert not proxy.active_requests
    assert not proxy.connections
    assert backend.hits == 1


async def test_a_client_that_half_closes_after_its_request_is_taken_for_gone(
    backends: StartBackends, start_proxy: StartProxy
) -> None:
    """A FIN after the request ends the connection, as nginx treats it: the request running
    upstream is cancelled (no GPU time for an answer nobody reads) and the client reads the
    close rather than waiting out response_headers_s."""
    (backend,) = await backends(1)
    app = await start_proxy(proxy_config([pool("p", [backend])]))
    reader, writer = await asyncio.open_connection("127.0.0.1", app.port)
    writer.write(b"GET /hang HTTP/1.1\r\nHost: t\r\n\r\n")
    await writer.drain()
    proxy = proxy_of(app)
    for _ in range(40):  # bounded: 2 s
        if proxy.active_requests:
            break
        await asyncio.sleep(0.05)
    assert proxy.active_requests
    writer.write_eof()
    assert await asyncio.wait_for(reader.read(), 5) == b""
    for _ in range(40):
        if not proxy.active_requests and not proxy.connections:
            break
        await asyncio.sleep(0.05)
    assert not proxy.active_requests
    assert not proxy.connections
    writer.close()


async def test_pipelined_requests_sent_in_pieces_are_answered_in_order(
    backends: StartBackends, start_proxy: StartProxy
) -> None:
    """Requests (and a body) arriving while an earlier one is answered are held, then parsed in
    order."""
    (backend,) = await backends(1)
    app = await start_proxy(proxy_config([pool("p", [backend])]))
    raw = await exchange(
        app.port,
        b"GET /stream?chunks=4&interval_ms=50 HTTP/1.1\r\nHost: t\r\n\r\n",
        b"GET /two HTTP/1.1\r\nHost: t\r\n\r\nPOST /three HTTP/1.1\r\nHost: t\r\n",
        b"Content-Length: 6\r\n\r\nabc",
        b"def",
        responses=3,
    )
    first, second, third = parse_responses(raw)
    assert first.body == b"chunk-0;chunk-1;chunk-2;chunk-3;"
    assert b'"/two"' in second.body
    assert b'"/three"' in third.body and b'"body_len": 6' in third.body


# -- request trailers are bounded like the head they follow -----------------------------------


async def test_a_trailer_section_over_max_header_bytes_gets_431(
    backends: StartBackends, start_proxy: StartProxy
) -> None:
    """Trailer fields count against ``max_header_bytes``: an endless trailer section is
    refused instead of being held in memory."""
    (backend,) = await backends(1)
    limits: dict[str, Any] = {"max_header_bytes": 1024}
    app = await start_proxy(proxy_config([pool("p", [backend])], limits=limits))
    trailers = b"".join(b"X-T%d: %s\r\n" % (i, b"v" * 100) for i in range(40))
    raw = await exchange(
        app.port,
        b"POST /t HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\n"
        + trailers
        + b"\r\n",
    )
    assert_json_error(parse_responses(raw)[0], 431, "headers_too_large")


async def test_one_endless_trailer_line_gets_431_before_it_ends(
    backends: StartBackends, start_proxy: StartProxy
) -> None:
    """A trailer line that never ends is held by the parser, not handed over: the bytes of
    reads without body are counted, and the client is refused long before its line ends."""
    (backend,) = await backends(1)
    limits: dict[str, Any] = {"max_header_bytes": 4096}
    app = await start_proxy(proxy_config([pool("p", [backend])], limits=limits))
    head = b"POST /t HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
    endless = [b"0\r\nX-Trailer: "] + [b"v" * 1024] * 8
    raw = await exchange(app.port, head, *endless)
    assert_json_error(parse_responses(raw)[0], 431, "headers_too_large")


async def test_a_backends_endless_trailer_line_cuts_its_response(
    raw_backend: Callable[[Behaviour], Awaitable[RawBackend]], start_proxy: StartProxy
) -> None:
    """The same from a backend: its response is cut once its framing outgrows the head's
    bound, and the proxy keeps serving."""

    async def behave(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, backend: RawBackend
    ) -> None:
        await read_head(reader, backend)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nX: ")
        for _ in range(400):  # 400 KiB of one trailer line, past the 256 KiB bound
            writer.write(b"v" * 1024)
            await writer.drain()
        await asyncio.sleep(2 * READ_TIMEOUT_S)  # and the line never ends

    backend = await raw_backend(behave)
    # No idle timeout to cut the response for its silence: only the bound may.
    timeouts = {**FAST_TIMEOUTS, "idle_s": 60}
    app = await start_proxy(proxy_config([raw_pool(backend, timeouts=timeouts)]))
    reader, writer = await asyncio.open_connection("127.0.0.1", app.port)
    writer.write(GET)
    raw = await asyncio.wait_for(reader.read(-1), READ_TIMEOUT_S)  # to the proxy's close
    writer.close()
    (resp,) = parse_responses(raw)
    assert resp.status == 200 and not resp.complete  # started, then visibly cut
    assert b"X: " not in raw


async def test_a_passed_on_429_does_not_hold_its_backend(
    backends: StartBackends, start_proxy: StartProxy
) -> None:
    """A 429 is often one tenant's quota: answered to that client, it takes its backend out of
    rotation for nobody else (a 503 with Retry-After does)."""
    b0, b1 = await backends(2)
    app = await start_proxy(proxy_config([pool("p", [b0, b1], retry={"max_retries": 0})]))
    raw = await exchange(app.port, b"GET /status/429?retry_after=30 HTTP/1.1\r\nHost: t\r\n\r\n")
    assert parse_responses(raw)[0].status == 429
    served = []
    for _ in range(4):
        raw = await exchange(app.port, GET)
        served.append(parse_responses(raw)[0].headers[b"x-lb-backend"])
    assert set(served) == {b"b0", b"b1"}


# -- a client that stalls its body is the one timed out, not the backend ----------------------


async def test_a_stalled_request_body_gets_408_and_counts_nothing_against_the_backend(
    backends: StartBackends, start_proxy: StartProxy
) -> None:
    """The backend waits for a body that never comes: the client gets 408, and outlier
    detection (one failure ejects) leaves both backends in service."""
    b0, b1 = await backends(2)
    extra: dict[str, Any] = {
        "timeouts": {"response_headers_s": 0.3},
        "retry": {"max_retries": 0},
        "outlier_detection": {"consecutive_failures": 1},
    }
    app = await start_proxy(proxy_config([pool("p", [b0, b1], **extra)]))
    stalled = b"POST /up HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n{"
    raws = await asyncio.gather(exchange(app.port, stalled), exchange(app.port, stalled))
    for raw in raws:
        assert_json_error(parse_responses(raw)[0], 408, "request_timeout")
    assert all(b.ejected_until_s == 0.0 for b in proxy_of(app).pools["p"].backends)


async def test_a_client_still_sending_when_the_backend_times_out_is_the_one_timed_out(
    raw_backend: Callable[[Behaviour], Awaitable[RawBackend]], start_proxy: StartProxy
) -> None:
    """A body that keeps coming, a byte now and then, to a backend that reads it all and
    answers nothing: the backend may be waiting for the rest, so the client gets the 408 and
    the backend is not judged (dribbling uploads must not get healthy backends ejected)."""

    async def behave(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, backend: RawBackend
    ) -> None:
        await read_head(reader, backend)
        await read_all(reader, backend)  # reads what comes, answers nothing

    backend = await raw_backend(behave)
    extra: dict[str, Any] = {
        "timeouts": {"response_headers_s": 0.5},
        "outlier_detection": {"consecutive_failures": 1},
    }
    app = await start_proxy(proxy_config([raw_pool(backend, **extra)]))
    head = b"POST /up HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n"
    raw = await exchange(app.port, head, *[b"x"] * 20)  # a byte every 50 ms
    assert_json_error(parse_responses(raw)[0], 408, "request_timeout")
    (judged,) = proxy_of(app).pools["p"].backends
    assert judged.ejected_until_s == 0.0 and judged.failures_total == 0


async def test_a_backend_that_stops_reading_the_body_is_the_one_timed_out(
    raw_backend: Callable[[Behaviour], Awaitable[RawBackend]], start_proxy: StartProxy
) -> None:
    """The client sends a body faster than the backend reads it (the backend read only the
    head): the bytes pile up in front of the backend, and its timeout is its own (504)."""

    async def behave(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, backend: RawBackend
    ) -> None:
        await read_head(reader, backend)
        await asyncio.sleep(READ_TIMEOUT_S)  # reads nothing more

    backend = await raw_backend(behave)
    size = 32 << 20  # more than the loopback socket buffers hold
    # Time enough for the body to fill them and pile up in the proxy, on a slow machine too.
    extra: dict[str, Any] = {"timeouts": {"response_headers_s": 2}}
    app = await start_proxy(proxy_config([raw_pool(backend, **extra)]))
    head = b"POST /up HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % size
    reader, writer = await asyncio.open_connection("127.0.0.1", app.port)
    try:
        writer.write(head)
        sender = asyncio.create_task(_send_zeros(writer, size))
        raw = await asyncio.wait_for(reader.read(65536), READ_TIMEOUT_S)
        sender.cancel()
    finally:
        writer.close()
    assert_json_error(parse_responses(raw)[0], 504, "timeout")


async def _send_zeros(writer: asyncio.StreamWriter, size: int) -> None:
    piece = bytes(1 << 20)
    for _ in range(size >> 20):
        writer.write(piece)
        await writer.drain()


@pytest.mark.parametrize("route", ["plain", "model"])
async def test_a_body_that_stops_coming_gets_408_after_body_timeout_s(
    backends: StartBackends, start_proxy: StartProxy, route: str
) -> None:
    """Head and part of the body, then nothing: after limits.body_timeout_s the client gets
    a 408 and the connection closes, whether the body was being forwarded or read whole for
    routing (a model route), and however long the backend's own timeouts are."""
    (backend,) = await backends(1)
    config = proxy_config([pool("p", [backend], timeouts={"response_headers_s": 60})])
    config["limits"] = {"body_timeout_s": 0.3}
    if route == "model":
        config["routes"] = [{"pool": "p", "model": "m1"}, {"pool": "p"}]
    app = await start_proxy(config)
    stalled = b'POST /up HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n{"model": '
    async with asyncio.timeout(3):
        raw = await exchange(app.port, stalled, responses=2)
    assert_json_error(parse_responses(raw)[0], 408, "request_timeout")
    assert b"request body stopped" in raw
    proxy = proxy_of(app)
    for _ in range(40):  # bounded: 2 s
        if not proxy.connections and not proxy.active_requests:
            break
        await asyncio.sleep(0.05)
    assert not proxy.connections and not proxy.active_requests


async def test_a_body_sent_slowly_but_steadily_is_not_timed_out(
    backends: StartBackends, start_proxy: StartProxy
) -> None:
    """body_timeout_s bounds the gaps, not the whole upload: a byte every 0.2 s with a 1 s
    timeout gets through, 1.6 s in all."""
    (backend,) = await backends(1)
    config = proxy_config([pool("p", [backend])])
    config["limits"] = {"body_timeout_s": 1.0}
    app = await start_proxy(config)
    head = b"POST /up HTTP/1.1\r\nHost: t\r\nContent-Length: 8\r\nConnection: close\r\n\r\n"
    reader, writer = await asyncio.open_connection("127.0.0.1", app.port)
    try:
        writer.write(head)
        for _ in range(8):
            await asyncio.sleep(0.2)
            writer.write(b"x")
        raw = await asyncio.wait_for(reader.read(), READ_TIMEOUT_S)
    finally:
        writer.close()
    (response,) = parse_responses(raw)
    assert response.status == 200
    assert json.loads(response.body)["body_len"] == 8


async def test_a_client_that_reads_nothing_is_not_the_backends_failure(
    raw_backend: Callable[[Behaviour], Awaitable[RawBackend]], start_proxy: StartProxy
) -> None:
    """The client stops reading a large answer: the proxy stops reading the backend, and
    when idle_s ends the stream it is not counted against the backend."""
    size = 32 << 20
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + bytes(size)
    backend = await raw_backend(answers(answer, then="stall"))
    extra: dict[str, Any] = {
        "timeouts": {"response_headers_s": 5, "idle_s": 0.3},
        "outlier_detection": {"consecutive_failures": 1},
    }
    app = await start_proxy(proxy_config([raw_pool(backend, **extra)]))
    reader, writer = await asyncio.open_connection("127.0.0.1", app.port)
    try:
        writer.write(GET)
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT_S)
        proxy = proxy_of(app)
        for _ in range(60):  # bounded: 3 s; the stream ends 0.3 s after the buffers fill
            if not proxy.active_requests:
                break
            await asyncio.sleep(0.05)
        assert not proxy.active_requests
    finally:
        writer.close()
    (judged,) = proxy_of(app).pools["p"].backends
    assert judged.ejected_until_s == 0.0 and judged.failures_total == 0


async def test_a_connection_over_max_connections_reads_a_503_and_the_rest_are_served(
    backends, start_proxy
):
    """Three idle connections fill ``max_connections: 3``; a fourth gets a 503 with
    Retry-After it can read (not an empty reply), and once one closes, a new one is served."""
    (b0,) = await backends(1)
    app = await start_proxy(proxy_config([pool("chat", [b0])], limits={"max_connections": 3}))
    held = [await asyncio.open_connection("127.0.0.1", app.port) for _ in range(3)]
    try:
        for _ in range(100):  # bounded: 5 s, until the proxy has taken all three
            if len(app.proxy.connections) == 3:
                break
            await asyncio.sleep(0.05)
        refused = await raw_exchange(app.port, b"GET / HTTP/1.1\r\nhost: lb\r\n\r\n")
        head, _, body = refused.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503 ")
        assert b"retry-after: 1" in head.lower()
        assert json.loads(body)["error"]["type"] == "overloaded"
    finally:
        for _, writer in held:
            writer.close()
    for _ in range(100):
        if not app.proxy.connections:
            break
        await asyncio.sleep(0.05)
    served = await raw_exchange(
        app.port, b"GET / HTTP/1.1\r\nhost: lb\r\nconnection: close\r\n\r\n"
    )
    assert served.startswith(b"HTTP/1.1 200 ")
