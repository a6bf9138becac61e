"""The client connection's request lifecycle, against a handler written here: real sockets on
127.0.0.1, no backend, so what is checked is how requests reach the handler and how the
connection carries on when the handler misbehaves."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import pytest

from lb.downstream import _VALID_HOSTS, MAX_VALID_HOSTS, ClientConnection, _valid_host
from lb.errors import ProxyError
from lb.request import IncomingRequest, ListenerLimits
from lb.timers import TimerWheel

READ_TIMEOUT_S = 5.0


class RecordingHandler:
    """Answers every request with its path; records the task each one ran on.

    ``behaviour`` may replace the answer: it gets the connection and request and returns
    whether to report the request done (the real handler always does)."""

    def __init__(self) -> None:
        self.draining = False
        self.connections: set[ClientConnection] = set()
        self.timers = TimerWheel(asyncio.get_running_loop())
        self.tasks: list[asyncio.Task[Any] | None] = []
        self.paths: list[bytes] = []
        self.behaviour: Callable[[ClientConnection, IncomingRequest], bool] | None = None
        self.hold: asyncio.Future[None] | None = None  # awaited before answering, when set
        self.errors: list[str] = []  # types of the error answers, in order

    def handle(self, conn: ClientConnection, req: IncomingRequest) -> Coroutine[Any, Any, None]:
        return self._handle(conn, req)

    def error_answered(self, req: IncomingRequest | None, err: ProxyError, log_line: bool) -> None:
        self.errors.append(err.type)

    async def _handle(self, conn: ClientConnection, req: IncomingRequest) -> None:
        self.tasks.append(asyncio.current_task())
        self.paths.append(req.url)
        await asyncio.sleep(0)  # a suspension, as a real request has
        if self.hold is not None:
            await self.hold
        report_done = True
        if self.behaviour is not None:
            report_done = self.behaviour(conn, req)
        else:
            conn.answer(req, 200, req.url, content_type=b"text/plain")
        if report_done:
            conn.request_done(req)


@pytest.fixture
async def served() -> AsyncIterator[tuple[RecordingHandler, int]]:
    handler = RecordingHandler()
    loop = asyncio.get_running_loop()
    limits = ListenerLimits()
    server = await loop.create_server(lambda: ClientConnection(handler, limits), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield handler, port
    finally:
        server.close()
        for conn in list(handler.connections):
            conn.abort()
        await server.wait_closed()


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode()


async def read_response(reader: asyncio.StreamReader) -> bytes:
    """One response of the kind the test handler writes: a head and a Content-Length body."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT_S)
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    body = await asyncio.wait_for(reader.readexactly(length), READ_TIMEOUT_S)
    return head.split(b"\r\n", 1)[0] + b" " + body


async def test_keep_alive_requests_are_answered_in_order_from_one_task(served):
    handler, port = served
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for path in ("/a", "/b"):
            writer.write(get(path))
            assert await read_response(reader) == b"HTTP/1.1 200 OK " + path.encode()
        writer.write(get("/c") + get("/d") + get("/e"))  # pipelined
        answers = [await read_response(reader) for _ in range(3)]
        assert answers == [b"HTTP/1.1 200 OK /c", b"HTTP/1.1 200 OK /d", b"HTTP/1.1 200 OK /e"]
    finally:
        writer.close()
    assert handler.paths == [b"/a", b"/b", b"/c", b"/d", b"/e"]
    assert len(set(map(id, handler.tasks))) == 1
    assert handler.tasks[0] is not None


async def test_each_connection_has_a_task_of_its_own(served):
    handler, port = served
    streams = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
    try:
        for i, (reader, writer) in enumerate(streams):
            writer.write(get(f"/{i}"))
            assert await read_response(reader) == f"HTTP/1.1 200 OK /{i}".encode()
    finally:
        for _, writer in streams:
            writer.close()
    assert len(set(map(id, handler.tasks))) == 2


async def test_the_connections_task_ends_when_the_client_leaves_between_requests(served):
    handler, port = served
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(get("/a"))
    await read_response(reader)
    task = handler.tasks[0]
    assert task is not None and not task.done()
    writer.close()
    await asyncio.wait_for(asyncio.wait([task]), READ_TIMEOUT_S)
    assert task.done()
    assert not handler.connections


