"""Tests for backends.tokenize_routes: vLLM's /tokenize and render endpoints on the simulator."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from backends.openai_api import TextTokens, token_ids
from backends.sim import SimServer, start_sim

SYSTEM = "You are the assistant of tenant 07. Answer in one line. " * 4


@pytest.fixture
async def sims() -> AsyncIterator[list[SimServer]]:
    servers = [await start_sim(port=0, ttft_ms=1.0, decode_ms=1.0) for _ in range(2)]
    yield servers
    for sim in servers:
        await sim.close()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        yield s


async def post(session: aiohttp.ClientSession, url: str, body: Any) -> tuple[int, Any]:
    async with session.post(url, json=body) as response:
        return response.status, await response.json()


def chat(user: str) -> dict[str, Any]:
    return {
        "model": "sim-model",
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}],
    }


async def test_tokenize_answers_a_chat_with_the_ids_of_its_own_tokenisation(
    sims: list[SimServer], session: aiohttp.ClientSession
) -> None:
    """/tokenize of messages counts 4 characters a token and lists one id per token."""
    status, data = await post(session, sims[0].url + "/tokenize", chat("hello"))
    text = f"system: {SYSTEM}\nuser: hello\n"
    assert status == 200
    assert data["count"] == len(TextTokens(text)) == len(data["tokens"])
    assert data["tokens"] == token_ids(TextTokens(text))
    assert data["max_model_len"] == sims[0].engine.config.kv_capacity_tokens
    assert all(isinstance(i, int) and 0 <= i < 2**31 for i in data["tokens"])


async def test_tokenize_answers_a_prompt_as_well(
    sims: list[SimServer], session: aiohttp.ClientSession
) -> None:
    """/tokenize of a completion prompt tokenises the prompt text."""
    status, data = await post(session, sims[0].url + "/tokenize", {"prompt": "abcdefghij"})
    assert status == 200
    assert data["count"] == 3
    assert data["tokens"] == token_ids(TextTokens("abcdefghij"))


async def test_ids_are_the_same_on_every_replica_and_shared_prefixes_share_them(
    sims: list[SimServer], session: aiohttp.ClientSession
) -> None:
    """Two replicas give a prompt the same ids; two chats on one system prompt share its ids."""
    _, a = await post(session, sims[0].url + "/tokenize", chat("first question"))
    _, same = await post(session, sims[1].url + "/tokenize", chat("first question"))
    _, b = await post(session, sims[1].url + "/tokenize", chat("another one"))
    assert a["tokens"] == same["tokens"]
    shared = len(f"system: {SYSTEM}\n") // 4
    assert a["tokens"][:shared] == b["tokens"][:shared]
    assert a["tokens"] != b["tokens"]


async def test_render_answers_the_chat_as_a_generate_request_with_token_ids(
    sims: list[SimServer], session: aiohttp.ClientSession
) -> None:
    """/v1/chat/completions/render answers token_ids, the model and the sampling limit."""
    body = {**chat("hello"), "max_tokens": 7, "stream": True}
    status, data = await post(session, sims[0].url + "/v1/chat/completions/render", body)
    _, tokenized = await post(session, sims[0].url + "/tokenize", chat("hello"))
    assert status == 200
    assert data["token_ids"] == tokenized["tokens"]
    assert data["model"] == "sim-model"
    assert data["sampling_params"] == {"max_tokens": 7}
    assert data["stream"] is True
    assert data["request_id"]


async def test_tokenizer_endpoints_use_no_batch_slot_and_no_cache(
    sims: list[SimServer], session: aiohttp.ClientSession
) -> None:
    """Tokenising touches neither the engine's counters nor its prefix cache."""
    sim = sims[0]
    await post(session, sim.url + "/tokenize", chat("hello"))
    await post(session, sim.url + "/v1/chat/completions/render", chat("hello"))
    assert sim.engine.completed_total == 0
    assert sim.engine.prefix_cache_queries_total == 0
    assert len(sim.engine.prefix_cache) == 0
    assert sim.stats["requests_by_path"] == {"/tokenize": 1, "/v1/chat/completions/render": 1}


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/tokenize", {"messages": []}),
        ("/tokenize", ["not", "an", "object"]),
        ("/v1/chat/completions/render", {"messages": "hi"}),
        ("/v1/completions/render", {"prompt": 12}),
    ],
)
async def test_a_malformed_body_gets_a_400_in_openai_shape(
    sims: list[SimServer], session: aiohttp.ClientSession, path: str, body: Any
) -> None:
    """A body without a usable prompt is refused with OpenAI's error object."""
    status, data = await post(session, sims[0].url + path, body)
    assert status == 400
    assert data["error"]["type"] == "invalid_request_error"
