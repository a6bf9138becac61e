"""WebSocket through the proxy: the handshake is forwarded, a 101 turns both connections into a
tunnel, and either side's close ends it. Real aiohttp WebSocket servers and clients on
127.0.0.1."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType, web

from lb.app import App
from tests.conftest import proxy_config, raw_exchange

READ_TIMEOUT_S = 5.0
WS_TIMEOUT = aiohttp.ClientWSTimeout(ws_receive=READ_TIMEOUT_S, ws_close=READ_TIMEOUT_S)


@dataclass
class WSBackend:
    name: str
    port: int = 0
    sessions: int = 0
    open_sessions: int = 0
    closed_by_client: int = 0
    request_headers: list[dict[str, str]] = field(default_factory=list)
    close_after_first: bool = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture
async def ws_backends() -> AsyncIterator[Callable[[int], Awaitable[list[WSBackend]]]]:
    """Factory: ``await ws_backends(n)`` starts ``n`` servers whose ``/ws`` echoes every
    message back prefixed with the server's name; ``/plain`` is an ordinary JSON route."""
    runners: list[web.AppRunner] = []

    async def start(n: int) -> list[WSBackend]:
        out = []
        for _i in range(n):
            backend = WSBackend(name=f"ws{len(runners)}")

            async def ws(request: web.Request, b: WSBackend = backend) -> web.WebSocketResponse:
                b.sessions += 1
                b.open_sessions += 1
                b.request_headers.append(dict(request.headers))
                sock = web.WebSocketResponse()
                await sock.prepare(request)
                try:
                    async for msg in sock:
                        if msg.type == WSMsgType.TEXT:
                            await sock.send_str(f"{b.name}:{msg.data}")
                        elif msg.type == WSMsgType.BINARY:
                            await sock.send_bytes(msg.data[::-1])
                        if b.close_after_first:
                            await sock.close()
                    if sock.close_code == aiohttp.WSCloseCode.OK:
                        b.closed_by_client += 1
                finally:
                    b.open_sessions -= 1
                return sock

            async def plain(request: web.Request, b: WSBackend = backend) -> web.Response:
                return web.json_response({"backend": b.name, "path": request.path})

            app = web.Application()
            app.router.add_get("/ws", ws)
            app.router.add_get("/{tail:.*}", plain)
            runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            backend.port = runner.addresses[0][1]
            runners.append(runner)
            out.append(backend)
        return out

    yield start
    for runner in runners:
        await runner.cleanup()


def ws_pool(backends: list[WSBackend], **extra: Any) -> dict[str, Any]:
    return {
        "name": "realtime",
        "strategy": "least_connections",
        "backends": [{"url": b.url, "name": b.name} for b in backends],
        "health_check": {"enabled": False},
        **extra,
    }


def ws_url(app: App, path: str = "/ws") -> str:
    return f"ws://127.0.0.1:{app.port}{path}"


async def until(check: Callable[[], bool], timeout_s: float = READ_TIMEOUT_S) -> None:
    for _ in range(int(timeout_s / 0.02)):
        if check():
            return
        await asyncio.sleep(0.02)
    assert check()


async def test_messages_cross_the_tunnel_both_ways(ws_backends, start_proxy):
    (b0,) = await ws_backends(1)
    app = await start_proxy(proxy_config([ws_pool([b0])]))
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(ws_url(app), timeout=WS_TIMEOUT) as sock,
    ):
        for i in range(20):
            await sock.send_str(f"hello {i}")
            msg = await sock.receive(timeout=READ_TIMEOUT_S)
            assert (msg.type, msg.data) == (WSMsgType.TEXT, f"ws0:hello {i}")
        await sock.send_bytes(b"\x00\x01\x02" * 10000)  # frames larger than a socket read
        msg = await sock.receive(timeout=READ_TIMEOUT_S)
        assert msg.data == (b"\x00\x01\x02" * 10000)[::-1]
    assert b0.sessions == 1


async def test_the_handshake_reaches_the_backend_with_its_websocket_headers(
    ws_backends, start_proxy
):
    (b0,) = await ws_backends(1)
    app = await start_proxy(proxy_config([ws_pool([b0])]))
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(ws_url(app), protocols=("chat.v1",), timeout=WS_TIMEOUT) as sock,
    ):
        await sock.send_str("x")
        await sock.receive(timeout=READ_TIMEOUT_S)
    headers = {k.lower(): v for k, v in b0.request_headers[0].items()}
    assert headers["upgrade"].lower() == "websocket"
    assert "upgrade" in headers["connection"].lower()
    assert headers["sec-websocket-protocol"] == "chat.v1"
    assert headers["sec-websocket-version"] == "13"
    assert "x-forwarded-for" in headers


async def test_closing_from_the_client_ends_the_session_and_frees_the_backend(
    ws_backends, start_proxy
):
    (b0,) = await ws_backends(1)
    app = await start_proxy(proxy_config([ws_pool([b0])]))
    backend = app.proxy.pools["realtime"].backends[0]
    async with aiohttp.ClientSession() as session:
        sock = await session.ws_connect(ws_url(app), timeout=WS_TIMEOUT)
        await sock.send_str("hi")
        await sock.receive(timeout=READ_TIMEOUT_S)
        assert backend.in_flight == 1  # a live session counts as load on its backend
        await sock.close()
    await until(lambda: b0.open_sessions == 0 and backend.in_flight == 0)
    assert b0.closed_by_client == 1
    assert app.proxy.pools["realtime"].stats.responses_by_class[1] == 1  # one 101


