"""A minimal, very fast HTTP/1.1 backend for benchmarks: fixed answers, SSE streams on timers.

``python -m backends.fast --port 9001 [--port 9002 ...]``. Every request gets a small JSON
answer, except ``/stream?chunks=N&interval_ms=M`` (an SSE stream of N events M ms apart) so the
proxy's own cost can be measured without the backend being the bottleneck. Requests are parsed
with llhttp (httptools); keep-alive and pipelining are honoured.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
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


class FastServer(asyncio.Protocol):
    """Answers each request as soon as its message is complete."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.streaming = False
        self.queue: list[bytes] = []

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

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_message_complete(self) -> None:
        if self.transport is None:
            return
        if self.url.startswith(b"/stream"):
            query = parse_qs(urlsplit(self.url.decode()).query)
            chunks = int(query.get("chunks", ["50"])[0])
            interval_s = float(query.get("interval_ms", ["20"])[0]) / 1000.0
            self.transport.write(STREAM_HEAD)
            self._stream(0, chunks, interval_s)
        else:
            self.transport.write(RESPONSE)

    def _stream(self, i: int, chunks: int, interval_s: float) -> None:
        transport = self.transport
        if transport is None:
            return
        if i >= chunks:
            event = b"data: [DONE]\n\n"
            transport.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(event), event))
            return
        event = b'data: {"i":%d,"choices":[{"delta":{"content":"tok"}}]}\n\n' % i
        transport.write(b"%x\r\n%s\r\n" % (len(event), event))
        asyncio.get_running_loop().call_later(interval_s, self._stream, i + 1, chunks, interval_s)


async def serve(host: str, ports: list[int]) -> None:
    loop = asyncio.get_running_loop()
    servers = [
        await loop.create_server(FastServer, host, port, backlog=4096, reuse_address=True)
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
    args = parser.parse_args(argv)
    try:
        import uvloop

        uvloop.run(serve(args.host, args.port))
    except ImportError:  # pragma: no cover - uvloop is a declared dependency
        asyncio.run(serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
