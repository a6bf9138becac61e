"""HTTP/1.1 message framing through the proxy, byte for byte: raw sockets on the client side,
real aiohttp backends behind the proxy on 127.0.0.1."""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httptools
import pytest
from aiohttp import web

from lb.app import App
from tests.conftest import pool, proxy_config, raw_exchange

READ_TIMEOUT_S = 5.0
FAST_TIMEOUTS = {"header_timeout_s": 0.3, "keepalive_timeout_s": 0.3}

Headers = list[tuple[bytes, bytes]]


# -- a tiny HTTP/1.1 client that sees exactly what the proxy writes -------------------------


@dataclass
class Response:
    """One response as parsed by llhttp from the bytes the proxy wrote."""

    status: int = 0
    headers: Headers = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    trailers: Headers = field(default_factory=list)

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (any case), or ``None``."""
        want = name.lower().encode()
        for key, value in self.headers:
            if key.lower() == want:
                return value.decode()
        return None

    def json(self) -> Any:
        return json.loads(self.body)


class _Collector:
    """httptools callbacks that split a response byte stream into :class:`Response` objects."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.done: deque[Response] = deque()
        self.head_done = False
        self._cur: Response | None = None

    def on_message_begin(self) -> None:
        self._cur = Response()
        self.head_done = False

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self._cur is not None
        (self._cur.trailers if self.head_done else self._cur.headers).append((name, value))

    def on_headers_complete(self) -> None:
        assert self._cur is not None
        self._cur.status = self.parser.get_status_code()
        self.head_done = True

    def on_body(self, body: bytes) -> None:
        assert self._cur is not None
        self._cur.body += body

    def on_message_complete(self) -> None:
        assert self._cur is not None
        self.done.append(self._cur)
        self._cur = None


def parse_head(raw: bytes) -> Response:
    """The status and headers of a response head (``raw`` ends at the blank line)."""
    collector = _Collector()
    collector.parser.feed_data(raw)
    assert collector.head_done, raw
    assert collector._cur is not None
    return collector._cur


