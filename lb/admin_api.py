"""The admin API (JSON, on the admin listener): live state, drain, weights, reload.

Reads need no credentials (the listener is meant for a trusted network, like ``/metrics``);
every call that changes something needs ``Authorization: Bearer <admin token>``. A wrong or
missing token, or none configured at all, is answered 401 and changes nothing. The numbers
shown are the very fields the strategies and ``/metrics`` read.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

from aiohttp import web

from lb import __version__
from lb.backend import Backend
from lb.config import Config, route_name
from lb.health import HealthChecker
from lb.load_report import LoadReporter
from lb.metrics import CODE_CLASSES
from lb.pool import Pool
from lb.proxy import Proxy
from lb.stats import Histogram

SECRET_KEYS = frozenset({"token", "api_keys"})
REDACTED = "<redacted>"


class Control(Protocol):
    """What the admin API needs from the running app."""

    proxy: Proxy | None
    config: Config
    started_epoch_s: float

    @property
    def health_checkers(self) -> Mapping[str, HealthChecker]:
        """Each pool's active health checker, by pool name."""

    @property
    def load_reporters(self) -> Mapping[str, LoadReporter]:
        """Each pool's load reporter (scrapes of the backends' metrics), by pool name."""

    def admin_token(self) -> str | None: ...

    async def reload(self) -> bool: ...

    @property
    def last_reload_error(self) -> str | None:
        """Why the last refused reload was refused."""


CONTROL_KEY: web.AppKey[Control] = web.AppKey("control")


def _classes(counts: list[int]) -> dict[str, int]:
    return dict(zip(CODE_CLASSES, counts, strict=True))


def _histogram(h: Histogram) -> dict[str, Any]:
    return {"buckets": list(h.buckets), "counts": list(h.counts), "sum": h.sum}


def backend_state(backend: Backend, pool: Pool, control: Control) -> dict[str, Any]:
    now = pool.clock()
    ejected_for = max(backend.ejected_until_s - now, 0.0)
    state: dict[str, Any] = {
        "name": backend.name,
        "url": backend.url,
        "weight": backend.weight,
        "effective_weight": backend.effective_weight,
        "max_concurrency": backend.max_concurrency,
        "healthy": backend.healthy,
        "available": backend.available,
        "drained": backend.drained,
        "ejected": ejected_for > 0,
        "ejected_for_s": ejected_for,
        # Held out by a 503/429's Retry-After: seconds left.
        "held_for_s": max(backend.held_until_s - now, 0.0),
        "ejections_total": backend.ejections_total,
        "in_flight": backend.in_flight,
        "latency_estimate_s": backend.rtt_at(now, pool.rtt_decay_s),
        "requests_total": backend.requests_total,
        "failures_total": backend.failures_total,
        "responses_by_class": _classes(backend.responses_by_class),
        "latency": _histogram(backend.latency),
        "health_check": None,
        "load_report": None,
    }
    checker = control.health_checkers.get(pool.name)
    if checker is not None and checker.config.enabled and backend in checker.backends:
        probes = checker.stats(backend)
        state["health_check"] = {
            "last_result": probes.last_reason,  # "status 200", "connection refused", ...
            "last_duration_s": probes.last_duration_s,
            "passed_total": probes.passed_total,
            "failed_total": probes.failed_total,
        }
    reporter = control.load_reporters.get(pool.name)
    if reporter is not None and backend in reporter.backends:
        scrapes = reporter.stats(backend)
        state["load_report"] = {
            "waiting": backend.reported_waiting,
            "running": backend.reported_running,
            "kv_usage": backend.reported_kv_usage,
            "age_s": now - backend.reported_at_s if backend.reported_at_s else None,
            "last_error": scrapes.last_error,
            "missing": list(scrapes.missing),
            "ok_total": scrapes.ok_total,
            "failed_total": scrapes.failed_total,
        }
    return state


