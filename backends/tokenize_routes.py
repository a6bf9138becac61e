"""Tokenizer endpoints of the simulated server, as vLLM serves them: ``/tokenize`` and render.

Routers that match prefixes on token ids ask the workers to tokenise a request before placing
it (vllm-router's ``cache_aware``). The simulated server answers with its own tokenisation,
the one its engine and prefix cache use (:class:`backends.openai_api.TextTokens`: 4 characters
per token, a chat being every message as ``"<role>: <content>\\n"``), each token's id being
:func:`backends.openai_api.token_id` of its text, so the ids are deterministic and the same on
every replica, and two prompts sharing ``n`` characters share their first ``n // 4`` ids.

* ``POST /tokenize``: body ``{"model", "messages": [...]}`` or ``{"model", "prompt": "..."}``
  (vLLM's ``TokenizeChatRequest`` and ``TokenizeCompletionRequest``), answer
  ``{"count": N, "max_model_len": M, "tokens": [ids]}``; ``M`` is the engine's
  ``kv_capacity_tokens``, the most one sequence can hold.
* ``POST /v1/chat/completions/render`` and ``POST /v1/completions/render``: body as for the
  model endpoint, answer vLLM's ``GenerateRequest`` reduced to what a router reads:
  ``{"request_id", "model", "token_ids": [ids], "sampling_params": {"max_tokens"},
  "stream"}``.

A malformed body gets a 400 in OpenAI's error shape. None of these touch the engine: no batch
slot, no prefix-cache lookup, no counter but the per-path request count. Faults do not apply.
"""

from __future__ import annotations

import uuid
from typing import Any

from aiohttp import web

from backends.openai_api import (
    openai_error,
    parse_completion_request,
    parse_prompt,
    read_json,
    token_ids,
)
from backends.sim_ops import OPS_HOST


async def _body(request: web.Request) -> dict[str, Any]:
    body = await read_json(request)
    if not isinstance(body, dict):
        raise ValueError("request body must be a JSON object")
    return body


async def tokenize(request: web.Request) -> web.Response:
    """vLLM's ``POST /tokenize``: a chat's ``messages`` or a completion's ``prompt``, as ids."""
    host = request.app[OPS_HOST]
    try:
        body = await _body(request)
        tokens = parse_prompt(body, chat="messages" in body)
    except ValueError as exc:
        return openai_error(400, str(exc))
    ids = token_ids(tokens)
    return web.json_response(
        {
            "count": len(ids),
            "max_model_len": host.engine.config.kv_capacity_tokens,
            "tokens": ids,
        }
    )


async def _render(request: web.Request, *, chat: bool) -> web.Response:
    host = request.app[OPS_HOST]
    try:
        req = parse_completion_request(await _body(request), chat=chat)
    except ValueError as exc:
        return openai_error(400, str(exc))
    return web.json_response(
        {
            "request_id": f"render-{uuid.uuid4().hex}",
            "model": host.model,
            "token_ids": token_ids(req.tokens),
            "sampling_params": {"max_tokens": req.max_tokens},
            "stream": req.stream,
        }
    )


async def render_chat(request: web.Request) -> web.Response:
    """``POST /v1/chat/completions/render``: the chat's prompt as token ids."""
    return await _render(request, chat=True)


async def render_completion(request: web.Request) -> web.Response:
    """``POST /v1/completions/render``: the completion's prompt as token ids."""
    return await _render(request, chat=False)


ROUTES = [
    web.post("/tokenize", tokenize),
    web.post("/v1/chat/completions/render", render_chat),
    web.post("/v1/completions/render", render_completion),
]