class RawClient:
    """One client connection: writes exact bytes, reads responses as llhttp frames them."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self._buf = b""  # bytes read but not yet given to the parser
        self._collector = _Collector()

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def _read_more(self) -> bytes:
        data = await self.reader.read(65536)
        self._buf += data
        return data

    async def response(self, timeout_s: float = READ_TIMEOUT_S) -> Response:
        """The next complete response; fails if the connection closes or stalls first."""
        collector = self._collector
        async with asyncio.timeout(timeout_s):
            while True:
                if self._buf:
                    data, self._buf = self._buf, b""
                    collector.parser.feed_data(data)
                if collector.done:
                    return collector.done.popleft()
                if not await self._read_more():
                    raise AssertionError("connection closed before a complete response")

    async def head_only(self, timeout_s: float = READ_TIMEOUT_S) -> tuple[Response, bytes]:
        """A response head with no body (HEAD); returns it and whatever bytes followed it."""
        async with asyncio.timeout(timeout_s):
            while b"\r\n\r\n" not in self._buf:
                if not await self._read_more():
                    raise AssertionError(f"connection closed mid-head: {self._buf!r}")
        end = self._buf.index(b"\r\n\r\n") + 4
        head, self._buf = self._buf[:end], self._buf[end:]
        return parse_head(head), self._buf

    async def rest_until_eof(self, timeout_s: float = READ_TIMEOUT_S) -> bytes:
        """Every byte until the proxy closes the connection; fails if it stays open."""
        out = self._buf
        self._buf = b""
        async with asyncio.timeout(timeout_s):
            while True:
                try:
                    piece = await self.reader.read(65536)
                except ConnectionResetError:
                    return out
                if not piece:
                    return out
                out += piece


@asynccontextmanager
async def connect(app: App) -> AsyncIterator[RawClient]:
    reader, writer = await asyncio.open_connection("127.0.0.1", app.port)
    try:
        yield RawClient(reader, writer)
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass


def assert_json_error(resp: Response, status: int, error_type: str) -> None:
    """``resp`` is a proxy error with ``status`` in the stable JSON shape."""
    assert resp.status == status, bytes(resp.body)
    assert resp.header("content-type") == "application/json"
    doc = resp.json()
    assert set(doc) == {"error"}
    assert set(doc["error"]) == {"type", "message", "pool"}
    assert doc["error"]["type"] == error_type
    assert isinstance(doc["error"]["message"], str) and doc["error"]["message"]


def parse_close_delimited(raw: bytes) -> tuple[Response, bytes]:
    """Split a response read until close into its head and its raw body bytes."""
    end = raw.index(b"\r\n\r\n") + 4
    return parse_head(raw[:end]), raw[end:]


def parse_one_response(raw: bytes) -> Response:
    """The single complete response in ``raw`` (bytes read until the proxy closed)."""
    collector = _Collector()
    collector.parser.feed_data(raw)
    assert len(collector.done) == 1, raw
    return collector.done[0]


async def start(backends, start_proxy, **limits: Any):  # type: ignore[no-untyped-def]
    """One test backend behind a proxy with the given ``limits``; returns both."""
    (backend,) = await backends(1)
    extra = {"limits": limits} if limits else {}
    app = await start_proxy(proxy_config([pool("p", [backend])], **extra))
    return backend, app


def get(path: str, *extra: bytes) -> bytes:
    return b"GET %s HTTP/1.1\r\nHost: t\r\n%s\r\n" % (path.encode(), b"".join(extra))


# -- pipelining, 100-continue -----------------------------------------------------------------


async def test_two_pipelined_gets_in_one_send_are_answered_in_order(backends, start_proxy):
    """Two GETs written in a single send get two answers, in request order, on one connection."""
    backend, app = await start(backends, start_proxy)
    async with connect(app) as client:
        await client.send(get("/first") + get("/second"))
        first = await client.response()
        second = await client.response()
    assert (first.status, second.status) == (200, 200)
    assert first.json()["path"] == "/first"
    assert second.json()["path"] == "/second"
    assert backend.hits == 2


async def test_expect_continue_gets_100_before_the_body_is_sent(backends, start_proxy):
    """With ``Expect: 100-continue`` the proxy answers 100 first, then relays the body intact."""
    _, app = await start(backends, start_proxy)
    body = b"0123456789" * 1000
    async with connect(app) as client:
        await client.send(
            b"POST /upload HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body)
        )
        interim = await client.response()
        assert interim.status == 100
        await client.send(body)
        final = await client.response()
    assert final.status == 200
    assert final.json()["body_len"] == len(body)
    assert final.json()["body_sha256"] == hashlib.sha256(body).hexdigest()


# -- ambiguous framing and limits are refused before a backend sees anything ------------------


async def test_content_length_with_transfer_encoding_is_refused(backends, start_proxy):
    """A request with both Content-Length and Transfer-Encoding gets 400 and never reaches a
    backend."""
    backend, app = await start(backends, start_proxy)
    async with connect(app) as client:
        await client.send(
            b"POST /smuggle HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        )
        resp = await client.response()
        assert await client.rest_until_eof() == b""
    assert_json_error(resp, 400, "bad_request")
    assert backend.hits == 0


async def test_a_transfer_coding_other_than_chunked_is_refused_with_501(backends, start_proxy):
    """``Transfer-Encoding: gzip, chunked`` would lose its gzip coding upstream, so it gets 501."""
    backend, app = await start(backends, start_proxy)
    async with connect(app) as client:
        await client.send(
            b"POST /te HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
            b"5\r\nhello\r\n0\r\n\r\n"
        )
        resp = await client.response()
    assert_json_error(resp, 501, "not_implemented")
    assert backend.hits == 0


async def test_connect_is_refused_with_405(backends, start_proxy):
    """CONNECT tunnels are not offered: 405, and nothing reaches a backend."""
    backend, app = await start(backends, start_proxy)
    async with connect(app) as client:
        await client.send(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
        resp = await client.response()
    assert_json_error(resp, 405, "method_not_allowed")
    assert backend.hits == 0


async def test_an_upgrade_request_without_body_is_answered_as_plain_http(backends, start_proxy):
    """An upgrade other than WebSocket (h2c) is not proxied: the request is served as HTTP/1.1."""
    _backend, app = await start(backends, start_proxy)
    async with connect(app) as client:
        await client.send(
            b"GET /up HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
            b"GET /after HTTP/1.1\r\nHost: t\r\n\r\n"
        )
        first = await client.response()
        second = await client.response()
    assert first.status == 200 and first.json()["path"] == "/up"
    assert "upgrade" not in {k.lower() for k, _ in first.json()["headers"]}
    assert second.status == 200 and second.json()["path"] == "/after"


async def test_two_different_content_lengths_are_refused(backends, start_proxy):
    """A request with two different Content-Length values gets 400 and never reaches a backend."""
    backend, app = await start(backends, start_proxy)
    async with connect(app) as client:
        await client.send(
            b"POST /smuggle HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n"
            b"Content-Length: 6\r\n\r\nhello!"
        )
        resp = await client.response()
        assert await client.rest_until_eof() == b""
    assert_json_error(resp, 400, "bad_request")
    assert backend.hits == 0


@pytest.mark.parametrize(
    "head",
    [
        b"GET /nohost HTTP/1.1\r\n\r\n",
        b"GET /twohosts HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    ],
    ids=["no Host", "two Host headers"],
)
async def test_an_http11_request_without_exactly_one_host_gets_400(backends, start_proxy, head):
    """RFC 9112 section 3.2: no Host, or more than one, is a JSON 400 that reaches no backend."""
    backend, app = await start(backends, start_proxy)
    async with connect(app) as client:
        await client.send(head)
        resp = await client.response()
    assert_json_error(resp, 400, "bad_request")
    assert backend.hits == 0


async def test_an_http10_request_without_host_is_served(backends, start_proxy):
    backend, app = await start(backends, start_proxy)
    raw = await raw_exchange(app.port, b"GET /old HTTP/1.0\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 200 ")
    assert backend.hits == 1


async def test_an_absolute_form_target_is_routed_by_its_path_with_its_authority_as_host(
    backends, start_proxy
):
    """``GET http://authority/path`` matches routes on ``/path``; the backend sees the path."""
    (b0,) = await backends(1)
    routes = [{"path_prefix": "/v1/", "pool": "chat"}]
    app = await start_proxy(proxy_config([pool("chat", [b0])], routes=routes))
    raw = await raw_exchange(
        app.port,
        b"GET http://models.example:8080/v1/x?q=1 HTTP/1.1\r\nHost: other\r\n"
        b"Connection: close\r\n\r\n",
    )
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), raw
    echoed = json.loads(body)
    assert echoed["path"] == "/v1/x?q=1"
    assert ["Host", "models.example:8080"] in echoed["headers"]