def pool_state(pool: Pool, control: Control) -> dict[str, Any]:
    stats = pool.stats
    return {
        "name": pool.name,
        "strategy": pool.strategy.name,
        "panicking": pool.panicking,
        "queue_depth": len(pool.queue) if pool.queue is not None else 0,
        "responses_by_class": _classes(stats.responses_by_class),
        "retries_total": sum(stats.retries.values()),
        "retries": dict(stats.retries),
        "client_disconnects": stats.client_disconnects,
        "recent_errors": [
            {
                "time": e.time,
                "request_id": e.request_id,
                "backend": e.backend,
                "status": e.status,
                "type": e.type,
                "message": e.message,
            }
            for e in reversed(stats.recent_errors)
        ],
        "backends": [backend_state(b, pool, control) for b in pool.backends],
        "shadow": {
            "strategy": pool.shadow_strategy.name,
            "agree": stats.shadow_agree,
            "disagree": stats.shadow_disagree,
        }
        if pool.shadow_strategy is not None
        else None,
    }


async def get_decisions(request: web.Request) -> web.Response:
    """The last routing decisions of a pool: which backend, and why."""
    pool = _pool(request)
    return web.json_response(
        {
            "pool": pool.name,
            "decisions": [
                {"time": d.time, "request_id": d.request_id.decode("latin-1"), "backend": d.backend,
                 "reason": d.reason}
                for d in reversed(pool.stats.decisions)
            ],
        }
    )  # fmt: skip


def redact(node: Any) -> Any:
    """A copy of a config tree with every secret value replaced."""
    if isinstance(node, dict):
        return {k: (REDACTED if k in SECRET_KEYS and v else redact(v)) for k, v in node.items()}
    if isinstance(node, list):
        return [redact(v) for v in node]
    return node


def _control(request: web.Request) -> Control:
    return request.app[CONTROL_KEY]


def _proxy(request: web.Request) -> Proxy:
    proxy = _control(request).proxy
    if proxy is None:
        raise web.HTTPServiceUnavailable(text="starting")
    return proxy


def _error(status: int, type_: str, message: str) -> web.Response:
    return web.json_response({"error": {"type": type_, "message": message}}, status=status)


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp's own 404 and 405 (an unknown path or method) in the API's JSON shape."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400 or exc.content_type == "application/json":
            raise
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status, "error")
        response = _error(exc.status, kind, f"{exc.reason}: {request.method} {request.path}")
        if exc.status == 405:
            response.headers["Allow"] = exc.headers.get("Allow", "")
        return response


async def to_dashboard(request: web.Request) -> web.StreamResponse:
    raise web.HTTPFound("/dashboard")


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _unauthorized(message: str) -> web.Response:
    """A 401 naming the scheme to authenticate with (RFC 9110 section 11.6.1)."""
    response = _error(401, "unauthorized", message)
    response.headers["WWW-Authenticate"] = 'Bearer realm="lb-admin"'
    return response


def mutating(handler: Handler) -> Handler:
    """Wrap a handler that changes state: the admin bearer token is required."""

    async def guarded(request: web.Request) -> web.StreamResponse:
        token = _control(request).admin_token()
        if token is None:
            return _unauthorized(
                "admin calls that change something need a bearer token, and none is "
                "configured: set admin.token or the LB_ADMIN_TOKEN environment variable"
            )
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        # aiohttp decodes header bytes with surrogateescape: encode them back the same way.
        presented = given.strip().encode("utf-8", "surrogateescape")
        if scheme.lower() != "bearer" or not hmac.compare_digest(presented, token.encode()):
            return _unauthorized("a valid admin bearer token is required")
        return await handler(request)

    return guarded


async def get_state(request: web.Request) -> web.Response:
    control = _control(request)
    proxy = _proxy(request)
    return web.json_response(
        {
            "version": __version__,
            "draining": proxy.draining,
            "uptime_s": time.time() - control.started_epoch_s,
            "time": time.time(),
            "pools": [pool_state(p, _control(request)) for p in proxy.pools.values()],
        }
    )


async def get_pools(request: web.Request) -> web.Response:
    proxy = _proxy(request)
    return web.json_response(
        {"pools": [pool_state(p, _control(request)) for p in proxy.pools.values()]}
    )


def _pool(request: web.Request) -> Pool:
    pool = _proxy(request).pools.get(request.match_info["pool"])
    if pool is None:
        raise web.HTTPNotFound(
            text='{"error": {"type": "not_found", "message": "no such pool"}}',
            content_type="application/json",
        )
    return pool


