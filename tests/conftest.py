"""Shared fixtures: real aiohttp backends on 127.0.0.1 with faults injected in the server, and
a real proxy (``lb.app.App``) started in the test's event loop on ephemeral ports."""

from __future__ import annotations

import asyncio
import hashlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import uvloop
from aiohttp import web

from lb import native
from lb.app import App
from lb.config import parse_config

_HANDED_OUT: set[int] = set()


# The data plane's own tests also run on the standard loop; everything else runs on uvloop,
# the loop the product runs on.
_BOTH_LOOPS = ("test_proxy.py", "test_http_framing.py", "test_websocket.py")


def pytest_report_header(config: pytest.Config) -> str:
    """Which build of the data plane the suite runs on (lb/native.py)."""
    if native.build_in_use == "compiled":
        return f"lb build: compiled ({len(native.COMPILED)} modules in {native.native_dir()})"
    return "lb build: pure Python"


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Any]:
    """Event loops the async tests run on."""
    if item.path.name in _BOTH_LOOPS:
        return {"uvloop": uvloop.new_event_loop, "asyncio": asyncio.new_event_loop}
    return {"uvloop": uvloop.new_event_loop}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago and not handed out before."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
    raise RuntimeError("no fresh free port found")


@dataclass
class TestBackend:
    """A running aiohttp backend with counters the tests assert on."""

    name: str
    runner: web.AppRunner
    port: int
    hits: int = 0  # requests other than health probes
    probes: int = 0  # GET /health from the proxy's health checker
    healthy: bool = True  # what /health answers (200 or 503)
    active: int = 0
    aborted: int = 0
    release: asyncio.Event = field(default_factory=asyncio.Event)
    delay_s: float = 0.0  # added before answering /echo (a slow backend)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _make_app(state: dict[str, TestBackend]) -> web.Application:
    def me(request: web.Request) -> TestBackend:
        return state["backend"]

    async def echo(request: web.Request) -> web.Response:
        b = me(request)
        b.hits += 1
        body = await request.read()
        if b.delay_s:
            await asyncio.sleep(b.delay_s)
        return web.json_response(
            {
                "backend": b.name,
                "method": request.method,
                "path": request.path_qs,
                "headers": [[k, v] for k, v in request.headers.items()],
                "body_len": len(body),
                "body_sha256": hashlib.sha256(body).hexdigest(),
            },
            headers={"x-served-by": b.name},
        )

    async def stream(request: web.Request) -> web.StreamResponse:
        """``chunks`` pieces ``interval_ms`` apart; ``hold=1`` waits for ``release`` first."""
        b = me(request)
        b.hits += 1
        b.active += 1
        chunks = int(request.query.get("chunks", "5"))
        interval = float(request.query.get("interval_ms", "20")) / 1000
        sse = request.query.get("sse") == "1"
        resp = web.StreamResponse(
            headers={"content-type": "text/event-stream" if sse else "text/plain"}
        )
        try:
            await resp.prepare(request)
            if request.query.get("hold") == "1":
                await b.release.wait()
            for i in range(chunks):
                piece = f"data: {i}\n\n" if sse else f"chunk-{i};"
                await resp.write(piece.encode())
                await asyncio.sleep(interval)
            await resp.write_eof()
        except (asyncio.CancelledError, ConnectionResetError):
            b.aborted += 1
            raise
        finally:
            b.active -= 1
        return resp

    async def drop(request: web.Request) -> web.StreamResponse:
        """Send the head and part of a declared body, then cut the connection."""
        me(request).hits += 1
        resp = web.StreamResponse(headers={"content-length": "100"})
        await resp.prepare(request)
        await resp.write(b"x" * 10)
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.abort()
        return resp

    async def status(request: web.Request) -> web.Response:
        me(request).hits += 1
        code = int(request.match_info["code"])
        headers = {}
        if "retry_after" in request.query:
            headers["Retry-After"] = request.query["retry_after"]
        return web.json_response({"status": code}, status=code, headers=headers)

    async def health(request: web.Request) -> web.Response:
        b = me(request)
        b.probes += 1
        return web.json_response({"ok": b.healthy}, status=200 if b.healthy else 503)

    async def hang(request: web.Request) -> web.Response:
        me(request).hits += 1
        await asyncio.sleep(3600)
        return web.Response()

    app = web.Application(client_max_size=64 << 20)
    app.router.add_get("/stream", stream)
    app.router.add_get("/drop", drop)
    app.router.add_get("/hang", hang)
    app.router.add_get("/health", health)
    app.router.add_route("*", "/status/{code}", status)
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


@pytest.fixture
async def backends() -> AsyncIterator[Callable[..., Awaitable[list[TestBackend]]]]:
    """Factory: ``await backends(n)`` starts ``n`` test backends named b0, b1, ..."""
    started: list[TestBackend] = []

    async def start(n: int) -> list[TestBackend]:
        out = []
        for _ in range(n):
            state: dict[str, TestBackend] = {}
            runner = web.AppRunner(_make_app(state), access_log=None, shutdown_timeout=0.1)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            port = runner.addresses[0][1]
            b = TestBackend(name=f"b{len(started)}", runner=runner, port=port)
            state["backend"] = b
            started.append(b)
            out.append(b)
        return out

    yield start
    for b in started:
        b.release.set()
        await b.runner.cleanup()


# The admin token of every proxy_config: admin calls that change something need one.
ADMIN_TOKEN = "0123456789abcdef0123456789abcdef"
ADMIN_AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def proxy_config(pools: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """A config dict on free ports with the given pools and extra top-level keys."""
    return {
        "listen": {"host": "127.0.0.1", "port": free_port()},
        "admin": {"host": "127.0.0.1", "port": free_port(), "token": ADMIN_TOKEN},
        "pools": pools,
        "shutdown": {"grace_s": 0},
        **extra,
    }


def pool(name: str, backends: list[TestBackend], strategy: str = "round_robin", **extra: Any):  # type: ignore[no-untyped-def]
    """A pool entry whose backends are named after the test backends."""
    return {
        "name": name,
        "strategy": strategy,
        "backends": [{"url": b.url, "name": b.name} for b in backends],
        **extra,
    }


@pytest.fixture
async def start_proxy() -> AsyncIterator[Callable[[dict[str, Any]], Awaitable[App]]]:
    """Factory: ``await start_proxy(config_dict)`` runs the proxy until the test ends."""
    apps: list[App] = []

    async def start(config: dict[str, Any]) -> App:
        app = App(parse_config(config, "test"), "test")
        await app.start()
        apps.append(app)
        return app

    yield start
    for app in apps:
        await app.shutdown()


def url(app: App, path: str = "/") -> str:
    return f"http://127.0.0.1:{app.port}{path}"


async def raw_exchange(port: int, data: bytes, *, read_timeout_s: float = 5.0) -> bytes:
    """Send raw bytes to 127.0.0.1:``port`` and read until the peer closes or goes quiet."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        out = b""
        while True:
            try:
                piece = await asyncio.wait_for(reader.read(65536), read_timeout_s)
            except TimeoutError:
                break
            if not piece:
                break
            out += piece
        return out
    finally:
        writer.close()


START_TIMEOUT_S = 15.0


async def wait_listening(port: int, proc: asyncio.subprocess.Process) -> None:
    """Return once 127.0.0.1:``port`` accepts connections; fail if the process exits first."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + START_TIMEOUT_S
    while loop.time() < deadline:
        assert proc.returncode is None, "the proxy exited during start-up"
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        return
    raise AssertionError(f"the proxy did not listen on {port} within {START_TIMEOUT_S}s")
