"""Tests for backends.sim and backends.engine: the simulated model server, over real sockets."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import re
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from backends.engine import Engine, EngineConfig
from backends.sim import SimServer, start_sim

REPO_ROOT = Path(__file__).resolve().parents[2]
CHAT = "/v1/chat/completions"
# Fast timings: a token every few milliseconds keeps the whole file to a few seconds.
FAST = {"ttft_ms": 1.0, "decode_ms": 2.0}

StartSim = Callable[..., Awaitable[SimServer]]


@pytest.fixture
async def sim_factory() -> AsyncIterator[StartSim]:
    sims: list[SimServer] = []

    async def start(**knobs: Any) -> SimServer:
        sim = await start_sim(port=0, **{**FAST, **knobs})
        sims.append(sim)
        return sim

    yield start
    for sim in sims:
        await sim.close()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        yield s


def chat_body(max_tokens: int, *, stream: bool = False, content: str = "hello") -> dict[str, Any]:
    return {
        "model": "sim-model",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "stream": stream,
    }


async def wait_until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Poll ``condition`` every 10 ms; fail the test if it is still false after ``timeout_s``."""
    for _ in range(int(timeout_s / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    pytest.fail("condition not met in time")


async def read_events(resp: aiohttp.ClientResponse) -> list[tuple[float, str]]:
    """The ``data:`` payloads of an SSE response, each with its arrival time."""
    events = []
    for _ in range(10_000):
        line = await resp.content.readline()
        if not line:
            break
        if line.startswith(b"data: "):
            events.append((time.monotonic(), line[6:].decode().strip()))
    return events


def metric(text: str, name: str) -> float:
    match = re.search(rf'^{re.escape(name)}\{{model_name="sim-model"\}} (\S+)$', text, re.M)
    assert match, f"{name} missing from /metrics"
    return float(match.group(1))


async def test_non_stream_chat_completion_reports_usage(
    sim_factory: StartSim, session: aiohttp.ClientSession
) -> None:
    """A non-streaming chat completion returns the tokens, and usage counting len(text) / 4 up."""
    sim = await sim_factory()
    async with session.post(sim.url + CHAT, json=chat_body(5, content="x" * 40)) as resp:
        assert resp.status == 200
        assert resp.headers["x-sim-instance"] == sim.name == f"sim-{sim.port}"
        body = await resp.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {
        "role": "assistant",
        "content": "tok0 tok1 tok2 tok3 tok4 ",
    }
    assert body["choices"][0]["finish_reason"] == "length"
    # The prompt text is "user: " + 40 characters + "\n": 47 characters, 12 tokens.
    assert body["usage"] == {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}


async def test_stream_sends_a_chunk_per_token_as_generated_then_done(
    sim_factory: StartSim, session: aiohttp.ClientSession
) -> None:
    """A stream yields one chunk per token as it is made, a final chunk, then [DONE]."""
    sim = await sim_factory(decode_ms=20.0)
    started = time.monotonic()
    async with session.post(sim.url + CHAT, json=chat_body(10, stream=True)) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        events = await read_events(resp)
    assert events[-1][1] == "[DONE]"
    chunks = [json.loads(data) for _, data in events[:-1]]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0] == {"role": "assistant", "content": "tok0 "}
    assert [d.get("content") for d in deltas[1:10]] == [f"tok{i} " for i in range(1, 10)]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    first_at, done_at = events[0][0], events[-1][0]
    assert first_at - started < (done_at - started) / 2  # not buffered until the end


async def test_stream_with_include_usage_sends_a_usage_chunk_before_done(
    sim_factory: StartSim, session: aiohttp.ClientSession
) -> None:
    """``stream_options.include_usage`` adds a chunk with empty choices and the usage."""
    sim = await sim_factory()
    body = {**chat_body(3, stream=True), "stream_options": {"include_usage": True}}
    async with session.post(sim.url + CHAT, json=body) as resp:
        events = await read_events(resp)
    usage_chunk = json.loads(events[-2][1])
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}


