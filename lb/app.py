"""Wiring and lifecycle: build the proxy from config, serve it, drain it on SIGTERM/SIGINT.

Shutdown: ``/readyz`` turns 503, the listener stops accepting, idle client connections are
closed, requests in flight (streams included) get ``shutdown.grace_s`` to finish, and whatever
is left is cut. The process then exits 0. A second signal cuts the grace period short.

Run as one of several workers (:mod:`lb.workers`), the same app binds the client listener with
``SO_REUSEPORT`` next to its siblings and, instead of the public admin listener, a private one
on an ephemeral loopback port that the supervisor reaches through :class:`WorkerLink`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import gc
import logging
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import TextIO, cast

from aiohttp import web

from lb import native
from lb.access_log import AccessLogger
from lb.admin import make_admin_app
from lb.build import (
    build_pools,
    build_router,
    configured_models,
    forwarding_settings,
    listener_limits,
    restore_backends,
    retire_pools,
    save_backends,
)
from lb.config import Config, ConfigError, admin_token, host_port, load_config
from lb.downstream import ClientConnection
from lb.health import HealthChecker
from lb.load_report import LoadReporter
from lb.logs import reload_level, setup_logging
from lb.metrics import ProxyCollector, ReloadStats, make_registry
from lb.mirror import Mirrors
from lb.models_endpoint import ModelsEndpoint
from lb.pool import Pool
from lb.proxy import Proxy
from lb.worker_link import AtomicLines, LinkError, WorkerLink, tag_log_lines

log = logging.getLogger("lb")

# When the grace period ends: time for queued requests to be answered 503 before the cut.
QUEUE_ANSWER_S = 0.05

# Young-generation threshold: allocations between collections (CPython's default is 700).
GC_GEN0_THRESHOLD = 20_000


def check_listeners_unchanged(old: Config, new: Config, source: str) -> None:
    """Listeners cannot move on reload: raises :class:`ConfigError` if they would."""
    if old.listen != new.listen:
        raise ConfigError(source, "listen", "listeners cannot change on reload; restart instead")
    # The admin token is read at each call: a new one applies, the listener stays as it is.
    if old.admin.model_copy(update={"token": None}) != new.admin.model_copy(update={"token": None}):
        raise ConfigError(source, "admin", "listeners cannot change on reload; restart instead")


async def _bind_named(key: str, host: str, port: int, binding: Awaitable[None]) -> None:
    """Await ``binding``; an ``OSError`` it raises names the listener (``key``) and address."""
    try:
        await binding
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise OSError(exc.errno, f"{key} {host_port(host, port)}: {reason}") from None


def _served_pools(proxy: Proxy) -> dict[str, Pool]:
    """The pools that answer clients, in file order: the ones GET /v1/models speaks for (a
    pool no route reaches, or only a mirror's shadow, would list models that then 404)."""
    reached = proxy.router.pools_reached()
    return {name: pool for name, pool in proxy.pools.items() if name in reached}


class App:
    """A running proxy: the data-plane listener, the admin listener and their state.

    With ``link`` it is one of several workers: see the module docstring.
    """

    def __init__(
        self, config: Config, source: str = "<config>", link: WorkerLink | None = None
    ) -> None:
        self.config = config
        self.source = source
        self.link = link
        self.proxy: Proxy | None = None
        self.port = 0
        self.admin_port = 0
        self._server: asyncio.AbstractServer | None = None
        self._admin: web.AppRunner | None = None
        self.health_checkers: dict[str, HealthChecker] = {}
        self.load_reporters: dict[str, LoadReporter] = {}
        self.reloads = ReloadStats(last_success_epoch_s=time.time())
        self.last_reload_error: str | None = None  # why the last refused reload was refused
        self.started_epoch_s = time.time()
        self._stopping = False
        self._stopped = asyncio.Event()
        self._grace_cut = asyncio.Event()

    async def start(self) -> None:
        """Bind both listeners; raises ``OSError`` if a port cannot be bound (and, for a
        worker, :class:`LinkError` if the supervisor goes away during start-up)."""
        config = self.config
        pools = build_pools(config, self.source)
        limits = listener_limits(config)
        access_log = AccessLogger(
            enabled=config.access_log.enabled,
            sample_rate=config.access_log.sample_rate,
            # AtomicLines is a text stream, though not typing.TextIO's every method.
            stream=cast(TextIO, AtomicLines(sys.stdout.fileno())) if self.link else None,
        )
        proxy = Proxy(
            build_router(config, pools), pools, limits, forwarding_settings(config), access_log
        )
        self.proxy = proxy
        self._install_inference_features(config)
        self._start_health_checks(config, pools)
        link = self.link
        if link is None:
            await _bind_named("listen", config.listen.host, config.listen.port, self._listen(False))
            if config.admin.enabled:
                host, port = config.admin.host, config.admin.port
                await _bind_named("admin", host, port, self._start_admin(host, port))
            log.info(
                "proxy listening on http://%s, admin on %s; data plane: %s",
                host_port(config.listen.host, self.port),
                f"http://{host_port(config.admin.host, self.admin_port)}"
                if config.admin.enabled
                else "(disabled)",
                native.build_in_use,
            )
            return
        # A worker: private admin first, so that the supervisor can replay runtime changes
        # (drains, weights) into it before the first client connection reaches this process.
        await self._start_admin("127.0.0.1", 0)
        await link.report_admin(self.admin_port)
        await link.wait_serve()
        await _bind_named("listen", config.listen.host, config.listen.port, self._listen(True))

    async def report_serving(self) -> None:
        """A worker tells the supervisor it serves: only once its signal handlers are in
        place, since the supervisor passes SIGHUP on to every serving worker."""
        link = self.link
        if link is None:
            return
        await link.report_serving()
        log.info(
            "worker %d listening on http://%s, private admin on http://127.0.0.1:%d",
            link.index,
            host_port(self.config.listen.host, self.port),
            self.admin_port,
        )

    async def _listen(self, reuse_port: bool) -> None:
        proxy = self.proxy
        assert proxy is not None
        limits = proxy.limits
        config = self.config
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            functools.partial(ClientConnection, proxy, limits),  # no interpreted frame per accept
            config.listen.host,
            config.listen.port,
            backlog=4096,
            reuse_address=True,
            reuse_port=reuse_port or None,
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def _start_admin(self, host: str, port: int) -> None:
        proxy = self.proxy
        assert proxy is not None
        registry = make_registry(
            ProxyCollector(
                lambda: proxy.pools,
                lambda: len(proxy.connections),
                health=lambda: self.health_checkers,
                load_reports=lambda: self.load_reporters,
                reloads=lambda: self.reloads,
                mirror_skipped=lambda: proxy.mirrors.skipped if proxy.mirrors else {},
                route_responses=lambda: proxy.route_responses,
                error_responses=lambda: proxy.error_responses,
            )
        )
        self._admin = web.AppRunner(
            make_admin_app(registry, lambda: not proxy.draining, self), access_log=None
        )
        await self._admin.setup()
        site = web.TCPSite(self._admin, host, port)
        await site.start()
        self.admin_port = port or int(self._admin.addresses[0][1])

    def _install_inference_features(self, config: Config) -> None:
        """GET /v1/models answered by the proxy (the union of its pools' models); mirroring."""
        proxy = self.proxy
        assert proxy is not None
        configured = configured_models(config)
        if proxy.models is None:
            proxy.models = ModelsEndpoint(configured, lambda: _served_pools(proxy))
        else:
            proxy.models.configured = configured
        if proxy.mirrors is None and any(r.mirror is not None for r in config.routes):
            proxy.mirrors = Mirrors()

    def admin_token(self) -> str | None:
        """The bearer token admin calls that change something must carry (None: open)."""
        return admin_token(self.config)

    def _start_health_checks(
        self,
        config: Config,
        pools: dict[str, Pool],
        previous: dict[str, HealthChecker] | None = None,
        previous_reports: dict[str, LoadReporter] | None = None,
    ) -> None:
        for pc in config.pools:
            pool = pools[pc.name]
            prev = previous.get(pc.name) if previous else None
            checker = HealthChecker(pool.name, pool.backends, pc.health_check, pool, previous=prev)
            checker.start()
            self.health_checkers[pool.name] = checker
            if pc.load_report.enabled:
                prev_reporter = (previous_reports or {}).get(pc.name)
                reporter = LoadReporter(
                    pool.name, pool.backends, pc.load_report, previous=prev_reporter
                )
                reporter.start()
                self.load_reporters[pool.name] = reporter

    async def reload(self) -> bool:
        """Re-read the config file and swap pools, routes and strategies atomically.

        Requests in flight finish where they are; backends that stay keep their state. An
        invalid file changes nothing: the reason is logged and ``False`` returned.
        """
        proxy = self.proxy
        assert proxy is not None
        saved = save_backends(proxy.pools)
        built: dict[str, Pool] = {}
        try:
            config = load_config(self.source)
            check_listeners_unchanged(self.config, config, self.source)
            pools = built = build_pools(config, self.source, previous=proxy.pools)
            router = build_router(config, pools)
        except ConfigError as exc:
            # Nothing of the refused file may stay: the backends the running pools share
            # get their state back, and pools built for it stop.
            for pool in built.values():
                pool.retire(keep={b for b, _ in saved})
            restore_backends(saved)
            self.reloads.failed += 1
            self.last_reload_error = str(exc)
            for line in str(exc).splitlines():
                log.error("reload refused, keeping the running config: %s", line,
                          extra={"event": "reload_refused", "source": self.source})  # fmt: skip
            return False
        old_pools, old_checkers = proxy.pools, self.health_checkers
        old_reporters = self.load_reporters
        proxy.swap(router, pools)
        upstream = config.upstream
        for pool in pools.values():
            for connections in pool.upstreams.values():  # kept ones too: the new bounds apply
                connections.resize(upstream.max_idle_per_backend, upstream.idle_timeout_s)
        reload_level(config.log_level)
        if config.log_format != self.config.log_format:
            log.warning(
                "log_format changes on restart; the running proxy keeps %s", self.config.log_format
            )
        proxy.settings = forwarding_settings(config)
        self._install_inference_features(config)
        proxy.access_log.enabled = config.access_log.enabled
        proxy.access_log.sample_rate = config.access_log.sample_rate
        new_limits = listener_limits(config)
        for field in dataclasses.fields(new_limits):
            setattr(proxy.limits, field.name, getattr(new_limits, field.name))
        retire_pools(old_pools, pools)
        self.health_checkers = {}
        self.load_reporters = {}
        self._start_health_checks(config, pools, old_checkers, old_reporters)
        self.config = config
        self.reloads.succeeded += 1
        self.reloads.last_success_epoch_s = time.time()
        for checker in old_checkers.values():
            await checker.stop()
        for reporter in old_reporters.values():
            await reporter.stop()
        backends = sum(len(p.backends) for p in pools.values())
        log.info(
            "config reloaded from %s: %d pools, %d backends",
            self.source,
            len(pools),
            backends,
            extra={
                "event": "reloaded",
                "source": self.source,
                "pools": len(pools),
                "backends": backends,
            },
        )
        return True

    async def shutdown(self) -> None:
        """Drain and stop; safe to call more than once (a second call cuts the grace period)."""
        if self._stopping:
            self._grace_cut.set()
            await self._stopped.wait()
            return
        self._stopping = True
        proxy = self.proxy
        assert proxy is not None
        proxy.draining = True
        if self._server is not None:
            self._server.close()
        for conn in list(proxy.connections):
            conn.close_if_idle()
        grace_s = self.config.shutdown.grace_s
        log.info("draining: %d requests in flight, grace %gs", proxy.active_requests, grace_s)
        if proxy.active_requests:
            waiters = [
                asyncio.ensure_future(proxy.idle.wait()),
                asyncio.ensure_future(self._grace_cut.wait()),
            ]
            await asyncio.wait(waiters, timeout=grace_s, return_when=asyncio.FIRST_COMPLETED)
            for waiter in waiters:
                waiter.cancel()
        if proxy.active_requests:
            queued = 0
            for pool in proxy.pools.values():
                if pool.queue is not None:
                    queued += len(pool.queue)
                    pool.queue.close()
            if queued:  # they never reached a backend: a 503 each, written before the cut
                await asyncio.sleep(QUEUE_ANSWER_S)
        if proxy.active_requests:
            log.warning("grace period over: cutting %d requests", proxy.active_requests)
        for conn in list(proxy.connections):
            conn.abort()
        proxy.access_log.flush()
        await self.release()
        log.info("stopped")
        self._stopped.set()

    async def release(self) -> None:
        """Stop the background work and close what the app opened (also after a failed
        start): probes, scrapes, sessions, pooled connections, the admin listener."""
        proxy = self.proxy
        if proxy is not None and proxy.models is not None:
            await proxy.models.close()
        if proxy is not None and proxy.mirrors is not None:
            await proxy.mirrors.close()
        for checker in self.health_checkers.values():
            await checker.stop()
        for reporter in self.load_reporters.values():
            await reporter.stop()
        for pool in proxy.pools.values() if proxy is not None else ():
            pool.close()
        if self._server is not None:
            self._server.close()
        if self._admin is not None:
            await self._admin.cleanup()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()


async def serve(config: Config, source: str, link: WorkerLink | None = None) -> int:
    """Run until SIGTERM or SIGINT (or, for a worker, until the supervisor is gone), then
    drain; returns the exit code."""
    app = App(config, source, link)
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[object]] = set()
    # Signals are handled from the start; one that arrives while the app is still starting
    # takes effect once it has started (a SIGHUP then must not kill the process).
    started = False
    pending: list[Callable[[], Coroutine[object, object, object]]] = []

    def act(action: Callable[[], Coroutine[object, object, object]]) -> None:
        if not started:
            pending.append(action)
            return
        task = loop.create_task(action())
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    def on_signal(signum: int) -> None:
        log.info("received %s", signal.Signals(signum).name)
        act(app.shutdown)

    def on_hangup() -> None:
        log.info("received SIGHUP: reloading %s", source)
        act(app.reload)

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    try:
        if link is not None:
            await link.open()
        await app.start()
        # Everything built so far lives as long as the process: move it out of the
        # collector's sight, so a full collection walks only per-request garbage (otherwise
        # each one stalls the event loop for tens of milliseconds), and collect the young
        # generation less often.
        gc.collect()
        gc.freeze()
        gc.set_threshold(GC_GEN0_THRESHOLD, 20, 100)
        await app.report_serving()
    except OSError as exc:
        log.error("cannot listen: %s", exc)
        await app.release()
        return 1
    except LinkError as exc:
        log.error("supervisor gone during start-up: %s", exc)
        return 1
    started = True
    for action in pending:
        act(action)
    if link is not None:

        def on_supervisor_gone() -> None:
            # Only when not stopping already: a second shutdown would cut the grace period.
            if app.proxy is not None and not app.proxy.draining:
                log.warning("supervisor gone: draining and exiting")
                act(app.shutdown)

        link.watch(on_supervisor_gone)
    await app.wait_stopped()
    if link is not None:
        link.close()
    return 0


def run(
    config: Config, source: str, link: WorkerLink | None = None, *, level_pinned: bool = False
) -> int:
    """Entry point used by the CLI: the event loop is uvloop's when it is installed.

    ``link`` makes this process one worker of several (see :mod:`lb.workers`);
    ``level_pinned``: the command line set the log level, which reloads then keep.
    """
    setup_logging(config.log_level, config.log_format, pinned=level_pinned)
    if link is not None:
        tag_log_lines(link.index, config.log_format)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a declared dependency
        return asyncio.run(serve(config, source, link))
    return int(uvloop.run(serve(config, source, link)))
