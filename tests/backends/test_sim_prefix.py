"""Tests for prefix caching in backends.sim and backends.engine, over real sockets."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from backends.engine import Engine, EngineConfig
from backends.openai_api import TextTokens
from backends.sim import SimServer, start_sim
from backends.sim_flags import parse_args, start_knobs

CHAT = "/v1/chat/completions"
# ttft 1 ms plus 0.1 ms per computed prompt token: fast, yet far apart with and without hits.
KNOBS = {"ttft_ms": 1.0, "prefill_ms_per_token": 0.1, "decode_ms": 1.0}
# "system: <content>\n" is 400 characters, 100 tokens: its first 6 blocks of 16 are full.
SYSTEM = "You are a helpful assistant. " * 13 + "Be brief." + "!" * 5
SYSTEM_BLOCK_TOKENS = 96

StartSim = Callable[..., Awaitable[SimServer]]


@pytest.fixture
async def sim_factory() -> AsyncIterator[StartSim]:
    sims: list[SimServer] = []

    async def start(**knobs: Any) -> SimServer:
        sim = await start_sim(port=0, **{**KNOBS, **knobs})
        sims.append(sim)
        return sim

    yield start
    for sim in sims:
        await sim.close()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        yield s


def chat_body(user: str, *, system: str = SYSTEM) -> dict[str, Any]:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    return {"model": "sim-model", "messages": messages, "max_tokens": 2}


def prompt_tokens(body: dict[str, Any]) -> int:
    """The prompt length the server counts for ``body``: len(text) / 4 rounded up."""
    return len(TextTokens("".join(f"{m['role']}: {m['content']}\n" for m in body["messages"])))


async def complete(session: aiohttp.ClientSession, sim: SimServer, body: dict[str, Any]) -> None:
    async with session.post(sim.url + CHAT, json=body) as resp:
        assert resp.status == 200
        await resp.read()


async def get_json(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url) as resp:
        return await resp.json()


async def post_json(session: aiohttp.ClientSession, url: str, body: Any) -> tuple[int, Any]:
    async with session.post(url, json=body) as resp:
        return resp.status, await resp.json()


async def scrape(session: aiohttp.ClientSession, sim: SimServer) -> dict[str, float]:
    """The sample of every metric on /metrics, by name."""
    async with session.get(sim.url + "/metrics") as resp:
        text = await resp.text()
    return {m[1]: float(m[2]) for m in re.finditer(r"^(\S+)\{[^}]*\} (\S+)$", text, re.M)}


def test_the_system_prompt_fixture_is_100_tokens() -> None:
    """The shared system prompt of these tests is 100 tokens: 6 full blocks and 4 tokens."""
    assert len(TextTokens(f"system: {SYSTEM}\n")) == 100


async def test_a_repeated_request_hits_the_cache_and_prefills_faster(
    sim_factory: StartSim, session: aiohttp.ClientSession
) -> None:
    """The second identical request hits its full blocks in /metrics and /sim/stats, and the
    server computes its time to first token from the uncached tokens only."""
    sim = await sim_factory()
    body = chat_body("hello")
    tokens = prompt_tokens(body)  # 103
    await complete(session, sim, body)
    first = await get_json(session, sim.url + "/sim/stats")
    await complete(session, sim, body)
    second = await get_json(session, sim.url + "/sim/stats")

    assert first["prefix_cache_hit_tokens"] == 0
    assert first["last_prefill_ms"] == pytest.approx(1.0 + 0.1 * tokens)
    assert second["prefix_cache_hit_tokens"] == SYSTEM_BLOCK_TOKENS
    assert second["prefix_cache_query_tokens"] == 2 * tokens
    assert second["prefix_cache_blocks"] == 6  # the partial seventh block is not cached
    assert second["last_prefill_ms"] == pytest.approx(1.0 + 0.1 * (tokens - SYSTEM_BLOCK_TOKENS))
    assert second["last_prefill_ms"] < first["last_prefill_ms"]
    metrics = await scrape(session, sim)
    assert metrics["vllm:prefix_cache_queries_total"] == 2 * tokens
    assert metrics["vllm:prefix_cache_hits_total"] == SYSTEM_BLOCK_TOKENS
    assert metrics["vllm:gpu_prefix_cache_hit_rate"] == pytest.approx(
        SYSTEM_BLOCK_TOKENS / (2 * tokens)
    )
    assert metrics["vllm:prompt_tokens_total"] == 2 * tokens  # cached tokens count too


async def test_requests_sharing_a_system_prompt_share_its_blocks(
    sim_factory: StartSim, session: aiohttp.ClientSession
) -> None:
    """Different users' questions after the same system prompt hit its full blocks."""
    sim = await sim_factory()
    await complete(session, sim, chat_body("What is the capital of France?"))
    await complete(session, sim, chat_body("Tell me a joke."))
    assert sim.stats["prefix_cache_hit_tokens"] == SYSTEM_BLOCK_TOKENS