async def test_requests_beyond_max_batch_wait_in_the_queue(
    sim_factory: StartSim, session: aiohttp.ClientSession
) -> None:
    """With max_batch=2, six concurrent requests run two at a time and the rest show as waiting."""
    sim = await sim_factory(max_batch=2)

    async def complete() -> int:
        async with session.post(sim.url + CHAT, json=chat_body(30)) as resp:
            await resp.read()
            return resp.status

    tasks = [asyncio.create_task(complete()) for _ in range(6)]
    waiting_seen = 0.0
    for _ in range(200):
        async with session.get(sim.url + "/metrics") as resp:
            waiting_seen = max(waiting_seen, metric(await resp.text(), "vllm:num_requests_waiting"))
        if waiting_seen > 0:
            break
        await asyncio.sleep(0.005)
    assert await asyncio.gather(*tasks) == [200] * 6
    assert waiting_seen > 0
    assert sim.stats["max_running_seen"] == 2
    assert sim.stats["completed"] == 6


async def test_metrics_expose_vllm_names_with_help_type_and_model_label(
    sim_factory: StartSim, session: aiohttp.ClientSession
) -> None:
    """/metrics serves vLLM's metric names, each with HELP, TYPE and a model_name label."""
    sim = await sim_factory()
    async with session.post(sim.url + CHAT, json=chat_body(4, content="y" * 20)) as resp:
        await resp.read()
    async with session.get(sim.url + "/metrics") as resp:
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    names = [
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:gpu_cache_usage_perc",
        "vllm:kv_cache_usage_perc",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:request_success_total",
        "sim_requests_aborted_total",
    ]
    for name in names:
        assert f"# HELP {name} " in text
        assert f"# TYPE {name} " in text
        metric(text, name)
    assert metric(text, "vllm:prompt_tokens_total") == 7.0  # "user: " + 20 + "\n" = 27 chars
    assert metric(text, "vllm:generation_tokens_total") == 4.0
    assert metric(text, "vllm:request_success_total") == 1.0


async def test_error_rate_one_answers_the_configured_status(
    sim_factory: StartSim, session: aiohttp.ClientSession
) -> None:
    """With error_rate=1 every model request gets error_status and an OpenAI error body."""
    sim = await sim_factory(error_rate=1.0, error_status=429, seed=7)
    for _ in range(3):
        async with session.post(sim.url + CHAT, json=chat_body(2)) as resp:
            assert resp.status == 429
            assert set((await resp.json())["error"]) == {"message", "type", "code"}
    assert sim.stats["errors_injected"] == 3
    assert sim.engine.completed_total == 0


async def test_invalid_json_gets_a_400_in_openai_error_shape(
    sim_factory: StartSim, session: aiohttp.ClientSession
) -> None:
    """A body that is not JSON is answered 400 with type invalid_request_error."""
    sim = await sim_factory()
    async with session.post(sim.url + CHAT, data=b"{not json") as resp:
        assert resp.status == 400
        error = (await resp.json())["error"]
    assert error["type"] == "invalid_request_error"
    assert error["code"] is None


async def test_missing_messages_gets_a_400(
    sim_factory: StartSim, session: aiohttp.ClientSession
) -> None:
    """A chat request without messages is answered 400."""
    sim = await sim_factory()
    async with session.post(sim.url + CHAT, json={"model": "m", "max_tokens": 3}) as resp:
        assert resp.status == 400


async def test_unknown_path_gets_a_json_404(
    sim_factory: StartSim, session: aiohttp.ClientSession
) -> None:
    """A path the server does not serve is answered 404 with a JSON error body."""
    sim = await sim_factory()
    async with session.get(sim.url + "/no/such/path") as resp:
        assert resp.status == 404
        assert "error" in await resp.json()