async def test_headers_over_max_header_bytes_get_431(backends, start_proxy):
    """A request line and headers larger than ``max_header_bytes`` get 431 and reach no
    backend."""
    backend, app = await start(backends, start_proxy, max_header_bytes=1024)
    many = b"".join(b"X-Filler-%02d: %s\r\n" % (i, b"v" * 40) for i in range(40))
    async with connect(app) as client:
        await client.send(get("/big-head", many))
        resp = await client.response()
    assert_json_error(resp, 431, "headers_too_large")
    assert backend.hits == 0


async def test_one_header_line_that_never_ends_gets_431_before_it_ends(backends, start_proxy):
    """A single header line growing past ``max_header_bytes`` is refused while still open."""
    backend, app = await start(backends, start_proxy, max_header_bytes=1024)
    async with connect(app) as client:
        await client.send(b"GET / HTTP/1.1\r\nHost: x\r\nX-Endless: ")
        for _ in range(8):
            await client.send(b"v" * 512)
        resp = await client.response()
    assert_json_error(resp, 431, "headers_too_large")
    assert backend.hits == 0


async def test_content_length_over_max_body_bytes_gets_413(backends, start_proxy):
    """A declared Content-Length above ``max_body_bytes`` gets 413 and reaches no backend."""
    backend, app = await start(backends, start_proxy, max_body_bytes=1000)
    async with connect(app) as client:
        await client.send(b"POST /up HTTP/1.1\r\nHost: t\r\nContent-Length: 5000\r\n\r\n")
        resp = await client.response()
    assert_json_error(resp, 413, "body_too_large")
    assert backend.hits == 0


