"""The admin listener (aiohttp): metrics, probes, the admin API, the dashboard, the API spec.

It runs on its own port, in the same event loop as the data plane.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from importlib import resources

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from lb.admin_api import Control, add_routes, json_errors, to_dashboard
from lb.logs import quiet_client_errors
from lb.openapi import spec

REGISTRY_KEY = web.AppKey("registry", CollectorRegistry)
READY_KEY: web.AppKey[Callable[[], bool]] = web.AppKey("ready")

STATIC_TYPES = {
    "dashboard.html": "text/html",
    "dashboard.js": "text/javascript",
    "dashboard.css": "text/css",
}


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[REGISTRY_KEY])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process runs and its event loop answers."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: 200 while accepting traffic, 503 once shutdown has begun."""
    if request.app[READY_KEY]():
        return web.json_response({"status": "ready"})
    return web.json_response({"status": "draining"}, status=503)


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(spec())


def static_file(name: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def serve(request: web.Request) -> web.Response:
        try:
            body = resources.files("lb.static").joinpath(name).read_bytes()
        except FileNotFoundError:
            raise web.HTTPNotFound() from None
        return web.Response(
            body=body,
            content_type=STATIC_TYPES[name],
            headers={"Cache-Control": "no-cache"},
        )

    return serve


def make_admin_app(
    registry: CollectorRegistry, ready: Callable[[], bool], control: Control
) -> web.Application:
    quiet_client_errors()
    app = web.Application(middlewares=[json_errors])
    app[REGISTRY_KEY] = registry
    app[READY_KEY] = ready
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/openapi.json", openapi)
    app.router.add_get("/dashboard", static_file("dashboard.html"))
    app.router.add_get("/dashboard/", to_dashboard)
    app.router.add_get("/", to_dashboard)
    app.router.add_get("/dashboard/dashboard.js", static_file("dashboard.js"))
    app.router.add_get("/dashboard/dashboard.css", static_file("dashboard.css"))
    add_routes(app, control)
    return app
