"""Inference metrics taken from responses as they pass through the proxy: time to first token,
time between tokens, prompt and completion tokens, and requests by model, checked against
what clients of simulated model servers saw, in the scraped ``/metrics`` text."""

from __future__ import annotations

import asyncio
import json
import random
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from backends.sim import SimServer, start_sim
from lb.app import App
from lb.inference import (
    MAX_MODELS,
    MODEL_MAX_BYTES,
    InferenceStats,
    ResponseMeter,
    model_in,
    scan_model,
)
from tests.conftest import pool, proxy_config, url

CHAT = "/v1/chat/completions"
FAST: dict[str, Any] = {"decode_ms": 1, "ttft_ms": 1, "max_batch": 64}
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
SimFactory = Callable[..., Awaitable[list[SimServer]]]


@pytest.fixture
async def sims() -> AsyncIterator[SimFactory]:
    """Factory: ``await sims(n)`` starts ``n`` fast simulated model servers."""
    started: list[SimServer] = []

    async def start(n: int, **knobs: Any) -> list[SimServer]:
        out = [await start_sim(**{**FAST, **knobs}) for _ in range(n)]
        started.extend(out)
        return out

    yield start
    for sim in started:
        await sim.close()


async def chat_proxy(sims: SimFactory, start_proxy: Any) -> App:
    """A proxy with one pool ``chat`` of two simulated servers."""
    servers = await sims(2)
    app: App = await start_proxy(proxy_config([pool("chat", servers)]))
    return app


def chat_body(i: int, *, stream: bool, usage: bool = False, model: str = "sim-model") -> Any:
    body: dict[str, Any] = {
        "model": model,
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": f"Question {i}: " + "why? " * i},
        ],
        "max_tokens": 3 + i,
        "stream": stream,
    }
    if usage:
        body["stream_options"] = {"include_usage": True}
    return body


async def stream_chat(s: aiohttp.ClientSession, app: App, body: Any) -> list[dict[str, Any]]:
    """POST a streamed chat completion; the JSON events the client got, ``[DONE]`` left out."""
    async with s.post(url(app, CHAT), json=body) as resp:
        assert resp.status == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        text = await resp.text()
    events = []
    for block in text.split("\n\n"):
        if block.startswith("data: ") and block != "data: [DONE]":
            events.append(json.loads(block[len("data: ") :]))
    assert text.rstrip().endswith("data: [DONE]")
    return events


async def scrape(app: App) -> Samples:
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"http://127.0.0.1:{app.admin_port}/metrics") as resp,
    ):
        text = await resp.text()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = float(sample.value)
    return out