async def test_chunked_body_growing_past_max_body_bytes_is_never_answered_200(
    backends, start_proxy
):
    """A chunked body that grows past ``max_body_bytes`` ends in a 413 or a closed connection,
    never a 200."""
    _, app = await start(backends, start_proxy, max_body_bytes=1000)
    body = b"".join(b"100\r\n" + b"z" * 256 + b"\r\n" for _ in range(8)) + b"0\r\n\r\n"
    async with connect(app) as client:
        await client.send(
            b"POST /up HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n" + body
        )
        raw = await client.rest_until_eof()
    if raw:
        assert_json_error(parse_one_response(raw), 413, "body_too_large")


# -- bodies both ways ---------------------------------------------------------------------------


async def test_chunked_request_body_with_trailer_reaches_backend_intact(backends, start_proxy):
    """A chunked request body of several chunks plus a trailer field reaches the backend
    byte-exact."""
    _, app = await start(backends, start_proxy)
    pieces = [b"alpha-", b"b" * 3000, b"-gamma", b"\x00\xff" * 17]
    framed = b"".join(b"%x\r\n%b\r\n" % (len(p), p) for p in pieces)
    async with connect(app) as client:
        await client.send(
            b"POST /chunked HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n"
            b"Trailer: X-Checksum\r\n\r\n" + framed + b"0\r\nX-Checksum: abc\r\n\r\n"
        )
        resp = await client.response()
    whole = b"".join(pieces)
    assert resp.status == 200
    assert resp.json()["body_len"] == len(whole)
    assert resp.json()["body_sha256"] == hashlib.sha256(whole).hexdigest()


async def test_head_gets_headers_without_body_and_connection_serves_next_get(backends, start_proxy):
    """HEAD gets the backend's Content-Length and no body; the same connection then serves a
    GET."""
    _, app = await start(backends, start_proxy)
    async with connect(app) as client:
        await client.send(b"HEAD /thing HTTP/1.1\r\nHost: t\r\n\r\n")
        head, after = await client.head_only()
        assert head.status == 200
        assert head.header("content-length") is not None
        assert int(head.header("content-length") or "0") > 0
        assert head.header("transfer-encoding") is None
        assert after == b""
        # A body sent after the HEAD response would be parsed as garbage before this answer.
        await client.send(get("/after-head"))
        resp = await client.response()
    assert resp.status == 200
    assert resp.json()["method"] == "GET"
    assert resp.json()["path"] == "/after-head"


@pytest.mark.parametrize("status", [204, 304])
async def test_bodiless_status_reaches_client_without_body_and_connection_stays_usable(
    backends, start_proxy, status
):
    """A 204 or 304 from the backend reaches the client with no body and the connection then
    serves another request."""
    _, app = await start(backends, start_proxy)
    async with connect(app) as client:
        await client.send(get(f"/status/{status}"))
        resp = await client.response()
        assert resp.status == status
        assert resp.body == b""
        assert resp.header("transfer-encoding") is None
        await client.send(get("/next"))
        nxt = await client.response()
    assert nxt.status == 200
    assert nxt.json()["path"] == "/next"


# -- malformed input and timeouts --------------------------------------------------------------


async def test_malformed_request_line_gets_400_and_the_connection_is_closed(backends, start_proxy):
    """A garbage request line gets a 400 JSON error and the proxy closes that connection."""
    backend, app = await start(backends, start_proxy)
    async with connect(app) as client:
        await client.send(b"GARBAGE\r\n\r\n")
        resp = await client.response()
        assert await client.rest_until_eof() == b""
    assert_json_error(resp, 400, "bad_request")
    assert backend.hits == 0


async def test_proxy_keeps_serving_other_clients_after_a_malformed_request(backends, start_proxy):
    """After one client sends garbage, a new client is answered normally."""
    _, app = await start(backends, start_proxy)
    await raw_exchange(app.port, b"GARBAGE\r\n\r\n")
    async with connect(app) as client:
        await client.send(get("/fine"))
        resp = await client.response()
    assert resp.status == 200
    assert resp.json()["path"] == "/fine"


async def test_client_stalling_mid_headers_gets_408_after_header_timeout(backends, start_proxy):
    """A client that sends half a head and stalls is answered 408 (or closed) after
    ``header_timeout_s``."""
    backend, app = await start(backends, start_proxy, **FAST_TIMEOUTS)
    async with connect(app) as client:
        await client.send(b"GET /slow HTTP/1.1\r\nHost: t\r\nX-Half")
        raw = await client.rest_until_eof()
    if raw:
        assert_json_error(parse_one_response(raw), 408, "request_timeout")
    assert backend.hits == 0


