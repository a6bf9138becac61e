"""Operations endpoints of the simulated server: health, metrics, stats, knobs and reset.

``GET /health``, ``GET /metrics`` (vLLM's metric names), ``GET /sim/stats``,
``GET|POST /sim/faults``, ``GET|POST /sim/engine``, ``POST /sim/reset``. They reach the server
they run in only through :class:`OpsHost`, stored under :data:`OPS_HOST`, so this module does
not import ``backends.sim`` (imports flow one way). Faults never apply to them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

from aiohttp import web

from backends.engine import Engine, render_metrics
from backends.faults import Faults
from backends.openai_api import openai_error, read_json

METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class OpsHost(Protocol):
    """What the operations endpoints use of the server they run in."""

    @property
    def model(self) -> str: ...

    @property
    def engine(self) -> Engine: ...

    @property
    def faults(self) -> Faults: ...

    @property
    def stats(self) -> dict[str, Any]: ...

    async def set_refuse(self, refuse: bool, *, for_s: float | None = None) -> None:
        """Close (``True``) or re-open the listener; with ``for_s``, re-open by itself later."""

    def reset_counters(self) -> None:
        """Zero the server's and its engine's counters."""


OPS_HOST: web.AppKey[OpsHost] = web.AppKey("ops_host")


async def health(request: web.Request) -> web.Response:
    f = request.app[OPS_HOST].faults
    if f.hang or f.unhealthy:
        return web.json_response({"status": "unhealthy"}, status=503)
    return web.json_response({"status": "ok"})


async def metrics(request: web.Request) -> web.Response:
    host = request.app[OPS_HOST]
    body = render_metrics(host.engine, host.model).encode()
    return web.Response(body=body, headers={"Content-Type": METRICS_CONTENT_TYPE})


async def sim_stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[OPS_HOST].stats)


async def _json_object(request: web.Request, *, optional: bool = False) -> dict[str, Any]:
    """The body as a JSON object (``{}`` if ``optional`` and empty); else raise ``ValueError``."""
    if optional and not request.body_exists:
        return {}
    body = await read_json(request)
    if not isinstance(body, dict):
        raise ValueError("body must be a JSON object")
    return body


async def sim_faults(request: web.Request) -> web.Response:
    """GET: the fault knobs. POST: change some; ``refuse_for_ms`` refuses, then re-opens."""
    host = request.app[OPS_HOST]
    if request.method == "POST":
        try:
            changes = await _json_object(request)
            refuse_for_ms = changes.pop("refuse_for_ms", None)
            if refuse_for_ms is not None:
                if isinstance(refuse_for_ms, bool) or not isinstance(refuse_for_ms, int | float):
                    raise ValueError("refuse_for_ms must be a number")
                changes["refuse"] = True
            host.faults.update(changes)
        except ValueError as exc:
            return openai_error(400, str(exc))
        if "refuse" in changes:  # answer only once the listener follows
            for_s = None if refuse_for_ms is None else refuse_for_ms / 1000.0
            await host.set_refuse(host.faults.refuse, for_s=for_s)
    return web.json_response(host.faults.as_dict())


async def sim_engine(request: web.Request) -> web.Response:
    """GET: the engine knobs. POST: change some of them."""
    engine = request.app[OPS_HOST].engine
    if request.method == "POST":
        try:
            engine.reconfigure(**await _json_object(request))
        except (ValueError, TypeError) as exc:
            return openai_error(400, str(exc))
    return web.json_response(dataclasses.asdict(engine.config))


async def sim_reset(request: web.Request) -> web.Response:
    """Zero the counters; ``{"clear_cache": true}`` also empties the prefix cache."""
    host = request.app[OPS_HOST]
    try:
        options = await _json_object(request, optional=True)
        clear_cache = options.get("clear_cache", False)
        if not isinstance(clear_cache, bool) or set(options) - {"clear_cache"}:
            raise ValueError("body may only hold a boolean 'clear_cache'")
    except ValueError as exc:
        return openai_error(400, str(exc))
    host.reset_counters()
    if clear_cache:
        host.engine.prefix_cache.clear()
    return web.json_response(host.stats)


ROUTES = [
    web.get("/health", health),
    web.get("/metrics", metrics),
    web.get("/sim/stats", sim_stats),
    web.route("*", "/sim/faults", sim_faults),
    web.route("*", "/sim/engine", sim_engine),
    web.post("/sim/reset", sim_reset),
]