async def test_drop_after_chunks_cuts_the_stream_mid_way(
    sim_factory: StartSim, session: aiohttp.ClientSession
) -> None:
    """drop_after_chunks=3 aborts the connection after three chunks, without a terminator."""
    sim = await sim_factory(drop_after_chunks=3)
    received = 0
    with pytest.raises(aiohttp.ClientPayloadError):
        async with session.post(sim.url + CHAT, json=chat_body(10, stream=True)) as resp:
            for _ in range(100):
                line = await resp.content.readline()
                if not line:
                    break
                received += line.startswith(b"data: ")
    assert received == 3
    assert sim.stats["streams_dropped"] == 1


async def test_refuse_makes_connects_fail_until_cleared(sim_factory: StartSim) -> None:
    """refuse closes the listening socket and clearing it re-opens the same port."""
    sim = await sim_factory()
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.post(sim.url + "/sim/faults", json={"refuse": True}) as resp:
            assert resp.status == 200
        with pytest.raises(aiohttp.ClientConnectorError):
            await session.get(sim.url + "/health")
        await sim.set_refuse(False)
        async with session.get(sim.url + "/health") as resp:
            assert resp.status == 200


async def test_refuse_for_ms_reopens_the_listener_by_itself(sim_factory: StartSim) -> None:
    """refuse_for_ms refuses connections for that long, then serves again."""
    sim = await sim_factory()
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.post(sim.url + "/sim/faults", json={"refuse_for_ms": 100}) as resp:
            assert resp.status == 200
        assert not sim.listening
        await wait_until(lambda: sim.listening)
        async with session.get(sim.url + "/health") as resp:
            assert resp.status == 200


async def test_hang_holds_requests_until_cleared(
    sim_factory: StartSim, session: aiohttp.ClientSession
) -> None:
    """While hang is set requests get no answer and /health says 503; clearing it lets them run."""
    sim = await sim_factory(hang=True)

    async def complete() -> int:
        async with session.post(sim.url + CHAT, json=chat_body(2)) as resp:
            return resp.status

    task = asyncio.create_task(complete())
    await wait_until(lambda: sim.stats["requests_by_path"].get(CHAT) == 1)
    async with session.get(sim.url + "/health") as resp:
        assert resp.status == 503
    assert not task.done()
    sim.faults.hang = False
    assert await asyncio.wait_for(task, 5) == 200


async def test_client_leaving_mid_stream_frees_its_batch_slot(
    sim_factory: StartSim, session: aiohttp.ClientSession
) -> None:
    """A client that disconnects mid-stream frees the slot at once and counts as aborted."""
    sim = await sim_factory()
    resp = await session.post(sim.url + CHAT, json=chat_body(100_000, stream=True))
    assert (await resp.content.readline()).startswith(b"data: ")
    assert sim.engine.running == 1
    resp.close()  # drops the connection
    await wait_until(lambda: sim.engine.running == 0)
    assert sim.stats["aborted"] == 1
    assert sim.stats["completed"] == 0


async def test_client_leaving_a_non_stream_request_frees_its_batch_slot(
    sim_factory: StartSim, session: aiohttp.ClientSession
) -> None:
    """A client that gives up on a non-streaming request frees the slot and counts as aborted."""
    sim = await sim_factory()
    request = session.post(sim.url + CHAT, json=chat_body(100_000))
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(request, 0.2)
    await wait_until(lambda: sim.engine.running == 0)
    assert sim.stats["aborted"] == 1