async def test_closing_from_the_backend_reaches_the_client(ws_backends, start_proxy):
    (b0,) = await ws_backends(1)
    b0.close_after_first = True
    app = await start_proxy(proxy_config([ws_pool([b0])]))
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(ws_url(app), timeout=WS_TIMEOUT) as sock,
    ):
        await sock.send_str("only")
        first = await sock.receive(timeout=READ_TIMEOUT_S)
        assert first.data == "ws0:only"
        closing = await sock.receive(timeout=READ_TIMEOUT_S)
        assert closing.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED)
    backend = app.proxy.pools["realtime"].backends[0]
    await until(lambda: backend.in_flight == 0)


async def test_sessions_are_balanced_over_the_backends(ws_backends, start_proxy):
    """least_connections sees open sessions as load: four sessions held open land two and
    two on two backends."""
    b0, b1 = await ws_backends(2)
    app = await start_proxy(proxy_config([ws_pool([b0, b1])]))
    async with aiohttp.ClientSession() as session:
        socks = []
        for _ in range(4):
            sock = await session.ws_connect(ws_url(app), timeout=WS_TIMEOUT)
            await sock.send_str("hi")
            await sock.receive(timeout=READ_TIMEOUT_S)
            socks.append(sock)
        assert (b0.open_sessions, b1.open_sessions) == (2, 2)
        for sock in socks:
            await sock.close()


async def test_a_handshake_the_backend_does_not_accept_is_an_ordinary_answer(
    ws_backends, start_proxy
):
    """A backend that answers the handshake with a plain 200 is relayed as such, and the
    client connection goes on as HTTP: a request pipelined after the handshake is answered."""
    (b0,) = await ws_backends(1)
    app = await start_proxy(proxy_config([ws_pool([b0])]))
    raw = await raw_exchange(
        app.port,
        b"GET /plain HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        b"GET /after HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        read_timeout_s=2.0,
    )
    assert raw.startswith(b"HTTP/1.1 200")
    assert raw.count(b"HTTP/1.1 200") == 2
    assert b'"path": "/plain"' in raw and b'"path": "/after"' in raw


async def test_an_idle_tunnel_is_closed_after_the_idle_timeout(ws_backends, start_proxy):
    (b0,) = await ws_backends(1)
    app = await start_proxy(proxy_config([ws_pool([b0], timeouts={"idle_s": 0.3})]))
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(ws_url(app), timeout=WS_TIMEOUT, autoping=False, heartbeat=None) as sock,
    ):
        await sock.send_str("hi")
        await sock.receive(timeout=READ_TIMEOUT_S)
        msg = await sock.receive(timeout=READ_TIMEOUT_S)  # nothing sent: the proxy ends it
        assert msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.ERROR)
    await until(lambda: b0.open_sessions == 0)


async def test_a_tunnel_the_client_alone_keeps_busy_outlives_the_idle_timeout(start_proxy):
    """Bytes from the client count as activity even when the backend answers nothing: the
    tunnel lasts as long as they keep coming less than ``idle_s`` apart, then ends."""
    got = bytearray()

    async def silent_upgrade(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
        )
        while piece := await reader.read(100):
            got.extend(piece)
        writer.close()

    server = await asyncio.start_server(silent_upgrade, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    backend = WSBackend("silent", port=port)
    app = await start_proxy(proxy_config([ws_pool([backend], timeouts={"idle_s": 0.3})]))
    reader, writer = await asyncio.open_connection("127.0.0.1", app.port)
    try:
        writer.write(
            b"GET /ws HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT_S)
        assert head.startswith(b"HTTP/1.1 101")
        for _ in range(12):  # 1.2 s of client bytes 0.1 s apart: four idle periods
            writer.write(b"x")
            await asyncio.sleep(0.1)
        await until(lambda: len(got) == 12)
        assert await asyncio.wait_for(reader.read(), READ_TIMEOUT_S) == b""  # then idle: ended
    finally:
        writer.close()
        server.close()


async def test_a_client_gone_mid_handshake_leaves_nothing_behind(ws_backends, start_proxy):
    (b0,) = await ws_backends(1)
    app = await start_proxy(proxy_config([ws_pool([b0])]))
    for _ in range(5):
        _reader, writer = await asyncio.open_connection("127.0.0.1", app.port)
        writer.write(
            b"GET /ws HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
            b"\x81\x85garbage-that-is-not-masked-properly"
        )
        await writer.drain()
        writer.close()
        await writer.wait_closed()
    backend = app.proxy.pools["realtime"].backends[0]
    await until(lambda: backend.in_flight == 0 and b0.open_sessions == 0)
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(ws_url(app), timeout=WS_TIMEOUT) as sock,
    ):
        await sock.send_str("still fine")
        assert (await sock.receive(timeout=READ_TIMEOUT_S)).data == "ws0:still fine"