async def test_second_request_stalling_mid_headers_gets_the_header_timeout_not_keepalive(
    backends, start_proxy
):
    """On a keep-alive connection, a head begun after a response and left unfinished has
    ``header_timeout_s`` from its first byte, not the longer keep-alive timeout."""
    backend, app = await start(
        backends, start_proxy, header_timeout_s=0.3, keepalive_timeout_s=30.0
    )
    async with connect(app) as client:
        await client.send(get("/first"))
        first = await client.response()
        await client.send(b"GET /second HTTP/1.1\r\nHost: t\r\nX-Half")
        raw = await client.rest_until_eof(timeout_s=5)
    assert first.status == 200
    assert_json_error(parse_one_response(raw), 408, "request_timeout")
    assert backend.hits == 1


async def test_client_dripping_headers_a_byte_at_a_time_is_cut_off(backends, start_proxy):
    """A client sending its head one byte at a time cannot outlast ``header_timeout_s``."""
    backend, app = await start(backends, start_proxy, **FAST_TIMEOUTS)
    head = get("/drip", b"X-Pad: %s\r\n" % (b"p" * 200))
    async with connect(app) as client:
        reader_task = asyncio.create_task(client.rest_until_eof(timeout_s=10))
        sent = 0
        for byte in head:  # 250+ bytes at 20 ms each would take over 5 s
            if reader_task.done():
                break
            try:
                await client.send(bytes([byte]))
            except OSError:
                break
            sent += 1
            await asyncio.sleep(0.02)
        raw = await reader_task
    assert sent < len(head)
    if raw:
        assert_json_error(parse_one_response(raw), 408, "request_timeout")
    assert backend.hits == 0


async def test_idle_keepalive_connection_is_closed_after_keepalive_timeout(backends, start_proxy):
    """A keep-alive connection left idle after a response is closed by the proxy after
    ``keepalive_timeout_s``."""
    _, app = await start(backends, start_proxy, **FAST_TIMEOUTS)
    async with connect(app) as client:
        await client.send(get("/once"))
        resp = await client.response()
        assert resp.status == 200
        assert resp.header("connection") is None
        assert await client.rest_until_eof() == b""


async def test_a_busy_keepalive_connection_outlives_the_header_and_keepalive_timeouts(
    backends, start_proxy
):
    """Requests arriving more often than the timeouts keep one connection serving well past
    them: each request moves the deadline on."""
    backend, app = await start(backends, start_proxy, **FAST_TIMEOUTS)
    async with connect(app) as client:
        for i in range(12):  # about 1.2 s, four times both timeouts
            await client.send(get(f"/busy{i}"))
            resp = await client.response()
            assert resp.status == 200
            assert resp.json()["path"] == f"/busy{i}"
            await asyncio.sleep(0.1)
    assert backend.hits == 12


# -- response framing --------------------------------------------------------------------------


async def test_content_length_response_keeps_its_content_length(backends, start_proxy):
    """A backend response framed by Content-Length reaches the client with the same length and
    no chunking."""
    _, app = await start(backends, start_proxy)
    async with connect(app) as client:
        await client.send(get("/sized"))
        resp = await client.response()
    assert resp.status == 200
    assert resp.header("transfer-encoding") is None
    assert resp.header("content-length") == str(len(resp.body))
    assert resp.json()["path"] == "/sized"


async def test_streamed_response_reaches_http11_client_chunked(backends, start_proxy):
    """A streamed backend response reaches an HTTP/1.1 client as ``Transfer-Encoding: chunked``
    with every piece."""
    _, app = await start(backends, start_proxy)
    async with connect(app) as client:
        await client.send(get("/stream?chunks=3&interval_ms=10"))
        resp = await client.response()
        assert resp.status == 200
        assert resp.header("transfer-encoding") == "chunked"
        assert resp.header("content-length") is None
        assert bytes(resp.body) == b"chunk-0;chunk-1;chunk-2;"
        await client.send(get("/after-stream"))
        assert (await client.response()).json()["path"] == "/after-stream"