def value(found: Samples, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    assert key in found, f"no sample {name}{labels}"
    return found[key]


def model_labels(found: Samples, pool_name: str) -> dict[str, float]:
    """``lb_inference_requests_total`` of one pool, by model label."""
    out = {}
    for (name, labels), v in found.items():
        d = dict(labels)
        if name == "lb_inference_requests_total" and d.get("pool") == pool_name:
            out[d["model"]] = v
    return out


def usage_of(events: list[dict[str, Any]]) -> dict[str, int]:
    (usage,) = [e["usage"] for e in events if e.get("usage")]
    return {
        "prompt_tokens": usage["prompt_tokens"],
        "completion_tokens": usage["completion_tokens"],
    }


def content_chunks(events: list[dict[str, Any]]) -> int:
    """Events carrying generated text."""
    return sum(1 for e in events for c in e["choices"] if c.get("delta", {}).get("content"))


async def test_each_stream_observes_one_time_to_first_token(sims, start_proxy):
    """``lb_inference_ttft_seconds_count`` and ``lb_inference_streams_total`` equal the
    number of streamed responses."""
    app = await chat_proxy(sims, start_proxy)
    async with aiohttp.ClientSession() as s:
        for i in range(6):
            await stream_chat(s, app, chat_body(i, stream=True, usage=True))
    found = await scrape(app)
    assert value(found, "lb_inference_ttft_seconds_count", pool="chat") == 6
    assert value(found, "lb_inference_streams_total", pool="chat") == 6


async def test_streams_observe_times_between_tokens(sims, start_proxy):
    """Streams of several tokens each add gaps to ``lb_inference_tbt_seconds``."""
    app = await chat_proxy(sims, start_proxy)
    async with aiohttp.ClientSession() as s:
        for i in range(4):
            await stream_chat(s, app, chat_body(i, stream=True, usage=True))
    found = await scrape(app)
    assert value(found, "lb_inference_tbt_seconds_count", pool="chat") > 0
    assert value(found, "lb_inference_tbt_seconds_sum", pool="chat") > 0


async def test_stream_token_counts_are_the_usage_the_clients_saw(sims, start_proxy):
    """Prompt and completion tokens (``source="usage"``) are the sums of the ``usage``
    objects of the streams the clients read."""
    app = await chat_proxy(sims, start_proxy)
    prompt = completion = 0
    async with aiohttp.ClientSession() as s:
        for i in range(8):
            usage = usage_of(await stream_chat(s, app, chat_body(i, stream=True, usage=True)))
            prompt += usage["prompt_tokens"]
            completion += usage["completion_tokens"]
    found = await scrape(app)
    assert prompt > 0
    assert value(found, "lb_inference_prompt_tokens_total", pool="chat") == prompt
    assert (
        value(found, "lb_inference_completion_tokens_total", pool="chat", source="usage")
        == completion
    )
    assert value(found, "lb_inference_completion_tokens_total", pool="chat", source="chunks") == 0


async def test_streams_without_usage_count_their_content_chunks(sims, start_proxy):
    """Without a ``usage`` object, ``source="chunks"`` counts the content chunks the
    clients got, and nothing is counted from usage."""
    app = await chat_proxy(sims, start_proxy)
    chunks = 0
    async with aiohttp.ClientSession() as s:
        for i in range(5):
            events = await stream_chat(s, app, chat_body(i, stream=True))
            assert not any(e.get("usage") for e in events)
            chunks += content_chunks(events)
    found = await scrape(app)
    assert chunks == sum(3 + i for i in range(5))  # one chunk per generated token
    assert value(found, "lb_inference_completion_tokens_total", pool="chat", source="chunks") == (
        chunks
    )
    assert value(found, "lb_inference_completion_tokens_total", pool="chat", source="usage") == 0
    assert value(found, "lb_inference_prompt_tokens_total", pool="chat") == 0


async def test_json_responses_count_their_usage(sims, start_proxy):
    """Non-streamed completions add their ``usage`` to the token counters, and are no
    streams."""
    app = await chat_proxy(sims, start_proxy)
    prompt = completion = 0
    async with aiohttp.ClientSession() as s:
        for i in range(5):
            async with s.post(url(app, CHAT), json=chat_body(i, stream=False)) as resp:
                assert resp.status == 200
                got = await resp.json()
            prompt += got["usage"]["prompt_tokens"]
            completion += got["usage"]["completion_tokens"]
    found = await scrape(app)
    assert value(found, "lb_inference_prompt_tokens_total", pool="chat") == prompt
    assert (
        value(found, "lb_inference_completion_tokens_total", pool="chat", source="usage")
        == completion
    )
    assert value(found, "lb_inference_streams_total", pool="chat") == 0
    assert value(found, "lb_inference_ttft_seconds_count", pool="chat") == 0


async def test_requests_are_counted_by_the_model_their_body_names(sims, start_proxy):
    """``lb_inference_requests_total{model=...}`` counts each request under its body's model."""
    app = await chat_proxy(sims, start_proxy)
    asked = ["llama", "mistral", "llama", "qwen", "llama", "mistral"]
    async with aiohttp.ClientSession() as s:
        for i, model in enumerate(asked):
            body = chat_body(i, stream=i % 2 == 0, model=model)
            async with s.post(url(app, CHAT), json=body) as resp:
                assert resp.status == 200
                await resp.read()
    found = await scrape(app)
    assert model_labels(found, "chat") == {"llama": 3, "mistral": 2, "qwen": 1}


async def test_a_flood_of_model_names_keeps_the_model_label_bounded(sims, start_proxy):
    """100 distinct model names give at most 64 model labels besides ``other`` and
    ``unknown``, and every request is still counted."""
    app = await chat_proxy(sims, start_proxy)
    async with aiohttp.ClientSession() as s:
        for i in range(100):
            body = {"model": f"m-{i}", "messages": [{"role": "user", "content": "x"}]}
            body["max_tokens"] = 1
            async with s.post(url(app, CHAT), json=body) as resp:
                assert resp.status == 200
                await resp.read()
    labels = model_labels(await scrape(app), "chat")
    named = set(labels) - {"other", "unknown"}
    assert len(named) <= MAX_MODELS == 64
    assert sum(labels.values()) == 100
    assert labels.get("other", 0) >= 100 - 64


def test_a_model_name_gets_a_label_only_once_a_request_for_it_was_served() -> None:
    """Names the servers answer 404 (typos, probes, junk) count as ``other`` and take no
    label; a served model keeps its label for every later request, failed ones included."""
    stats = InferenceStats()
    for i in range(MAX_MODELS + 5):
        stats.count_model(f"junk-{i}", served=False)
    stats.count_model("llama", served=True)
    stats.count_model("llama", served=False)
    stats.count_model(None, served=False)
    assert stats.requests_by_model == {"other": MAX_MODELS + 5, "llama": 2, "unknown": 1}


def test_a_model_name_longer_than_any_real_one_is_counted_as_other() -> None:
    """A body may name a "model" as long as the body itself: as a label it would ride on
    every scrape, so it is counted under ``other``; a name at the limit keeps its label."""
    stats = InferenceStats()
    at_limit = "m" * MODEL_MAX_BYTES
    for name in ("a" * 400_000, "b" * (MODEL_MAX_BYTES + 1), at_limit, "llama"):
        stats.count_model(name)
    assert stats.requests_by_model == {"other": 2, at_limit: 1, "llama": 1}


async def test_a_body_sent_after_its_headers_is_still_counted_under_its_model(sims, start_proxy):
    """A client that sends the request head first and the body a moment later (a separate
    TCP segment) is counted under the body's model, not ``unknown``."""
    app = await chat_proxy(sims, start_proxy)
    body = json.dumps({"model": "late-llama", "messages": [{"role": "user", "content": "x"}]})
    head = (
        f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", app.port)
    try:
        writer.write(head.encode())
        await writer.drain()
        await asyncio.sleep(0.05)  # the proxy has the head, and no body byte yet
        writer.write(body.encode())
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert model_labels(await scrape(app), "chat") == {"late-llama": 1}


async def test_a_long_chat_naming_its_model_after_the_messages_is_counted_under_it(
    sims, start_proxy
):
    """A chat whose ``model`` key follows 8 KB of messages, the order the ``openai`` SDK
    writes, is counted under its model, not ``unknown``."""
    app = await chat_proxy(sims, start_proxy)
    body = {"messages": [{"role": "user", "content": "long " * 1600}], "model": "tail-llama"}
    async with aiohttp.ClientSession() as s, s.post(url(app, CHAT), json=body) as resp:
        assert resp.status == 200
        await resp.read()
    assert model_labels(await scrape(app), "chat") == {"tail-llama": 1}


async def test_a_streams_latency_estimate_is_its_time_to_first_token(start_proxy):
    """A server that sends a stream's headers at once and its first token 0.3 s later is
    estimated at about 0.3 s by latency_weighted's estimate: neither the instant headers nor
    the whole 1 s stream."""

    async def stream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        await asyncio.sleep(0.3)
        for i in range(8):
            chunk = {"choices": [{"index": 0, "delta": {"content": f"t{i}"}}]}
            await resp.write(b"data: %s\n\n" % json.dumps(chunk).encode())
            await asyncio.sleep(0.1)
        await resp.write(b"data: [DONE]\n\n")
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", stream)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        config = proxy_config(
            [
                {
                    "name": "chat",
                    "strategy": "latency_weighted",
                    "backends": [{"url": f"http://127.0.0.1:{port}", "name": "slow-first"}],
                    "health_check": {"enabled": False},
                }
            ]
        )
        lb = await start_proxy(config)
        async with (
            aiohttp.ClientSession() as session,
            session.post(url(lb, "/v1/chat/completions"), json={"stream": True}) as r,
        ):
            assert r.status == 200
            assert (await r.read()).endswith(b"data: [DONE]\n\n")
        backend = lb.proxy.pools["chat"].backends[0]
        assert 0.25 <= backend.rtt_estimate_s < 0.8
    finally:
        await runner.cleanup()


def _sse_body(deltas: list[bytes]) -> bytes:
    events = [b'data: {"choices":[%s]}\n\n' % d for d in deltas]
    return b"".join(events) + b"data: [DONE]\n\n"


# A chat stream: a role-only chunk, three text chunks (one with an escaped quote and spaces
# around its colon), an empty-content chunk and a finish chunk.
CHAT_STREAM = _sse_body(
    [
        b'{"delta":{"role":"assistant","content":""}}',
        b'{"delta":{"content":"Hel"}}',
        b'{"delta":{"content" : "lo \\"content\\": x"}}',
        b'{"delta":{"content":"!"}}',
        b'{"delta":{"content":""}}',
        b'{"delta":{},"finish_reason":"stop"}',
    ]
)
# A completions stream: two text chunks and an empty one.
COMPLETIONS_STREAM = _sse_body(
    [b'{"text":"Hel"}', b'{"text":""}', b'{"text":"lo","finish_reason":"stop"}']
)


@pytest.mark.parametrize(("body", "chunks"), [(CHAT_STREAM, 3), (COMPLETIONS_STREAM, 2)])
def test_a_stream_counts_its_text_chunks_wherever_the_reads_split_it(
    body: bytes, chunks: int
) -> None:
    for cut in range(1, len(body)):
        stats = InferenceStats()
        meter = ResponseMeter(stats, started_s=0.0, sse=True)
        meter.on_body(body[:cut])
        meter.on_body(body[cut:])
        assert meter.events == chunks, f"split at byte {cut}"
        assert stats.tbt.count == chunks - 1, f"split at byte {cut}"


def test_a_json_answers_usage_is_found_at_the_end_of_a_long_body() -> None:
    stats = InferenceStats()
    meter = ResponseMeter(stats, started_s=0.0, sse=False)
    meter.on_body(b'{"choices":[{"message":{"content":"' + b"x" * 10_000)
    for _ in range(50):
        meter.on_body(b"y" * 97)
    meter.on_body(b'"}}],"usage":{"prompt_tokens":12,"completion_tokens":34}}')
    meter.on_end()
    assert (stats.prompt_tokens, stats.completion_tokens) == (12, 34)


def test_a_streams_count_does_not_depend_on_how_its_keys_are_spelled_or_split() -> None:
    rng = random.Random(7)
    spellings = [b'"content":"%s"', b'"content" : "%s"', b'"content":\n"%s"', b'"content":null']
    for _ in range(200):
        deltas, expected = [], 0
        for i in range(rng.randint(1, 8)):
            spelling = rng.choice(spellings)
            text = b"t%d" % i if rng.random() < 0.8 else b""
            expected += b"%s" in spelling and text != b""
            deltas.append(b'{"delta":{%s}}' % (spelling % text if b"%s" in spelling else spelling))
        body = _sse_body(deltas)
        cuts = sorted(rng.sample(range(1, len(body)), 3))
        meter = ResponseMeter(InferenceStats(), started_s=0.0, sse=True)
        for start, end in zip([0, *cuts], [*cuts, len(body)], strict=True):
            meter.on_body(body[start:end])
        assert meter.events == expected, (body, cuts)


@pytest.mark.parametrize(
    ("body", "model"),
    [
        (b'{"model":"m-1","messages":[]}', "m-1"),
        (b'{"messages":[],"model" : "after-the-messages"}', "after-the-messages"),
        (b'{"metadata":{"model":1},"model":"second"}', "second"),
        (b'{"x":"model"model":"gpt-4"}', "gpt-4"),  # one "model" ending where the next begins
        (b'{"model":"with \\"quote\\""}', None),  # an escape: not taken for a name
        (b'{"messages":[{"content":"model"}]}', None),
        (b'{"model":"' + b"x" * 200 + b'"}', "x" * 200),
        (b'{"model":"' + b"x" * 201 + b'"}', None),  # longer than a model name may be
        (b"", None),
    ],
)
def test_the_model_is_found_wherever_the_body_names_it(body: bytes, model: str | None) -> None:
    assert model_in(body) == model
    assert scan_model(body) == model  # the compiled build's form, in either build


def test_the_model_scan_finds_what_the_json_pattern_would_in_random_bodies() -> None:
    pattern = re.compile(rb'"model"\s*:\s*"([^"\\]{1,200})"')
    rng = random.Random(11)
    spaces = [b" ", b"\t", b"\n", b"\r", b"\x0b", b"\x0c", b"\x1c", b"_"]
    noise = [b'"model"', b'model"', b":", b'"', b"\\", b"{", b",", b"m"]

    def some(choices: list[bytes], most: int) -> bytes:
        return b"".join(rng.choice(choices) for _ in range(rng.randint(0, most)))

    for _ in range(20_000):
        length = rng.choice([0, 1, 2, 199, 200, 201, rng.randint(0, 210)])
        value = bytes(rng.choice(b'xy\\"') if rng.random() < 0.02 else 120 for _ in range(length))
        key = b'"model"' + some(spaces, 2) + rng.choice([b":", b";"]) + some(spaces, 2)
        body = some(noise, 4) + key + rng.choice([b'"', b"'"]) + value + b'"' + some(noise, 4)
        found = pattern.search(body)
        expected = found.group(1).decode("utf-8", "replace") if found else None
        assert model_in(body) == expected, body
        assert scan_model(body) == expected, body
