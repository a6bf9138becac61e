"""The supervisor's public admin listener: the same paths as a single proxy's, answered from
every worker's private admin listener.

Reads fetch every serving worker at once and merge (:mod:`lb.worker_merge`). Calls that change
something are checked for the admin token here, exactly as a single proxy does
(:func:`lb.admin_api.mutating`), then sent to every worker; the answer is 2xx only if every
worker succeeded. Drains, undrains and weights are remembered (:class:`Overrides`) and replayed
into a worker that starts later, so a restarted worker does not forget them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from lb import __version__
from lb.admin import healthz, openapi, static_file  # the handlers a single proxy's listener uses
from lb.admin_api import (
    CONTROL_KEY,
    Control,
    json_errors,
    mutating,
    reload_refused,
    to_dashboard,
)
from lb.config import Config
from lb.logs import quiet_client_errors
from lb.worker_merge import (
    WORKER_LABEL,
    Json,
    merge_backend,
    merge_backends,
    merge_decisions,
    merge_metrics,
    merge_pool,
    merge_pools,
)

log = logging.getLogger("lb.workers")

FETCH_TIMEOUT_S = 5.0


@dataclass(slots=True)
class Member:
    """One worker slot as the supervisor sees it; a restart reuses the slot (same index)."""

    index: int
    pid: int | None = None
    admin_port: int | None = None
    serving: bool = False
    restarts: int = 0
    started_epoch_s: float = 0.0


class Fleet(Control, Protocol):
    """What the supervisor's admin listener needs from the supervisor."""

    draining: bool
    members: list[Member]
    overrides: Overrides

    def validate(self) -> Config | None:
        """Re-read and check the config file; ``None`` (reason logged) if it is invalid."""

    def accepted(self, config: Config) -> None:
        """The workers reloaded ``config``."""


class Overrides:
    """Drains and weights set through the admin API since start-up (weights: since the last
    reload, which resets them, as in a single proxy)."""

    def __init__(self) -> None:
        # (pool, backend, "drain"|"weight") -> (path, body) of the latest such call
        self._calls: dict[tuple[str, str, str], tuple[str, bytes]] = {}

    def record(self, pool: str, backend: str, action: str, path: str, body: bytes) -> None:
        kind = "weight" if action == "weight" else "drain"
        self._calls[(pool, backend, kind)] = (path, body)

    def after_reload(self, config: Config) -> None:
        """Forget weights, and anything about backends the new config no longer has."""
        present = {(p.name, b.name) for p in config.pools for b in p.backends}
        self._calls = {k: v for k, v in self._calls.items() if k[2] == "drain" and k[:2] in present}

    async def replay(self, session: aiohttp.ClientSession, port: int, token: str | None) -> None:
        """Apply every remembered call to the worker at ``port``; failures are logged."""
        for path, body in self._calls.values():
            status, _ = await call(session, port, "POST", path, body, token)
            if not 200 <= status < 300:
                log.warning("replaying %s into a new worker: status %d", path, status)


async def call(
    session: aiohttp.ClientSession,
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    token: str | None = None,
) -> tuple[int, Any]:
    """``(status, parsed JSON or text)`` from a worker's admin listener; ``(0, reason)`` if it
    could not be reached or answered nothing usable in time."""
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    url = f"http://127.0.0.1:{port}{path}"
    try:
        async with session.request(
            method, url, data=body, headers=headers, timeout=aiohttp.ClientTimeout(FETCH_TIMEOUT_S)
        ) as resp:
            if resp.content_type == "application/json":
                return resp.status, await resp.json()
            return resp.status, await resp.text()
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        return 0, f"worker unreachable: {exc!r}"


FLEET_KEY: web.AppKey[Fleet] = web.AppKey("fleet")
SESSION_KEY = web.AppKey("session", aiohttp.ClientSession)


@dataclass(frozen=True, slots=True)
class Answer:
    worker: int
    status: int  # 0: unreachable
    body: Any


async def _ask_all(
    request: web.Request, method: str, path: str, body: bytes | None = None
) -> list[Answer]:
    fleet, session = request.app[FLEET_KEY], request.app[SESSION_KEY]
    serving = [(m.index, m.admin_port) for m in fleet.members if m.serving and m.admin_port]
    token = fleet.admin_token()
    results = await asyncio.gather(
        *(call(session, port, method, path, body, token) for _, port in serving)
    )
    return [Answer(i, s, b) for (i, _), (s, b) in zip(serving, results, strict=True)]