async def test_a_different_system_prompt_misses(
    sim_factory: StartSim, session: aiohttp.ClientSession
) -> None:
    """A request whose prompt differs from the first characters on hits nothing."""
    sim = await sim_factory()
    await complete(session, sim, chat_body("hello"))
    await complete(session, sim, chat_body("hello", system="Answer in French. " + SYSTEM))
    assert sim.stats["prefix_cache_hit_tokens"] == 0
    assert sim.stats["prefix_cache_blocks"] == 12


async def test_zero_cache_capacity_disables_prefix_caching(
    sim_factory: StartSim, session: aiohttp.ClientSession
) -> None:
    """With cache_capacity_blocks=0 repeats get no hits and no lookups are counted."""
    sim = await sim_factory(cache_capacity_blocks=0)
    body = chat_body("hello")
    for _ in range(2):
        await complete(session, sim, body)
    stats = sim.stats
    assert (stats["prefix_cache_query_tokens"], stats["prefix_cache_hit_tokens"]) == (0, 0)
    assert stats["prefix_cache_blocks"] == 0
    assert stats["last_prefill_ms"] == pytest.approx(1.0 + 0.1 * prompt_tokens(body))
    assert (await scrape(session, sim))["vllm:gpu_prefix_cache_hit_rate"] == 0.0


async def test_reset_zeroes_the_counters_and_keeps_the_cache_unless_asked(
    sim_factory: StartSim, session: aiohttp.ClientSession
) -> None:
    """POST /sim/reset zeroes the prefix-cache counters; {"clear_cache": true} also empties it."""
    sim = await sim_factory()
    body = chat_body("hello")
    await complete(session, sim, body)
    async with session.post(sim.url + "/sim/reset") as resp:  # no body at all
        stats = await resp.json()
    assert (stats["prefix_cache_query_tokens"], stats["prefix_cache_blocks"]) == (0, 6)
    await complete(session, sim, body)
    assert sim.stats["prefix_cache_hit_tokens"] == SYSTEM_BLOCK_TOKENS

    status, stats = await post_json(session, sim.url + "/sim/reset", {"clear_cache": True})
    assert (status, stats["prefix_cache_hit_tokens"], stats["prefix_cache_blocks"]) == (200, 0, 0)
    await complete(session, sim, body)
    assert sim.stats["prefix_cache_hit_tokens"] == 0


@pytest.mark.parametrize("body", [{"clear_cache": "yes"}, {"clear": True}, [1]])
async def test_reset_refuses_a_bad_body(
    sim_factory: StartSim, session: aiohttp.ClientSession, body: Any
) -> None:
    """A reset body other than an object with a boolean clear_cache is answered 400."""
    sim = await sim_factory()
    status, _ = await post_json(session, sim.url + "/sim/reset", body)
    assert status == 400