async def test_streamed_response_reaches_http10_client_delimited_by_close(backends, start_proxy):
    """An HTTP/1.0 client gets a streamed response unchunked, ended by the connection closing."""
    _, app = await start(backends, start_proxy)
    raw = await raw_exchange(
        app.port, b"GET /stream?chunks=3&interval_ms=10 HTTP/1.0\r\nHost: t\r\n\r\n"
    )
    head, body = parse_close_delimited(raw)
    assert head.status == 200
    assert head.header("transfer-encoding") is None
    assert head.header("content-length") is None
    assert body == b"chunk-0;chunk-1;chunk-2;"


# -- header syntax -----------------------------------------------------------------------------


async def test_lower_and_mixed_case_header_names_are_forwarded(backends, start_proxy):
    """Header names in lower and mixed case reach the backend as the client spelled them."""
    _, app = await start(backends, start_proxy)
    async with connect(app) as client:
        await client.send(get("/case", b"x-lower-name: one\r\n", b"X-MiXeD-CaSe: two\r\n"))
        resp = await client.response()
    assert resp.status == 200
    seen = resp.json()["headers"]
    assert ["x-lower-name", "one"] in seen
    assert ["X-MiXeD-CaSe", "two"] in seen


@pytest.mark.parametrize(
    "bad_header",
    [
        pytest.param(b"X-Folded: first\r\n second\r\n", id="obs-fold"),
        pytest.param(b"X-Bare: one\nX-Other: two\r\n", id="bare-lf"),
    ],
)
async def test_header_with_obs_fold_or_bare_lf_is_refused(backends, start_proxy, bad_header):
    """A header folded across lines or ended by a bare LF gets 400 and never reaches a
    backend."""
    backend, app = await start(backends, start_proxy)
    async with connect(app) as client:
        await client.send(get("/strict", bad_header))
        resp = await client.response()
        assert await client.rest_until_eof() == b""
    assert_json_error(resp, 400, "bad_request")
    assert backend.hits == 0


# -- large bodies and backpressure -------------------------------------------------------------

BIG_BODY = random.Random(15).randbytes(8 << 20)