async def test_a_request_the_handler_did_not_report_done_does_not_stall_the_next(served):
    handler, port = served

    def answer_without_reporting(conn: ClientConnection, req: IncomingRequest) -> bool:
        conn.answer(req, 200, req.url, content_type=b"text/plain")
        return False

    handler.behaviour = answer_without_reporting
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for path in ("/a", "/b"):
            writer.write(get(path))
            assert await read_response(reader) == b"HTTP/1.1 200 OK " + path.encode()
    finally:
        writer.close()


async def test_a_failing_handler_closes_the_connection_instead_of_hanging_it(served, caplog):
    handler, port = served

    def fail(conn: ClientConnection, req: IncomingRequest) -> bool:
        raise RuntimeError("handler bug")

    handler.behaviour = fail
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        with caplog.at_level(logging.ERROR, logger="lb.downstream"):
            writer.write(get("/a"))
            assert await asyncio.wait_for(reader.read(), READ_TIMEOUT_S) == b""
    finally:
        writer.close()
    assert "handler bug" in caplog.text
    # The next client is served as usual.
    handler.behaviour = None
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(get("/b"))
        assert await read_response(reader) == b"HTTP/1.1 200 OK /b"
    finally:
        writer.close()


async def test_a_connection_whose_task_is_cancelled_from_elsewhere_is_closed_not_hung(served):
    """The loop shutting down cancels every task: the client sees its connection close."""
    handler, port = served
    handler.hold = asyncio.get_running_loop().create_future()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(get("/a"))
        for _ in range(100):
            if handler.tasks:
                break
            await asyncio.sleep(0.01)
        task = handler.tasks[0]
        assert task is not None
        task.cancel()
        assert await asyncio.wait_for(reader.read(), READ_TIMEOUT_S) == b""
    finally:
        writer.close()
    for _ in range(100):
        if not handler.connections:
            break
        await asyncio.sleep(0.01)
    assert not handler.connections


async def test_an_idle_connection_whose_task_is_cancelled_from_elsewhere_closes_cleanly(served):
    """Cancelled while it waits for the next request: the connection closes, and its close
    raises nothing into the loop."""
    handler, port = served
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(get("/a"))
        assert await read_response(reader) == b"HTTP/1.1 200 OK /a"
        await asyncio.sleep(0.02)  # the task is back waiting for the next request
        task = handler.tasks[0]
        assert task is not None
        task.cancel()
        assert await asyncio.wait_for(reader.read(), READ_TIMEOUT_S) == b""
        await asyncio.sleep(0.05)
    finally:
        writer.close()
        loop.set_exception_handler(previous)
    assert errors == []


async def test_a_connection_whose_first_body_is_bad_is_freed_without_a_gc_pass(served):
    """The bad chunk arrives in the read that carries the head: the connection's task is
    cancelled before it ever runs, and the closed connection still holds no reference cycle."""
    handler, port = served
    gc.collect()
    gc.disable()
    try:
        for _ in range(3):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(
                b"POST /a HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"
            )
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT_S)
            assert head.startswith(b"HTTP/1.1 400 ")
            writer.transport.abort()
        for _ in range(100):
            if not handler.connections:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        left = [o for o in gc.get_objects() if isinstance(o, ClientConnection) and o.closed]
        assert left == []
    finally:
        gc.enable()
    assert handler.paths == []  # the handler never saw the requests


def test_the_valid_hosts_remembered_stay_bounded_whatever_clients_send() -> None:
    """Each valid Host is matched once and remembered, up to a bound: a client naming a new
    host on every request cannot grow the memory; at the bound the set starts over, so the
    hosts in use are soon remembered again."""
    try:
        for i in range(MAX_VALID_HOSTS + 500):
            assert _valid_host(b"host-%d.example:80" % i)
            assert len(_VALID_HOSTS) <= MAX_VALID_HOSTS
        assert b"host-%d.example:80" % (MAX_VALID_HOSTS + 499) in _VALID_HOSTS  # the latest
        assert not _valid_host(b"host 1.example")
        assert b"host 1.example" not in _VALID_HOSTS
    finally:
        _VALID_HOSTS.clear()
