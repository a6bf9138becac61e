"""The routing benchmark's load generator: streamed chat completions over raw sockets.

Each request is a bare :class:`asyncio.Protocol` on its own connection, with llhttp
(``httptools``) parsing the response, as in :mod:`benchmarks.streams`, so the client costs
little next to what it measures. Time to first token is the arrival of the first SSE ``data:``
event; latency is the arrival of the end of the response. Sessions of a
:class:`~benchmarks.routing_workload.Script` start at their offsets (open loop); the turns of
one session run one after the other, each sending the conversation so far.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, cast

import httptools

from benchmarks.routing_workload import Script, Session

MODEL = "sim-model"
SIM_INSTANCE_HEADER = b"x-sim-instance"
LAG_TICK_S = 0.005


@dataclass
class RequestResult:
    """One request as the client saw it; times in seconds from the segment's start.

    ``replica`` is the simulator instance that answered (its ``x-sim-instance`` header, if the
    target passes it on). ``error`` is ``None`` for a complete ``200`` stream ending in
    ``[DONE]``; ``unfinished`` when the segment's drain time ran out first.
    """

    session_id: str
    turn: int
    tenant: int | None
    prompt_chars: int
    start_s: float
    ttft_s: float | None = None
    latency_s: float | None = None
    tokens: int = 0
    status: int = 0
    replica: str | None = None
    error: str | None = None
    reply: str = field(default="", repr=False)


class ChatStream(asyncio.Protocol):
    """One streamed ``POST /v1/chat/completions``; ``done`` resolves when it ends either way."""

    def __init__(self, done: asyncio.Future[None]) -> None:
        self.done = done
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.status = 0
        self.replica: str | None = None
        self.first_event_at: float | None = None
        self.ended_at: float | None = None
        self.saw_done = False
        self.parts: list[str] = []
        self.tokens = 0
        self.error: str | None = None
        self._read_at = 0.0
        self._buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._read_at = time.perf_counter()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._finish(f"bad response: {exc}")

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == SIM_INSTANCE_HEADER:
            self.replica = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self._buffer += body
        while True:
            end = self._buffer.find(b"\n\n")
            if end < 0:
                return
            event, self._buffer = self._buffer[:end], self._buffer[end + 2 :]
            self._event(event)

    def _event(self, event: bytes) -> None:
        for line in event.split(b"\n"):
            if not line.startswith(b"data:"):
                continue
            if self.first_event_at is None:
                self.first_event_at = self._read_at
            payload = line[5:].strip()
            if payload == b"[DONE]":
                self.saw_done = True
                continue
            try:
                chunk = json.loads(payload)
                content = chunk["choices"][0]["delta"].get("content")
            except (ValueError, KeyError, IndexError, TypeError, AttributeError):
                continue  # a usage chunk or something the target added: not a token
            if content:
                self.parts.append(content)
                self.tokens += 1

    def on_message_complete(self) -> None:
        self.ended_at = self._read_at
        if self.status != 200:
            self._finish(f"status {self.status}")
        else:
            self._finish(None if self.saw_done else "stream ended without [DONE]")

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
        self.close()


def _request_bytes(host: str, port: int, messages: list[dict[str, str]], max_tokens: int) -> bytes:
    body = json.dumps(
        {"model": MODEL, "messages": messages, "max_tokens": max_tokens, "stream": True}
    ).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\n"
        "Content-Type: application/json\r\nAccept: text/event-stream\r\n"
        f"User-Agent: lb-bench-routing\r\nConnection: close\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def chat(
    host: str,
    port: int,
    messages: list[dict[str, str]],
    max_tokens: int,
    result: RequestResult,
    epoch: float,
) -> None:
    """Send one streamed chat and fill ``result`` (also when cancelled: ``unfinished``)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    request = _request_bytes(host, port, messages, max_tokens)
    sent_at = time.perf_counter()
    result.start_s = sent_at - epoch
    stream: ChatStream | None = None
    try:
        _, stream = await loop.create_connection(lambda: ChatStream(done), host, port)
        assert stream.transport is not None
        stream.transport.write(request)
        await done
        result.error = stream.error
    except OSError as exc:
        result.error = f"connect: {exc.strerror or type(exc).__name__}"
    except asyncio.CancelledError:
        result.error = "unfinished"
        raise
    finally:
        if stream is not None:
            stream.close()
            result.status = stream.status
            result.replica = stream.replica
            result.tokens = stream.tokens
            result.reply = "".join(stream.parts)
            if stream.first_event_at is not None:
                result.ttft_s = stream.first_event_at - sent_at
            end = stream.ended_at if stream.ended_at is not None else time.perf_counter()
            result.latency_s = end - sent_at


async def _sleep_until(epoch: float, offset_s: float) -> None:
    delay = epoch + offset_s - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)


async def _session(
    host: str,
    port: int,
    session: Session,
    epoch: float,
    load_s: float,
    results: list[RequestResult],
) -> None:
    await _sleep_until(epoch, session.start_s)
    history: list[dict[str, str]] = []
    if session.system:
        history.append({"role": "system", "content": session.system})
    for index, turn in enumerate(session.turns):
        if time.perf_counter() - epoch >= load_s:
            return  # the load has ended: no new turns
        messages = [*history, {"role": "user", "content": turn.user}]
        chars = sum(len(m["content"]) for m in messages)
        result = RequestResult(session.session_id, index, session.tenant, chars, 0.0)
        results.append(result)
        await chat(host, port, messages, turn.max_tokens, result, epoch)
        if result.error is not None:
            return
        history = [*messages, {"role": "assistant", "content": result.reply}]
        if index + 1 < len(session.turns):
            await asyncio.sleep(turn.think_s)


@dataclass
class LoopLag:
    """How late the client's event loop ran a ``LAG_TICK_S`` timer: a busy client shows here."""

    samples_s: list[float] = field(default_factory=list)

    async def watch(self) -> None:
        while True:
            before = time.perf_counter()
            await asyncio.sleep(LAG_TICK_S)
            self.samples_s.append(time.perf_counter() - before - LAG_TICK_S)


async def run_script(
    host: str,
    port: int,
    script: Script,
    load_s: float,
    drain_s: float,
    marks: list[tuple[float, Callable[[], Awaitable[Any]]]],
) -> tuple[list[RequestResult], float]:
    """Play ``script`` against ``host:port`` for ``load_s`` seconds, then let requests in
    flight finish for up to ``drain_s`` seconds (the rest end ``unfinished``).

    ``marks`` are ``(offset_s, coroutine function)`` pairs awaited at those offsets while the
    load runs (snapshots of the fleet). Returns the results and the epoch (``perf_counter``
    at the start) their times are relative to.
    """
    results: list[RequestResult] = []
    epoch = time.perf_counter()
    tasks = [
        asyncio.create_task(_session(host, port, s, epoch, load_s, results))
        for s in script.sessions
        if s.start_s < load_s
    ]
    for offset_s, action in sorted(marks, key=lambda m: m[0]):
        await _sleep_until(epoch, offset_s)
        await action()
    await _sleep_until(epoch, load_s)
    if tasks:
        _, pending = await asyncio.wait(tasks, timeout=drain_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    return results, epoch
