"""Concurrent SSE streams over raw sockets, timing the arrival of every event.

The client is a bare :class:`asyncio.Protocol` with llhttp (``httptools``) parsing the
response, so the measuring side costs little next to what it measures. An event is complete
when its blank line (``\\n\\n``) arrives; every event completed by one socket read gets the
time that read was handed to the protocol.
"""

from __future__ import annotations

import asyncio
import math
import statistics
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import TypeVar, cast

import httptools

EVENT_END = b"\n\n"


class StreamClient(asyncio.Protocol):
    """One streamed request (a chat completion or a ``GET /stream``) on its own connection.

    ``done`` resolves when the response ends or the connection is lost; ``error`` then names
    what went wrong, or is ``None`` for a complete ``200`` answer.
    """

    reused = False  # its connection carries this one stream only

    def __init__(self, done: asyncio.Future[None]) -> None:
        self.done = done
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.status = 0
        self.sent_at = 0.0
        self.event_times: list[float] = []
        self.error: str | None = None
        self._read_at = 0.0
        self._last_byte = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def send(self, request: bytes) -> None:
        """Write the request and remember when; time to first byte counts from here."""
        assert self.transport is not None
        self.sent_at = time.perf_counter()
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        self._read_at = time.perf_counter()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._finish(f"bad response: {exc}")

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        # The previous fragment's last byte joins this one: a "\n\n" may straddle two reads.
        ends = (self._last_byte + body).count(EVENT_END)
        self.event_times.extend([self._read_at] * ends)
        self._last_byte = body[-1:]

    def on_message_complete(self) -> None:
        self._finish(None if self.status == 200 else f"status {self.status}")

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._finish("connection lost mid-response")

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def _finish(self, error: str | None) -> None:
        if self.done.done():
            return
        self.error = error
        self.done.set_result(None)
        if error is not None or not self.reused:
            self.close()


class ReusedStreamClient(StreamClient):
    """A :class:`StreamClient` whose connection carries one stream after another, as an HTTP
    client's connection pool does: :meth:`expect` readies it for the next response."""

    reused = True

    def expect(self, done: asyncio.Future[None]) -> None:
        self.done = done
        self.status = 0
        self.event_times = []
        self.error = None
        self._last_byte = b""


@dataclass
class StreamSamples:
    """Raw timings of many streams, in seconds; ``errors`` counts failed streams by kind."""

    streams: int = 0
    events: int = 0
    ttfb_s: list[float] = field(default_factory=list)
    gaps_s: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)

    def extend(self, other: StreamSamples) -> None:
        self.streams += other.streams
        self.events += other.events
        self.ttfb_s.extend(other.ttfb_s)
        self.gaps_s.extend(other.gaps_s)
        self.errors.update(other.errors)


async def run_wave(
    host: str, port: int, concurrency: int, chunks: int, interval_ms: int, timeout_s: float
) -> StreamSamples:
    """Open ``concurrency`` connections, send every ``GET /stream`` request at once, read every
    stream: ``chunks`` events then ``data: [DONE]``, exactly (see :func:`run_wave_of`)."""
    request = (
        f"GET /stream?chunks={chunks}&interval_ms={interval_ms} HTTP/1.1\r\n"
        f"Host: {host}:{port}\r\nAccept: text/event-stream\r\nUser-Agent: lb-bench\r\n\r\n"
    ).encode()
    return await run_wave_of(request, host, port, concurrency, chunks + 1, timeout_s)


async def run_wave_of(
    request: bytes,
    host: str,
    port: int,
    concurrency: int,
    events: int,
    timeout_s: float,
    *,
    at_least: bool = False,
) -> StreamSamples:
    """Open ``concurrency`` connections, send ``request`` on each at once, read every stream.

    A stream is expected to carry ``events`` events (``at_least``: that many or more, for a
    proxy that splits one in two); one that ends otherwise, fails, or outlives ``timeout_s`` is
    counted in ``errors`` (its timings that did arrive are kept).
    """
    clients, failed = await _open_clients(StreamClient, host, port, concurrency)
    samples = StreamSamples(streams=concurrency)
    samples.errors.update(failed)
    for client in clients:
        client.send(request)
    await _await_streams(clients, timeout_s)
    for client in clients:
        _tally(samples, client, events, at_least)
        client.close()
    return samples