@pytest.fixture
async def big_backend() -> AsyncIterator[str]:
    """An aiohttp backend whose ``/big`` answers ``BIG_BODY`` with a Content-Length; yields its
    URL."""

    async def big(request: web.Request) -> web.Response:
        return web.Response(body=BIG_BODY, content_type="application/octet-stream")

    web_app = web.Application()
    web_app.router.add_get("/big", big)
    runner = web.AppRunner(web_app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def test_large_response_to_a_slow_reader_arrives_intact(big_backend, start_proxy):
    """An 8 MiB response read slowly in 64 KiB pieces arrives complete and byte-exact."""
    cfg = {"name": "p", "strategy": "round_robin", "backends": [{"url": big_backend}]}
    app = await start_proxy(proxy_config([cfg]))
    async with connect(app) as client:
        await client.send(get("/big"))
        head, data = await client.head_only()
        assert head.status == 200
        length = int(head.header("content-length") or "0")
        assert length == len(BIG_BODY)
        received = bytearray(data)
        for _ in range(length // 1024 + 1):  # bounded: at least 1 KiB per read or EOF
            if len(received) >= length:
                break
            piece = await asyncio.wait_for(client.reader.read(65536), READ_TIMEOUT_S)
            if not piece:
                break
            received += piece
            await asyncio.sleep(0.002)
    assert len(received) == length
    assert hashlib.sha256(received).digest() == hashlib.sha256(BIG_BODY).digest()


async def test_large_request_body_reaches_backend_intact(backends, start_proxy):
    """An 8 MiB request body written in one go reaches the backend byte-exact."""
    _, app = await start(backends, start_proxy)
    async with connect(app) as client:
        await client.send(
            b"POST /big-upload HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % len(BIG_BODY)
            + BIG_BODY
        )
        resp = await client.response()
    assert resp.status == 200
    assert resp.json()["body_len"] == len(BIG_BODY)
    assert resp.json()["body_sha256"] == hashlib.sha256(BIG_BODY).hexdigest()


@pytest.mark.parametrize("version", [b"HTTP/2.0", b"HTTP/0.9"])
async def test_a_request_line_of_another_http_version_gets_505(backends, start_proxy, version):
    """Only HTTP/1.1 and 1.0 are spoken: another version is a JSON 505 reaching no backend."""
    backend, app = await start(backends, start_proxy)
    raw = await raw_exchange(app.port, b"GET /v %s\r\nHost: t\r\n\r\n" % version)
    assert raw.startswith(b"HTTP/1.1 505 "), raw
    assert b'"http_version_not_supported"' in raw
    assert backend.hits == 0


@pytest.mark.parametrize(
    "target", [b"http://user:pw@models.example/v1/x", b"http:///v1/x"], ids=["userinfo", "no host"]
)
async def test_an_absolute_form_target_without_a_plain_host_gets_400(backends, start_proxy, target):
    """Credentials in the authority, or no authority at all: refused, never forwarded."""
    backend, app = await start(backends, start_proxy)
    raw = await raw_exchange(app.port, b"GET %s HTTP/1.1\r\nHost: t\r\n\r\n" % target)
    assert raw.startswith(b"HTTP/1.1 400 "), raw
    assert backend.hits == 0


@pytest.mark.parametrize(
    "target",
    [b"ftp://models.example/v1/x", b"*", b"models.example/v1/x", b"v1/x"],
    ids=["other-scheme", "asterisk-on-get", "no-slash-authority", "no-slash-path"],
)
async def test_a_target_that_is_no_path_nor_http_uri_gets_400(backends, start_proxy, target):
    """RFC 9112 section 3.2: origin form, an http(s) absolute URI, or * for OPTIONS; anything
    else is refused, never forwarded as received."""
    backend, app = await start(backends, start_proxy)
    raw = await raw_exchange(app.port, b"GET %s HTTP/1.1\r\nHost: t\r\n\r\n" % target)
    assert raw.startswith(b"HTTP/1.1 400 "), raw
    assert b'"bad_request"' in raw
    assert backend.hits == 0


async def test_options_asterisk_is_forwarded(backends, start_proxy):
    """``OPTIONS *`` asks about the server as a whole: the one non-path target that passes."""
    _backend, app = await start(backends, start_proxy)
    raw = await raw_exchange(
        app.port, b"OPTIONS * HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    )
    assert b"x-lb-backend: b0\r\n" in raw  # the backend's own answer, whatever it is


@pytest.mark.parametrize(
    "host",
    [b"a b", b"a/b@c", b"user@models.example", b"models.example:80:81", b"[::1", b"a\\b"],
    ids=["space", "slash-at", "userinfo", "two-ports", "open-bracket", "backslash"],
)
async def test_a_host_header_that_is_no_host_gets_400(backends, start_proxy, host):
    """RFC 9112 section 3.2: an invalid Host is a 400, not a value copied into the backend's
    request and X-Forwarded-Host."""
    backend, app = await start(backends, start_proxy)
    raw = await raw_exchange(app.port, b"GET /v HTTP/1.1\r\nHost: %s\r\n\r\n" % host)
    assert raw.startswith(b"HTTP/1.1 400 "), raw
    assert b"invalid Host header" in raw
    assert backend.hits == 0


@pytest.mark.parametrize(
    "host",
    [
        b"models.example",
        b"models.example:8080",
        b"127.0.0.1:80",
        b"[::1]:8080",
        b"",
        b"xn--bcher-kva.example",
    ],
    ids=["name", "name-port", "ipv4-port", "ipv6-port", "empty", "punycode"],
)
async def test_a_valid_host_header_is_forwarded(backends, start_proxy, host):
    backend, app = await start(backends, start_proxy)
    raw = await raw_exchange(
        app.port, b"GET /v HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % host
    )
    assert raw.startswith(b"HTTP/1.1 200 "), raw
    assert backend.hits == 1


async def test_an_http10_request_with_a_transfer_coding_ends_its_connection(backends, start_proxy):
    """RFC 9112 section 6.1: HTTP/1.0 framing with Transfer-Encoding is faulty: the request is
    read as chunked and answered, then the connection closes, keep-alive or not."""
    backend, app = await start(backends, start_proxy)
    async with connect(app) as client:
        await client.send(
            b"POST /s HTTP/1.0\r\nHost: t\r\nConnection: keep-alive\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
            b"GET /second HTTP/1.0\r\nHost: t\r\nConnection: keep-alive\r\n\r\n"
        )
        resp = await client.response()
        rest = await client.rest_until_eof()
    assert resp.status == 200
    assert resp.json()["body_len"] == 5
    assert rest == b""
    assert backend.hits == 1
