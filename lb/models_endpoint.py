"""``GET /v1/models`` answered by the proxy: the union of the models its pools serve.

A pool's models come from its configuration (``models``, and the ``model`` matchers of the
routes to it); for a pool that names none, from its backends' own ``/v1/models``, asked of
available backends in turn until one answers, and cached for ``CACHE_S`` (``FAILED_CACHE_S``
when none answered). Only pools a route reaches are listed. ``GET /v1/models/{id}`` answers
one model of that union, or 404 in OpenAI's shape.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Mapping
from urllib.parse import unquote

import aiohttp

from lb.backend import Backend
from lb.downstream import ClientConnection
from lb.errors import ModelNotFound
from lb.pool import Pool
from lb.request import IncomingRequest
from lb.tls import aiohttp_tls

log = logging.getLogger("lb.models")

CACHE_S = 30.0
# A pool none of whose backends answered is asked again sooner.
FAILED_CACHE_S = 5.0
FETCH_TIMEOUT_S = 2.0
# Backends asked in turn, until one answers.
MAX_ASKED = 4


def _model(model: str, pool: str, created: int) -> dict[str, object]:
    return {"id": model, "object": "model", "created": created, "owned_by": f"lb:{pool}"}


class ModelsEndpoint:
    """Answers ``GET /v1/models`` from configured and discovered model names."""

    def __init__(
        self, configured: Mapping[str, list[str]], pools: Callable[[], Mapping[str, Pool]]
    ) -> None:
        self.configured = {name: list(models) for name, models in configured.items()}
        self._pools = pools
        self._cache: dict[str, tuple[float, list[str]]] = {}
        self._session: aiohttp.ClientSession | None = None

    def answers(self, req: IncomingRequest) -> bool:
        if req.method != b"GET":
            return False
        path = req.path
        return path == b"/v1/models" or path.startswith(b"/v1/models/")

    async def answer(self, client: ClientConnection, req: IncomingRequest) -> None:
        names: dict[str, str] = {}  # model -> owning pool, first wins
        for pool_name, pool in self._pools().items():
            models = self.configured.get(pool_name) or await self._discover(pool)
            for model in models:
                names.setdefault(model, pool_name)
        now = int(time.time())
        wanted = req.path[len(b"/v1/models/") :]
        if not wanted:
            body = {
                "object": "list",
                "data": [_model(model, pool, now) for model, pool in names.items()],
            }
            client.answer(req, 200, json.dumps(body).encode())
            return
        model = unquote(wanted.decode("utf-8", "replace"))
        if model not in names:
            raise ModelNotFound(model)
        client.answer(req, 200, json.dumps(_model(model, names[model], now)).encode())

    async def _discover(self, pool: Pool) -> list[str]:
        cached = self._cache.get(pool.name)
        now = time.monotonic()
        if cached is not None and now < cached[0]:
            return cached[1]
        models: list[str] | None = None
        for backend in pool.eligible[:MAX_ASKED]:
            try:
                models = await self._fetch(backend)
                break
            except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError) as exc:
                log.debug("pool=%s backend=%s /v1/models failed: %s", pool.name, backend.name, exc)
        if models is None:
            self._cache[pool.name] = (now + FAILED_CACHE_S, [])
            return []
        self._cache[pool.name] = (now + CACHE_S, models)
        return models

    async def _fetch(self, backend: Backend) -> list[str]:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=FETCH_TIMEOUT_S)
            )
        async with self._session.get(backend.origin + "/v1/models", **aiohttp_tls(backend)) as resp:
            resp.raise_for_status()
            data = await resp.json(content_type=None)
        return [m["id"] for m in data["data"] if isinstance(m.get("id"), str)]

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
            await asyncio.sleep(0)