async def run_waves_reused(
    request: bytes,
    host: str,
    port: int,
    concurrency: int,
    events: int,
    waves: int,
    timeout_s: float,
    *,
    at_least: bool = False,
) -> StreamSamples:
    """Open ``concurrency`` connections once, then ``waves`` times send ``request`` on each at
    once and read every stream (counted as in :func:`run_wave_of`); a connection that fails
    or times out is not used again, and each wave it misses counts as a failed stream."""
    loop = asyncio.get_running_loop()
    clients, failed = await _open_clients(ReusedStreamClient, host, port, concurrency)
    samples = StreamSamples(streams=concurrency * waves)
    for error in failed:
        samples.errors[error] += waves
    try:
        for _ in range(waves):
            live = [c for c in clients if c.transport is not None and c.error is None]
            if len(live) < len(clients):
                samples.errors["connection closed before its wave"] += len(clients) - len(live)
            for client in live:
                client.expect(loop.create_future())
                client.send(request)
            await _await_streams(live, timeout_s)
            for client in live:
                _tally(samples, client, events, at_least)
    finally:
        for client in clients:
            client.close()
    return samples


Client = TypeVar("Client", bound=StreamClient)


async def _open_clients(
    make: Callable[[asyncio.Future[None]], Client], host: str, port: int, concurrency: int
) -> tuple[list[Client], list[str]]:
    """``concurrency`` connections opened at once: the clients, and why the others failed."""
    loop = asyncio.get_running_loop()

    async def connect() -> Client | str:
        done: asyncio.Future[None] = loop.create_future()
        try:
            _, client = await loop.create_connection(lambda: make(done), host, port)
        except OSError as exc:
            return f"connect: {exc.strerror or type(exc).__name__}"
        return client

    opened = await asyncio.gather(*(connect() for _ in range(concurrency)))
    return [c for c in opened if not isinstance(c, str)], [c for c in opened if isinstance(c, str)]


async def _await_streams(clients: Sequence[StreamClient], timeout_s: float) -> None:
    """Wait until every stream ends or ``timeout_s`` passes (``asyncio.wait`` cancels none of
    them, so a stream still running is told apart from one that ended)."""
    if clients:
        await asyncio.wait([client.done for client in clients], timeout=timeout_s)


def _tally(samples: StreamSamples, client: StreamClient, events: int, at_least: bool) -> None:
    """Count ``client``'s stream into ``samples``; one still running is closed as timed out."""
    times = client.event_times
    short = len(times) < events if at_least else len(times) != events
    if not client.done.done():
        samples.errors["timed out"] += 1
        client.error = "timed out"  # not reused: its response is still arriving
        client.close()
    elif client.error is not None:
        samples.errors[client.error] += 1
    elif short:
        samples.errors[f"{len(times)} events instead of {events}"] += 1
    samples.events += len(times)
    if times:
        samples.ttfb_s.append(times[0] - client.sent_at)
        samples.gaps_s.extend(b - a for a, b in pairwise(times))


async def run_waves(
    host: str, port: int, waves: int, concurrency: int, chunks: int, interval_ms: int
) -> StreamSamples:
    """``waves`` waves of :func:`run_wave`, one after the other, merged."""
    timeout_s = chunks * interval_ms / 1000.0 + 10.0
    merged = StreamSamples()
    for _ in range(waves):
        merged.extend(await run_wave(host, port, concurrency, chunks, interval_ms, timeout_s))
    return merged


def percentile(values: Sequence[float], pct: float) -> float | None:
    """Nearest-rank percentile; ``None`` for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(1, math.ceil(pct / 100.0 * len(ordered))) - 1]


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000.0, 3)


@dataclass(frozen=True)
class StreamSummary:
    """What a reader wants from :class:`StreamSamples`, in milliseconds.

    ``gap_ms_max_dev`` is the largest distance of any gap from the backend's interval, early
    or late.
    """

    streams: int
    events: int
    failed_streams: int
    errors: dict[str, int]
    ttfb_ms_mean: float | None
    ttfb_ms_p50: float | None
    ttfb_ms_p99: float | None
    gap_ms_mean: float | None
    gap_ms_p99: float | None
    gap_ms_max_dev: float | None


def summarise(samples: StreamSamples, interval_ms: int) -> StreamSummary:
    """Means and nearest-rank percentiles of ``samples``."""
    interval_s = interval_ms / 1000.0
    ttfb, gaps = samples.ttfb_s, samples.gaps_s
    return StreamSummary(
        streams=samples.streams,
        events=samples.events,
        failed_streams=sum(samples.errors.values()),
        errors=dict(samples.errors),
        ttfb_ms_mean=_ms(statistics.fmean(ttfb)) if ttfb else None,
        ttfb_ms_p50=_ms(percentile(ttfb, 50)),
        ttfb_ms_p99=_ms(percentile(ttfb, 99)),
        gap_ms_mean=_ms(statistics.fmean(gaps)) if gaps else None,
        gap_ms_p99=_ms(percentile(gaps, 99)),
        gap_ms_max_dev=_ms(max(abs(g - interval_s) for g in gaps)) if gaps else None,
    )
