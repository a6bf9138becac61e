"""The soak benchmark's clients: many idle SSE streams held open, and a light request load.

Both are bare :class:`asyncio.Protocol` objects with llhttp (``httptools``) parsing the
responses, as in :mod:`benchmarks.streams`, so this side costs little and holds little per
connection: a stream keeps its status, an event count and its transport, nothing else.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import cast

import httptools

from benchmarks.wrk import BODY, PATH

EVENT_END = b"\n\n"
OPEN_BATCH = 100  # streams connected at once, so the listen backlog is never the limit


class IdleStream(asyncio.Protocol):
    """One ``/stream`` GET held open on its own connection.

    ``started`` resolves once the response headers and the first event arrived (or the
    connection failed first); ``error`` names what went wrong, else ``None``.
    """

    def __init__(self, started: asyncio.Future[None]) -> None:
        self.started = started
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.status = 0
        self.events = 0
        self.error: str | None = None
        self.ended = False
        self._last_byte = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(f"bad response: {exc}")

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        if self.status != 200:
            self._fail(f"status {self.status}")

    def on_body(self, body: bytes) -> None:
        # The previous fragment's last byte joins this one: a "\n\n" may straddle two reads.
        self.events += (self._last_byte + body).count(EVENT_END)
        self._last_byte = body[-1:]
        if self.events and not self.started.done():
            self.started.set_result(None)

    def on_message_complete(self) -> None:
        self.ended = True  # the backend finished the stream: it was not long enough
        self._fail("stream ended")

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if not self.ended:
            self._fail("connection lost")

    @property
    def is_open(self) -> bool:
        return self.transport is not None and self.error is None

    def close(self) -> None:
        """Abort the connection, as a client that goes away mid-stream does."""
        if self.transport is not None:
            self.transport.abort()
            self.transport = None

    def _fail(self, error: str) -> None:
        if self.error is None:
            self.error = error
        if not self.started.done():
            self.started.set_result(None)
        self.close()


def stream_request(host: str, port: int, chunks: int, interval_ms: int) -> bytes:
    """The GET that asks ``backends.fast`` for ``chunks`` events ``interval_ms`` apart."""
    return (
        f"GET /stream?chunks={chunks}&interval_ms={interval_ms} HTTP/1.1\r\n"
        f"Host: {host}:{port}\r\nAccept: text/event-stream\r\nUser-Agent: lb-soak\r\n\r\n"
    ).encode()


async def open_streams(
    host: str, port: int, count: int, request: bytes, timeout_s: float = 30.0
) -> tuple[list[IdleStream], Counter[str]]:
    """Open ``count`` streams, ``OPEN_BATCH`` at a time, each until its first event.

    Returns the streams that are open and the failures by kind.
    """
    loop = asyncio.get_running_loop()
    opened: list[IdleStream] = []
    errors: Counter[str] = Counter()

    async def one() -> None:
        started: asyncio.Future[None] = loop.create_future()
        try:
            _, stream = await loop.create_connection(lambda: IdleStream(started), host, port)
        except OSError as exc:
            errors[f"connect: {exc.strerror or type(exc).__name__}"] += 1
            return
        assert stream.transport is not None
        stream.transport.write(request)
        try:
            async with asyncio.timeout(timeout_s):
                await started
        except TimeoutError:
            stream.error = "no first event"
            stream.close()
        if stream.error is None:
            opened.append(stream)
        else:
            errors[stream.error] += 1

    for first in range(0, count, OPEN_BATCH):
        await asyncio.gather(*(one() for _ in range(min(OPEN_BATCH, count - first))))
    return opened, errors


class SmallExchange(asyncio.Protocol):
    """A keep-alive connection that sends one small chat completion at a time."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.status = 0
        self.answer: asyncio.Future[int] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self._answer(-1)

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()

    def on_message_complete(self) -> None:
        self._answer(self.status)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._answer(-1)

    def _answer(self, status: int) -> None:
        if self.answer is not None and not self.answer.done():
            self.answer.set_result(status)

    async def exchange(self, request: bytes) -> int:
        """Send ``request`` and return the status of its answer (-1: the connection failed)."""
        if self.transport is None:
            return -1
        self.answer = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return await self.answer


@dataclass
class LoadCounts:
    """What the request load did: answers by status (``-1``: connection failed)."""

    statuses: Counter[int] = field(default_factory=Counter)

    @property
    def requests(self) -> int:
        return sum(self.statuses.values())


async def request_load(
    host: str, port: int, rate_per_s: float, connections: int, counts: LoadCounts
) -> None:
    """Send small POSTs at ``rate_per_s`` in all over ``connections`` keep-alive connections,
    until cancelled; a connection that fails is replaced."""
    request = (
        f"POST {PATH} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(BODY)}\r\nUser-Agent: lb-soak\r\n\r\n"
    ).encode() + BODY
    loop = asyncio.get_running_loop()
    period_s = connections / rate_per_s

    async def worker(offset_s: float) -> None:
        client: SmallExchange | None = None
        next_at = time.monotonic() + offset_s
        try:
            while True:
                delay = next_at - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                next_at = max(next_at + period_s, time.monotonic() - period_s)
                if client is None or client.transport is None:
                    try:
                        _, client = await loop.create_connection(SmallExchange, host, port)
                    except OSError:
                        counts.statuses[-1] += 1
                        client = None
                        continue
                counts.statuses[await client.exchange(request)] += 1
        finally:
            if client is not None and client.transport is not None:
                client.transport.close()

    await asyncio.gather(*(worker(i * period_s / connections) for i in range(connections)))
