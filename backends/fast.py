"""A minimal, very fast HTTP/1.1 backend for benchmarks: fixed answers, SSE streams on timers.

``python -m backends.fast --port 9001 [--port 9002 ...]``. Every request gets a small JSON
answer, except ``/stream?chunks=N&interval_ms=M`` (an SSE stream of N events M ms apart) and a
``POST /v1/chat/completions`` whose body asks for ``"stream": true`` (an OpenAI-style stream of
``--stream-chunks`` chunk events ``--stream-interval-ms`` apart, then ``data: [DONE]``), so the
proxy's own cost can be measured without the backend being the bottleneck. Requests are parsed
with llhttp (httptools); keep-alive and pipelining are honoured.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from collections.abc import Callable
from typing import cast
from urllib.parse import parse_qs, urlsplit

import httptools

ANSWER = b'{"id":"cmpl-bench","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}]}'  # noqa: E501  # one fixed body
RESPONSE = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (
    len(ANSWER),
    ANSWER,
)
STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
    b"transfer-encoding: chunked\r\n\r\n"
)
CHAT_PATH = b"/v1/chat/completions"
# What an OpenAI client sends to ask for a stream, with and without the space json.dumps adds.
STREAM_FLAGS = (b'"stream": true', b'"stream":true')
DEFAULT_STREAM_CHUNKS = 50
DEFAULT_STREAM_INTERVAL_MS = 20.0


def asks_for_stream(body: bytes) -> bool:
    """Whether a chat completion request body asks for an SSE stream."""
    return any(flag in body for flag in STREAM_FLAGS)


def chat_chunk_event(i: int, chunks: int, created: int) -> bytes:
    """Event ``i`` of ``chunks`` of an OpenAI ``chat.completion.chunk`` stream.

    The first chunk carries the assistant role, the last one ``finish_reason: "stop"``; every
    chunk carries the content ``"tok"``.
    """
    delta = b'{"role":"assistant","content":"tok"}' if i == 0 else b'{"content":"tok"}'
    finish = b'"stop"' if i == chunks - 1 else b"null"
    return (
        b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":%d,'
        b'"model":"bench-model","choices":[{"index":0,"delta":%s,"finish_reason":%s}]}\n\n'
        % (created, delta, finish)
    )


def plain_event(i: int) -> bytes:
    """Event ``i`` of a ``/stream`` answer."""
    return b'data: {"i":%d,"choices":[{"delta":{"content":"tok"}}]}\n\n' % i


class FastServer(asyncio.Protocol):
    """Answers each request as soon as its message is complete.

    ``stream_chunks`` and ``stream_interval_s`` shape the answer to a streamed chat completion
    request (defaults: 50 chunks, 20 ms apart).
    """

    def __init__(
        self,
        stream_chunks: int = DEFAULT_STREAM_CHUNKS,
        stream_interval_s: float = DEFAULT_STREAM_INTERVAL_MS / 1000.0,
    ) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.body = b""
        self.stream_chunks = stream_chunks
        self.stream_interval_s = stream_interval_s

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport is not None:
                self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def on_message_begin(self) -> None:
        self.url = b""
        self.body = b""

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        # Only a chat completion's body is looked at; every other body is dropped unread.
        if self.url.startswith(CHAT_PATH):
            self.body += body

    def on_message_complete(self) -> None:
        if self.transport is None:
            return
        if self.url.startswith(b"/stream"):
            query = parse_qs(urlsplit(self.url.decode()).query)
            chunks = int(query.get("chunks", ["50"])[0])
            interval_s = float(query.get("interval_ms", ["20"])[0]) / 1000.0
            self.transport.write(STREAM_HEAD)
            self._stream(0, chunks, interval_s, plain_event)
        elif self.url.startswith(CHAT_PATH) and asks_for_stream(self.body):
            created = int(time.time())
            chunks = self.stream_chunks

            def event(i: int) -> bytes:
                return chat_chunk_event(i, chunks, created)

            self.transport.write(STREAM_HEAD)
            self._stream(0, chunks, self.stream_interval_s, event)
        else:
            self.transport.write(RESPONSE)
        self.body = b""

    def _stream(
        self, i: int, chunks: int, interval_s: float, event: Callable[[int], bytes]
    ) -> None:
        transport = self.transport
        if transport is None:
            return
        if i >= chunks:
            done = b"data: [DONE]\n\n"
            transport.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))
            return
        data = event(i)
        transport.write(b"%x\r\n%s\r\n" % (len(data), data))
        asyncio.get_running_loop().call_later(
            interval_s, self._stream, i + 1, chunks, interval_s, event
        )


async def serve(
    host: str,
    ports: list[int],
    stream_chunks: int = DEFAULT_STREAM_CHUNKS,
    stream_interval_ms: float = DEFAULT_STREAM_INTERVAL_MS,
) -> None:
    """Serve every port until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()

    def protocol() -> FastServer:
        return FastServer(stream_chunks, stream_interval_ms / 1000.0)

    servers = [
        await loop.create_server(protocol, host, port, backlog=4096, reuse_address=True)
        for port in ports
    ]
    for server in servers:
        print(f"fast listening on http://{host}:{server.sockets[0].getsockname()[1]}", flush=True)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    for server in servers:
        server.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m backends.fast", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, action="append", required=True)
    parser.add_argument(
        "--stream-chunks",
        type=int,
        default=DEFAULT_STREAM_CHUNKS,
        help="chunk events in a streamed chat completion, before [DONE] (50)",
    )
    parser.add_argument(
        "--stream-interval-ms",
        type=float,
        default=DEFAULT_STREAM_INTERVAL_MS,
        help="ms between the events of a streamed chat completion (20)",
    )
    args = parser.parse_args(argv)
    if args.stream_chunks < 1 or args.stream_interval_ms < 0:
        parser.error("--stream-chunks must be at least 1 and --stream-interval-ms not negative")
    server = serve(args.host, args.port, args.stream_chunks, args.stream_interval_ms)
    try:
        import uvloop

        uvloop.run(server)
    except ImportError:  # pragma: no cover - uvloop is a declared dependency
        asyncio.run(server)
    return 0


if __name__ == "__main__":
    sys.exit(main())