def _backend(request: web.Request) -> tuple[Pool, Backend]:
    pool = _pool(request)
    name = request.match_info["backend"]
    for backend in pool.backends:
        if backend.name == name:
            return pool, backend
    raise web.HTTPNotFound(
        text='{"error": {"type": "not_found", "message": "no such backend in this pool"}}',
        content_type="application/json",
    )


async def get_pool(request: web.Request) -> web.Response:
    return web.json_response(pool_state(_pool(request), _control(request)))


async def get_routes(request: web.Request) -> web.Response:
    config = _control(request).config
    routes = [
        {
            "name": route_name(r.name, i),
            "pool": r.pool,  # null for a split route: "split" names its pools
            "split": None if r.split is None else [t.model_dump() for t in r.split],
            "mirror": None if r.mirror is None else r.mirror.model_dump(),
            "path_prefix": r.path_prefix,
            "model": r.model,
            "headers": r.headers,
            "methods": r.methods,
            "requires_api_key": r.auth is not None,
        }
        for i, r in enumerate(config.routes)
    ]
    return web.json_response({"routes": routes, "default_pool": config.pools[0].name})


async def get_config(request: web.Request) -> web.Response:
    return web.json_response(redact(_control(request).config.model_dump(mode="json")))


async def get_backends(request: web.Request) -> web.Response:
    pool = _pool(request)
    control = _control(request)
    return web.json_response(
        {"pool": pool.name, "backends": [backend_state(b, pool, control) for b in pool.backends]}
    )


async def get_backend(request: web.Request) -> web.Response:
    pool, backend = _backend(request)
    return web.json_response(backend_state(backend, pool, _control(request)))


async def drain(request: web.Request) -> web.Response:
    pool, backend = _backend(request)
    backend.drained = True
    pool.refresh()
    return web.json_response(backend_state(backend, pool, _control(request)))


async def undrain(request: web.Request) -> web.Response:
    pool, backend = _backend(request)
    backend.drained = False
    pool.refresh()
    return web.json_response(backend_state(backend, pool, _control(request)))


async def set_weight(request: web.Request) -> web.Response:
    pool, backend = _backend(request)
    try:
        body = await request.json()
        weight = body["weight"]
    except (ValueError, KeyError, TypeError, RecursionError):  # RecursionError: nested too deep
        return _error(400, "bad_request", 'body must be JSON like {"weight": 3}')
    if not isinstance(weight, int) or isinstance(weight, bool) or not 1 <= weight <= 10000:
        return _error(400, "bad_request", "weight must be an integer from 1 to 10000")
    backend.weight = weight
    backend.effective_weight = float(weight)
    pool.refresh()  # the pool's weight total changed
    return web.json_response(backend_state(backend, pool, _control(request)))


async def reload(request: web.Request) -> web.Response:
    control = _control(request)
    if not await control.reload():
        return reload_refused(control.last_reload_error)
    return web.json_response({"reloaded": True})


def reload_refused(reason: str | None) -> web.Response:
    """400 for a config file that would not load: the running config is kept."""
    return _error(
        400,
        "invalid_config",
        f"reload refused; the running config is unchanged: {reason or 'see the log'}",
    )


def add_routes(app: web.Application, control: Control) -> None:
    app[CONTROL_KEY] = control
    r = app.router
    r.add_get("/api/v1/state", get_state)
    r.add_get("/api/v1/pools", get_pools)
    r.add_get("/api/v1/pools/{pool}", get_pool)
    r.add_get("/api/v1/pools/{pool}/decisions", get_decisions)
    r.add_get("/api/v1/pools/{pool}/backends", get_backends)
    r.add_get("/api/v1/pools/{pool}/backends/{backend}", get_backend)
    r.add_get("/api/v1/routes", get_routes)
    r.add_get("/api/v1/config", get_config)
    base = "/api/v1/pools/{pool}/backends/{backend}"
    r.add_post(base + "/drain", mutating(drain))
    r.add_post(base + "/undrain", mutating(undrain))
    r.add_post(base + "/weight", mutating(set_weight))
    r.add_post("/api/v1/reload", mutating(reload))
