"""Test-helper endpoints of the simulated server: ``/echo``, ``/stream``, ``/sleep``, ``/status``.

They reach the server they run in only through :class:`HelperHost`, stored under
:data:`HELPER_HOST`, so this module does not import ``backends.sim`` (imports flow one way).
The server's middleware applies the ``hang`` and ``error_rate`` faults to them, and turns a
raised 4xx into an OpenAI error body.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Protocol

from aiohttp import web

from backends.faults import ChunkSender, Faults, StreamDropped


class HelperHost(Protocol):
    """What the helper endpoints use of the server they run in."""

    @property
    def name(self) -> str: ...

    @property
    def faults(self) -> Faults: ...

    def abort_stream(self, request: web.Request) -> None:
        """Cut ``request``'s connection at once (the drop fault) and count it."""


HELPER_HOST: web.AppKey[HelperHost] = web.AppKey("helper_host")


async def echo(request: web.Request) -> web.Response:
    """Describe the request: method, path, query, headers, body length and sha256."""
    digest = hashlib.sha256()
    length = 0
    async for chunk in request.content.iter_any():  # streamed: any size, bounded memory
        digest.update(chunk)
        length += len(chunk)
    headers: dict[str, str] = {}
    for key, value in request.headers.items():
        k = key.lower()
        headers[k] = f"{headers[k]}, {value}" if k in headers else value
    query: dict[str, list[str]] = {}
    for key, value in request.query.items():
        query.setdefault(key, []).append(value)
    return web.json_response(
        {
            "instance": request.app[HELPER_HOST].name,
            "method": request.method,
            "path": request.path,
            "query_string": request.query_string,
            "query": query,
            "version": f"HTTP/{request.version.major}.{request.version.minor}",
            "headers": headers,
            "header_list": [
                [k.decode("latin-1"), v.decode("latin-1")] for k, v in request.raw_headers
            ],
            "body_length": length,
            "body_sha256": digest.hexdigest(),
        }
    )


def _int_param(request: web.Request, name: str, default: int, high: int) -> int:
    raw = request.query.get(name)
    try:
        value = default if raw is None else int(raw)
    except ValueError:
        raise web.HTTPBadRequest(reason=f"{name} must be an integer") from None
    if not 0 <= value <= high:
        raise web.HTTPBadRequest(reason=f"{name} must be in 0..{high}")
    return value


async def stream(request: web.Request) -> web.StreamResponse:
    """``?chunks=N&interval_ms=M&size=B``: N chunks of B bytes, M ms apart, chunked text/plain."""
    host = request.app[HELPER_HOST]
    chunks = _int_param(request, "chunks", 10, 1_000_000)
    interval_ms = _int_param(request, "interval_ms", 10, 3_600_000)
    size = _int_param(request, "size", 64, 16 * 1024 * 1024)
    resp = web.StreamResponse(headers={"Content-Type": "text/plain"})
    resp.enable_chunked_encoding()
    await resp.prepare(request)
    sender = ChunkSender(resp, host.faults)
    try:
        for i in range(chunks):
            if i:
                await asyncio.sleep(interval_ms / 1000.0)
            await sender.send(bytes([97 + i % 26]) * size)  # chunk i is "a", "b", ... repeated
        await resp.write_eof()
    except StreamDropped:
        host.abort_stream(request)
    except ConnectionResetError:
        pass  # the client went away
    return resp


async def sleep(request: web.Request) -> web.Response:
    """``?ms=M``: answer 200 after M milliseconds."""
    ms = _int_param(request, "ms", 0, 3_600_000)
    await asyncio.sleep(ms / 1000.0)
    return web.json_response({"slept_ms": ms})


async def status(request: web.Request) -> web.Response:
    """``/status/{code}``: answer that status (200..599), with a JSON body unless bodiless."""
    try:
        code = int(request.match_info["code"])
    except ValueError:
        code = 0
    if not 200 <= code <= 599:
        raise web.HTTPBadRequest(reason="status code must be in 200..599")
    if code in (204, 304):
        return web.Response(status=code)
    return web.json_response({"status": code}, status=code)


ROUTES = [
    web.route("*", "/echo", echo),
    web.get("/stream", stream),
    web.get("/sleep", sleep),
    web.route("*", "/status/{code}", status),
]