def _error(status: int, type_: str, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": {"type": type_, "message": message}, **extra}, status=status)


def _combine(answers: Sequence[Answer], merge: Callable[[list[Answer]], Json]) -> web.Response:
    """All 2xx: the merged bodies. All the same failure: that answer. Otherwise 502."""
    if not answers:
        return _error(503, "no_workers", "no worker is serving")
    ok = [a for a in answers if 200 <= a.status < 300]
    if len(ok) == len(answers):
        return web.json_response(merge(ok))
    first = answers[0]
    if not ok and first.status and all(a.status == first.status for a in answers):
        return web.json_response(first.body, status=first.status)
    return _error(
        502,
        "partial_failure",
        f"{len(ok)} of {len(answers)} workers succeeded",
        workers=[{"worker": a.worker, "status": a.status, "body": a.body} for a in answers],
    )


def _workers_summary(fleet: Fleet, raw: dict[int, Any] | None) -> list[Json]:
    out = []
    for m in fleet.members:
        entry: Json = {
            "index": m.index,
            "pid": m.pid,
            "serving": m.serving,
            "restarts": m.restarts,
            "uptime_s": time.time() - m.started_epoch_s if m.serving else 0.0,
        }
        if raw is not None:
            entry["state"] = raw.get(m.index)
        out.append(entry)
    return out


async def get_state(request: web.Request) -> web.Response:
    """Every worker's state merged; ``?per_worker=1`` adds each worker's own answer."""
    fleet = request.app[FLEET_KEY]
    answers = [a for a in await _ask_all(request, "GET", "/api/v1/state") if a.status == 200]
    if not answers:
        return _error(503, "no_workers", "no worker answered")
    raw = {a.worker: a.body for a in answers} if request.query.get("per_worker") == "1" else None
    return web.json_response(
        {
            "version": __version__,
            "draining": fleet.draining or any(a.body["draining"] for a in answers),
            "uptime_s": time.time() - fleet.started_epoch_s,
            "time": time.time(),
            "pools": merge_pools([(a.worker, a.body["pools"]) for a in answers]),
            "workers": _workers_summary(fleet, raw),
        }
    )


async def get_pools(request: web.Request) -> web.Response:
    def merge(ok: list[Answer]) -> Json:
        return {"pools": merge_pools([(a.worker, a.body["pools"]) for a in ok])}

    return _combine(await _ask_all(request, "GET", "/api/v1/pools"), merge)


def _merge_found(merge: Callable[[list[tuple[int, Json]]], Json]) -> Any:
    """A GET of one pool: merged over the workers that have it, 404 if none does."""

    async def handler(request: web.Request) -> web.Response:
        answers = await _ask_all(request, "GET", request.raw_path)
        found = [a for a in answers if a.status == 200]
        if found:
            return web.json_response(merge([(a.worker, a.body) for a in found]))
        return _combine(answers, lambda ok: ok[0].body)

    return handler


async def from_one_worker(request: web.Request) -> web.Response:
    """Routes and config: every worker runs the same file, so the first answer is the answer."""
    answers = await _ask_all(request, "GET", request.raw_path)
    for a in answers:
        if a.status:
            return web.json_response(a.body, status=a.status)
    return _error(503, "no_workers", "no worker answered")


async def change_backend(request: web.Request) -> web.Response:
    """Drain, undrain or weight: sent to every worker, remembered for workers started later."""
    fleet = request.app[FLEET_KEY]
    body = await request.read()
    path = request.raw_path  # as the client encoded it
    answers = await _ask_all(request, "POST", path, body)
    if any(200 <= a.status < 300 for a in answers):
        info = request.match_info
        fleet.overrides.record(info["pool"], info["backend"], info["action"], path, body)
    return _combine(answers, lambda ok: merge_backend([a.body for a in ok]))


async def reload(request: web.Request) -> web.Response:
    """Check the file here first, so an invalid one reaches no worker; then reload each."""
    fleet = request.app[FLEET_KEY]
    config = fleet.validate()
    if config is None:
        # Each worker is asked too: it refuses the same file and counts the failed reload.
        await _ask_all(request, "POST", "/api/v1/reload", b"")
        return reload_refused(fleet.last_reload_error)
    answers = await _ask_all(request, "POST", "/api/v1/reload", b"")
    if any(200 <= a.status < 300 for a in answers):
        fleet.accepted(config)
    return _combine(answers, lambda ok: {"reloaded": True, "workers": len(ok)})


async def readyz(request: web.Request) -> web.Response:
    """200 while not draining and at least one worker serves; 503 otherwise."""
    fleet = request.app[FLEET_KEY]
    if fleet.draining:
        return web.json_response({"status": "draining"}, status=503)
    if not any(m.serving for m in fleet.members):
        return web.json_response({"status": "no workers"}, status=503)
    return web.json_response({"status": "ready"})


class _Families:
    """A collector over already-built families, for :func:`generate_latest`."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self._families


def supervisor_families(fleet: Fleet, scraped: set[int]) -> list[Metric]:
    """The supervisor's own series: workers serving, restarts, and whose scrape succeeded."""
    workers = GaugeMetricFamily("lb_workers", "Worker processes serving.")
    workers.add_metric([], sum(1 for m in fleet.members if m.serving))
    restarts = CounterMetricFamily(
        "lb_worker_restarts", "Worker processes restarted after they exited.",
        labels=[WORKER_LABEL],
    )  # fmt: skip
    up = GaugeMetricFamily(
        "lb_worker_up", "1 if the worker's metrics were part of this scrape.",
        labels=[WORKER_LABEL],
    )  # fmt: skip
    for m in fleet.members:
        restarts.add_metric([str(m.index)], m.restarts)
        up.add_metric([str(m.index)], 1.0 if m.index in scraped else 0.0)
    return [workers, restarts, up]


async def metrics(request: web.Request) -> web.Response:
    """Every worker's scrape, each series labelled ``worker``, then the supervisor's own."""
    fleet = request.app[FLEET_KEY]
    answers = await _ask_all(request, "GET", "/metrics")
    texts = [(a.worker, a.body) for a in answers if a.status == 200 and isinstance(a.body, str)]
    families = merge_metrics(texts)
    families += supervisor_families(fleet, {i for i, _ in texts})
    body = generate_latest(_Families(families))
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def make_fleet_admin_app(fleet: Fleet, session: aiohttp.ClientSession) -> web.Application:
    """The supervisor's admin app; ``session`` reaches the workers' private listeners."""
    quiet_client_errors()
    app = web.Application(middlewares=[json_errors])
    app[FLEET_KEY] = fleet
    app[SESSION_KEY] = session
    app[CONTROL_KEY] = fleet  # what `mutating` reads the admin token from
    r = app.router
    r.add_get("/metrics", metrics)
    r.add_get("/healthz", healthz)
    r.add_get("/readyz", readyz)
    r.add_get("/openapi.json", openapi)
    r.add_get("/dashboard", static_file("dashboard.html"))
    r.add_get("/dashboard/", to_dashboard)
    r.add_get("/", to_dashboard)
    r.add_get("/dashboard/dashboard.js", static_file("dashboard.js"))
    r.add_get("/dashboard/dashboard.css", static_file("dashboard.css"))
    r.add_get("/api/v1/state", get_state)
    r.add_get("/api/v1/pools", get_pools)
    r.add_get("/api/v1/pools/{pool}", _merge_found(merge_pool))
    r.add_get("/api/v1/pools/{pool}/decisions", _merge_found(merge_decisions))
    r.add_get("/api/v1/pools/{pool}/backends", _merge_found(merge_backends))
    r.add_get(
        "/api/v1/pools/{pool}/backends/{backend}",
        _merge_found(lambda parts: merge_backend([b for _, b in parts])),
    )
    r.add_get("/api/v1/routes", from_one_worker)
    r.add_get("/api/v1/config", from_one_worker)
    r.add_post(
        "/api/v1/pools/{pool}/backends/{backend}/{action:drain|undrain|weight}",
        mutating(change_backend),
    )
    r.add_post("/api/v1/reload", mutating(reload))
    return app