async def test_engine_endpoint_changes_the_block_size_and_the_capacity(
    sim_factory: StartSim, session: aiohttp.ClientSession
) -> None:
    """POST /sim/engine resizes the cache, and a new block size starts an empty cache."""
    sim = await sim_factory()
    url = sim.url + "/sim/engine"
    assert sim.stats["prefix_cache_capacity_blocks"] == 65536 // 16  # the default
    await complete(session, sim, chat_body("hello"))

    status, config = await post_json(session, url, {"cache_capacity_blocks": 2})
    assert (status, config["cache_capacity_blocks"]) == (200, 2)
    assert sim.stats["prefix_cache_blocks"] == 2

    status, config = await post_json(
        session, url, {"block_size": 32, "cache_capacity_blocks": None}
    )
    assert (status, config["block_size"], config["cache_capacity_blocks"]) == (200, 32, None)
    assert sim.stats["prefix_cache_capacity_blocks"] == 65536 // 32
    assert sim.stats["prefix_cache_blocks"] == 0


@pytest.mark.parametrize(
    "changes", [{"block_size": 0}, {"cache_capacity_blocks": -1}, {"cache_capacity_blocks": 1.5}]
)
async def test_engine_endpoint_refuses_bad_cache_knobs(
    sim_factory: StartSim, session: aiohttp.ClientSession, changes: dict[str, Any]
) -> None:
    """A block size below 1 or a capacity that is not a non-negative int is answered 400."""
    sim = await sim_factory()
    status, body = await post_json(session, sim.url + "/sim/engine", changes)
    assert status == 400
    assert next(iter(changes)) in body["error"]["message"]
    assert sim.engine.config.block_size == 16


async def test_start_sim_and_the_cli_flags_set_the_cache_knobs(sim_factory: StartSim) -> None:
    """--block-size and --cache-capacity-blocks reach the engine through start_sim's knobs."""
    knobs = start_knobs(parse_args(["--block-size", "8", "--cache-capacity-blocks", "5"]))
    assert (knobs["block_size"], knobs["cache_capacity_blocks"]) == (8, 5)
    assert start_knobs(parse_args([]))["cache_capacity_blocks"] is None
    sim = await sim_factory(block_size=knobs["block_size"], cache_capacity_blocks=5)
    assert sim.engine.prefix_cache.block_size == 8
    assert sim.stats["prefix_cache_capacity_blocks"] == 5


async def test_metrics_describe_the_prefix_cache_series(
    sim_factory: StartSim, session: aiohttp.ClientSession
) -> None:
    """The prefix-cache series carry HELP and TYPE lines: two counters and a gauge."""
    sim = await sim_factory()
    async with session.get(sim.url + "/metrics") as resp:
        text = await resp.text()
    for name, kind in [
        ("vllm:prefix_cache_queries_total", "counter"),
        ("vllm:prefix_cache_hits_total", "counter"),
        ("vllm:gpu_prefix_cache_hit_rate", "gauge"),
    ]:
        assert f"# HELP {name} " in text
        assert f"# TYPE {name} {kind}\n" in text


async def test_a_queued_request_looks_up_the_cache_when_admitted() -> None:
    """A request waiting behind an identical one hits the blocks the running one cached."""
    engine = Engine(EngineConfig(max_batch=1, block_size=4))
    prompt = TextTokens("x" * 100)  # 25 tokens, 6 full blocks
    second = engine.admit(prompt)

    async def run_second() -> None:
        async with second:
            pass

    async with engine.admit(prompt) as first:
        assert first.cached_tokens == 0
        task = asyncio.create_task(run_second())
        for _ in range(100):  # bounded: the task queues at its first step
            if engine.waiting:
                break
            await asyncio.sleep(0)
        assert engine.waiting == 1
        assert engine.prefix_cache_queries_total == 25  # the waiter has not looked up yet
    await asyncio.wait_for(task, 5)
    assert second.cached_tokens == 24
    assert engine.prefix_cache_hits_total == 24
    assert engine.prefix_cache_queries_total == 50


async def test_a_prompt_given_as_a_count_is_not_looked_up() -> None:
    """A sequence admitted with only a token count pays the full prefill and queries nothing."""
    engine = Engine(EngineConfig(ttft_ms=0.0, prefill_ms_per_token=1.0))
    for _ in range(2):
        async with engine.admit(32) as seq:
            assert seq.cached_tokens == 0
    assert engine.prefix_cache_queries_total == 0
    assert engine.prefill_s(32, 16) == pytest.approx(0.016)
