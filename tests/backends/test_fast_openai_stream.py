"""Tests for backends.fast: OpenAI-style streamed chat completions beside the fixed answers."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from backends.fast import ANSWER, FastServer

REPO_ROOT = Path(__file__).resolve().parents[2]
CHAT = "/v1/chat/completions"
REQUEST: dict[str, Any] = {
    "model": "bench-model",
    "messages": [{"role": "user", "content": "Say ok, please."}],
    "stream": True,
}

StartFast = Callable[[int, float], Awaitable[int]]


@pytest.fixture
async def start_fast() -> AsyncIterator[StartFast]:
    """Start in-process fast servers on ephemeral ports; each returns its port."""
    servers: list[asyncio.Server] = []

    async def start(chunks: int, interval_ms: float) -> int:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: FastServer(chunks, interval_ms / 1000.0), "127.0.0.1", 0
        )
        servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


def sse_data(text: str) -> list[str]:
    """The ``data:`` payloads of an SSE body, in order."""
    return [
        event.removeprefix("data: ") for event in text.split("\n\n") if event.startswith("data: ")
    ]


async def post(port: int, body: bytes) -> tuple[int, str, str]:
    """POST ``body`` to the chat path; returns status, content type and the whole body."""
    headers = {"Content-Type": "application/json"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"http://127.0.0.1:{port}{CHAT}", data=body, headers=headers) as response,
    ):
        return response.status, response.content_type, await response.text()


async def test_a_chat_asking_for_a_stream_gets_chunk_events_then_done(
    start_fast: StartFast,
) -> None:
    """A chat body with ``"stream": true`` gets the configured number of chunks, then [DONE]."""
    port = await start_fast(4, 1.0)
    status, content_type, text = await post(port, json.dumps(REQUEST).encode())
    assert (status, content_type) == (200, "text/event-stream")
    *chunks, done = sse_data(text)
    assert done == "[DONE]"
    parsed = [json.loads(chunk) for chunk in chunks]
    assert len(parsed) == 4
    assert {chunk["object"] for chunk in parsed} == {"chat.completion.chunk"}
    assert "".join(chunk["choices"][0]["delta"]["content"] for chunk in parsed) == "tok" * 4
    assert parsed[0]["choices"][0]["delta"]["role"] == "assistant"
    assert [chunk["choices"][0]["finish_reason"] for chunk in parsed] == [None] * 3 + ["stop"]


async def test_a_compact_stream_flag_is_recognised(start_fast: StartFast) -> None:
    """``"stream":true`` without a space, as compact JSON encoders write it, streams too."""
    port = await start_fast(2, 1.0)
    body = json.dumps(REQUEST, separators=(",", ":")).encode()
    assert b'"stream":true' in body
    status, content_type, text = await post(port, body)
    assert (status, content_type) == (200, "text/event-stream")
    assert len(sse_data(text)) == 3


async def test_a_chat_not_asking_for_a_stream_gets_the_fixed_answer(
    start_fast: StartFast,
) -> None:
    """``"stream": false`` gets the fixed JSON answer, byte for byte."""
    port = await start_fast(4, 1.0)
    status, content_type, text = await post(port, json.dumps({**REQUEST, "stream": False}).encode())
    assert (status, content_type) == (200, "application/json")
    assert text.encode() == ANSWER


async def test_the_stream_path_still_takes_its_shape_from_the_query(
    start_fast: StartFast,
) -> None:
    """``GET /stream?chunks=3`` answers three plain events whatever the chat stream settings."""
    port = await start_fast(7, 1.0)
    url = f"http://127.0.0.1:{port}/stream?chunks=3&interval_ms=1"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        text = await response.text()
    *events, done = sse_data(text)
    assert done == "[DONE]"
    assert [json.loads(event)["i"] for event in events] == [0, 1, 2]


async def test_chunks_are_paced_by_the_configured_interval(start_fast: StartFast) -> None:
    """Five chunks 40 ms apart cannot all arrive within the first 160 ms."""
    port = await start_fast(5, 40.0)
    started = time.perf_counter()
    status, _, text = await post(port, json.dumps(REQUEST).encode())
    assert status == 200
    assert len(sse_data(text)) == 6
    assert time.perf_counter() - started >= 0.16


def read_until(sock: socket.socket, end: bytes, timeout_s: float = 5.0) -> bytes:
    """Bytes from ``sock`` until they end with ``end``."""
    sock.settimeout(timeout_s)
    data = b""
    while not data.endswith(end):
        more = sock.recv(65536)
        assert more, f"connection closed after {data!r}"
        data += more
    return data


async def test_the_connection_serves_another_request_after_a_stream(
    start_fast: StartFast,
) -> None:
    """After the stream's last chunk the same keep-alive connection answers a plain request."""
    port = await start_fast(2, 1.0)
    body = json.dumps(REQUEST).encode()
    streamed = (
        f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    plain = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"

    def exchange() -> tuple[bytes, bytes]:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(streamed)
            first = read_until(sock, b"0\r\n\r\n")
            sock.sendall(plain)
            return first, read_until(sock, ANSWER)

    first, second = await asyncio.to_thread(exchange)
    assert b"data: [DONE]" in first
    assert second.startswith(b"HTTP/1.1 200 OK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_the_command_line_sets_the_chunk_count() -> None:
    """``python -m backends.fast --stream-chunks 3`` streams three chunks per chat."""
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "backends.fast",
        "--port",
        str(port),
        "--stream-chunks",
        "3",
        "--stream-interval-ms",
        "1",
        cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), 20)
        assert f":{port}".encode() in line
        _, _, text = await post(port, json.dumps(REQUEST).encode())
        assert len(sse_data(text)) == 4
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), 10)


def test_the_command_line_refuses_zero_chunks() -> None:
    """``--stream-chunks 0`` is a usage error (exit status 2)."""
    argv = [sys.executable, "-m", "backends.fast", "--port", "1", "--stream-chunks", "0"]
    done = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, timeout=30, check=False)
    assert done.returncode == 2
    assert b"--stream-chunks" in done.stderr