async def test_echo_returns_the_sha256_of_the_body(
    sim_factory: StartSim, session: aiohttp.ClientSession
) -> None:
    """/echo reports method, path, query, headers, body length and sha256 of a 3 MB body."""
    sim = await sim_factory()
    payload = os.urandom(3_000_000)
    async with session.put(
        sim.url + "/echo?a=1&a=2", data=io.BytesIO(payload), headers={"X-Probe": "v"}
    ) as r:
        echo = await r.json()
    assert echo["method"] == "PUT"
    assert echo["path"] == "/echo"
    assert echo["query"] == {"a": ["1", "2"]}
    assert echo["headers"]["x-probe"] == "v"
    assert echo["body_length"] == len(payload)
    assert echo["body_sha256"] == hashlib.sha256(payload).hexdigest()


async def test_stream_endpoint_sends_the_requested_chunks(
    sim_factory: StartSim, session: aiohttp.ClientSession
) -> None:
    """/stream sends N chunks of B bytes, chunk i filled with the i-th letter."""
    sim = await sim_factory()
    async with session.get(sim.url + "/stream?chunks=3&interval_ms=5&size=4") as resp:
        assert resp.headers["Transfer-Encoding"] == "chunked"
        assert await resp.read() == b"aaaabbbbcccc"


async def test_status_endpoint_answers_the_requested_status(
    sim_factory: StartSim, session: aiohttp.ClientSession
) -> None:
    """/status/{code} answers that status."""
    sim = await sim_factory()
    async with session.get(sim.url + "/status/502") as resp:
        assert resp.status == 502
        assert await resp.json() == {"status": 502}


async def test_per_token_time_grows_with_the_running_batch() -> None:
    """Per-token time is decode_ms * (1 + batch_slowdown * (running - 1)) / speed."""
    engine = Engine(EngineConfig(decode_ms=10.0, batch_slowdown=0.5, speed=0.5))
    assert engine.decode_step_s() == pytest.approx(0.020)
    async with engine.admit(1), engine.admit(1), engine.admit(1):
        assert engine.decode_step_s() == pytest.approx(0.040)


async def test_kv_cache_usage_counts_running_tokens_and_clamps_at_one() -> None:
    """KV-cache usage is running prompt tokens over capacity, clamped to 1."""
    engine = Engine(EngineConfig(kv_capacity_tokens=1000))
    async with engine.admit(100):
        assert engine.kv_cache_usage == pytest.approx(0.1)
        async with engine.admit(5000):
            assert engine.kv_cache_usage == 1.0
    assert engine.kv_cache_usage == 0.0


async def test_a_waiting_request_that_is_cancelled_leaves_the_queue() -> None:
    """Cancelling a queued request removes it from the queue and counts it as aborted."""
    engine = Engine(EngineConfig(max_batch=1))

    async def wait_for_slot() -> None:
        async with engine.admit(1):
            pass

    async with engine.admit(1):
        task = asyncio.create_task(wait_for_slot())
        await wait_until(lambda: engine.waiting == 1)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert engine.waiting == 0
    assert engine.aborted_total == 2  # the cancelled waiter and the unfinished holder
    assert engine.running == 0


def free_ports(count: int) -> list[int]:
    """Ports that were free a moment ago (bound to port 0, then released)."""
    socks = [socket.socket() for _ in range(count)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


async def test_cli_serves_every_port_and_exits_zero_on_sigterm(
    session: aiohttp.ClientSession,
) -> None:
    """The CLI prints a readiness line per port, serves each, and exits 0 on SIGTERM."""
    ports = free_ports(2)
    args = [a for p in ports for a in ("--port", str(p))]
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "backends.sim",
        *args,
        "--decode-ms",
        "1",
        cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        for port in ports:
            line = await asyncio.wait_for(proc.stdout.readline(), 10)
            assert line.decode() == f"sim-{port} listening on http://127.0.0.1:{port}\n"
        for port in ports:
            url = f"http://127.0.0.1:{port}{CHAT}"
            async with session.post(url, json=chat_body(2)) as resp:
                assert resp.status == 200
                assert resp.headers["x-sim-instance"] == f"sim-{port}"
        proc.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(proc.communicate(), 10)
        assert proc.returncode == 0, stderr.decode()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.communicate()
