"""The request handler: route a request to a pool, pick a backend, run the attempt, map errors.

Each client request runs as one task. Attempts are guarded by :class:`lb.load.Attempt`, so the
in-flight count is released exactly once on every path. A request whose pooled connection turns
out dead before any response byte is replayed on a fresh connection; a backend that cannot be
connected to is skipped for another (the request never reached it). Every failure the client
sees is a JSON error from :mod:`lb.errors`; after a response has started, the client's
connection is cut instead, so a truncated body is visible as such.
"""

from __future__ import annotations

import asyncio
import logging
import time

from lb.backend import Backend
from lb.downstream import ClientConnection, IncomingRequest, ListenerLimits
from lb.errors import NoBackendAvailable, ProxyError, UpstreamUnreachable
from lb.exchange import Exchange
from lb.forwarding import ForwardingSettings, new_request_id, request_head
from lb.load import Attempt
from lb.pool import Pool
from lb.router import Router
from lb.strategies import RequestInfo

log = logging.getLogger("lb.proxy")

# Backends tried for one request when earlier ones could not be connected to.
MAX_CONNECT_ATTEMPTS = 3


class Proxy:
    """Holds the live routing state; :meth:`handle` answers one request."""

    def __init__(
        self, router: Router, pools: dict[str, Pool], limits: ListenerLimits,
        settings: ForwardingSettings,
    ) -> None:  # fmt: skip
        self.router = router
        self.pools = pools
        self.limits = limits
        self.settings = settings
        self.draining = False
        self.connections: set[ClientConnection] = set()
        self.active_requests = 0
        self.idle = asyncio.Event()  # set while draining once no request is in flight

    def swap(self, router: Router, pools: dict[str, Pool]) -> None:
        """Install a new routing table; requests in flight finish on the old one."""
        self.router = router
        self.pools = pools

    async def handle(self, client: ClientConnection, req: IncomingRequest) -> None:
        """Answer ``req`` on ``client``; never raises except for cancellation."""
        started = time.monotonic()
        pool: Pool | None = None
        self.active_requests += 1
        if req.request_id is None:
            req.request_id = new_request_id()
        try:
            pool = self.router.match(req)
            await self._forward(client, req, pool)
        except ProxyError as err:
            if pool is not None and err.pool is None:
                err.pool = pool.name
            client.answer_error(req, err)
            if pool is not None:
                pool.stats.responses_by_class[err.status // 100] += 1
                pool = None  # counted
        except asyncio.CancelledError:
            if pool is not None:
                pool.stats.client_disconnects += 1
                pool.stats.responses_by_class[0] += 1
                pool = None
            raise
        except Exception:
            log.exception("unexpected error while proxying request %s", req.request_id)
            client.answer_error(req, ProxyError("internal proxy error"))
        finally:
            self.active_requests -= 1
            if not self.active_requests and self.draining:
                self.idle.set()
            if pool is not None:
                pool.stats.duration.observe(time.monotonic() - started)
            client.request_done(req)

    async def _forward(self, client: ClientConnection, req: IncomingRequest, pool: Pool) -> None:
        info = RequestInfo(method=req.method.decode(), path=req.path.decode(errors="replace"))
        tried: list[Backend] = []
        last_error: ProxyError | None = None
        while len(tried) < MAX_CONNECT_ATTEMPTS:
            candidates = pool.candidates(tried)
            if not candidates:
                break
            backend = (
                candidates[0] if len(candidates) == 1 else pool.strategy.pick(candidates, info)
            )
            tried.append(backend)
            error = await self._attempt(client, req, pool, backend)
            if error is None:
                pool.stats.responses_by_class[min(req.status // 100, 5)] += 1
                return
            if isinstance(error, UpstreamUnreachable) and req.body.can_replay:
                last_error = error
                continue
            raise error
        if last_error is not None:
            raise last_error
        raise NoBackendAvailable(f"no healthy backend in pool {pool.name}")

    async def _attempt(
        self, client: ClientConnection, req: IncomingRequest, pool: Pool, backend: Backend
    ) -> ProxyError | None:
        """One attempt on ``backend``; returns the error that ended it, or ``None``."""
        upstreams = pool.upstreams[backend]
        timeouts = pool.timeouts
        with Attempt(backend, decay_s=pool.rtt_decay_s) as attempt:
            conn = upstreams.take_idle()
            while True:
                if conn is None:
                    try:
                        conn = await upstreams.connect(timeouts.connect_s)
                    except UpstreamUnreachable as err:
                        err.pool = pool.name
                        attempt.finish(failed=True)
                        return err
                exchange = Exchange(
                    client,
                    req,
                    conn,
                    attempt,
                    extra_headers=pool.backend_lines[backend] + self._request_id_line(req),
                    settings=self.settings,
                    headers_timeout_s=timeouts.response_headers_s,
                    idle_timeout_s=timeouts.idle_s,
                )
                exchange.start(self._head(client, req, backend))
                try:
                    error = await exchange.done
                finally:
                    exchange.close()
                if error is not None and exchange.stale and req.body.can_replay:
                    conn = None  # the pooled connection was dead: replay on a fresh one
                    continue
                if error is not None:
                    error.pool = pool.name
                attempt.finish(failed=error is not None)
                return error

    def _head(self, client: ClientConnection, req: IncomingRequest, backend: Backend) -> bytes:
        assert req.request_id is not None
        return request_head(
            req.method,
            req.url,
            req.headers,
            host=req.host,
            default_host=b"%s:%d" % (backend.host.encode(), backend.port),
            client_ip=client.peer_ip,
            request_id=req.request_id,
            content_length=req.content_length,
            chunked=req.chunked,
            settings=self.settings,
        )

    def _request_id_line(self, req: IncomingRequest) -> bytes:
        assert req.request_id is not None
        return b"%s: %s\r\n" % (self.settings.request_id_header, req.request_id)
