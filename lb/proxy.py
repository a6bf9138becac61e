"""The request handler: route a request to a pool, pick a backend, run the attempt, map errors.

Each client request runs in its connection's task (lb.downstream). Attempts are guarded by
:class:`lb.load.Attempt`, so the in-flight count is released exactly once on every path. A
request whose pooled connection turns out dead before any response byte is replayed on a fresh
connection; a backend that cannot be connected to is skipped for another (the request never
reached it). Every failure the client sees is a JSON error from :mod:`lb.errors`; after a
response has started, the client's connection is cut instead, so a truncated body is visible
as such.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Sequence
from typing import Final

from lb.access_log import AccessLogger
from lb.backend import Backend
from lb.downstream import ClientConnection
from lb.errors import (
    BadRequest,
    BodyTooLarge,
    ModelMissing,
    NoBackendAvailable,
    ProxyError,
    RequestTimeout,
    UpstreamError,
    UpstreamStatus,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from lb.exchange import Exchange
from lb.forwarding import ForwardingSettings, new_request_id, request_head
from lb.inference import model_in
from lb.load import Attempt
from lb.mirror import Mirrors
from lb.models_endpoint import ModelsEndpoint
from lb.openai_body import parse_body
from lb.pool import Pool
from lb.request import IncomingRequest, ListenerLimits
from lb.retry import RetryPolicy, retry_reason
from lb.router import Route, Router
from lb.stats import Decision, ErrorRecord
from lb.strategies import RequestInfo
from lb.timers import TimerWheel

log = logging.getLogger("lb.proxy")
# Decision texts formatted and kept (lb.proxy.Proxy._decision); past this many the table restarts.
MAX_DECISION_TEXTS = 1024

NO_STATUSES: Final[frozenset[int]] = frozenset()
# Methods sending twice is harmless for (RFC 9110 section 9.2.2).
IDEMPOTENT: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})


class Proxy:
    """Holds the live routing state; :meth:`handle` answers one request."""

    def __init__(
        self, router: Router, pools: dict[str, Pool], limits: ListenerLimits,
        settings: ForwardingSettings, access_log: AccessLogger | None = None,
    ) -> None:  # fmt: skip
        self.router = router
        self.pools = pools
        self.limits = limits
        self.settings = settings
        self.access_log = access_log or AccessLogger(enabled=False)
        self.draining = False
        self.connections: set[ClientConnection] = set()
        self.timers = TimerWheel(asyncio.get_running_loop())  # the connections' deadlines
        self.active_requests = 0
        self.rng = random.Random()
        self.models: ModelsEndpoint | None = None  # answers GET /v1/models when configured
        self.mirrors: Mirrors | None = None
        self.idle = asyncio.Event()  # set while draining once no request is in flight
        # Responses by route name and status class; kept across reloads (counters only grow).
        self.route_responses: dict[str, list[int]] = {}
        # Error answers the proxy made itself, by (status, type): a bounded set of pairs.
        self.error_responses: dict[tuple[int, str], int] = {}
        # (header, strategy, why) -> ("strategy: why", its header line); see _pick.
        self._decisions: dict[tuple[bytes, str, str], tuple[str, bytes]] = {}

    def swap(self, router: Router, pools: dict[str, Pool]) -> None:
        """Install a new routing table; requests in flight finish on the old one."""
        self.router = router
        self.pools = pools

    async def handle(self, client: ClientConnection, req: IncomingRequest) -> None:
        """Answer ``req`` on ``client``; never raises except for cancellation."""
        pool: Pool | None = None
        info: RequestInfo | None = None
        outcome = "ok"
        self.active_requests += 1
        if req.request_id is None:
            req.request_id = new_request_id()
        try:
            if self.router.any_auth:
                self.router.authorize_early(req)  # before any body is read or answer made
            models = self.models
            if models is not None and req.url.startswith(b"/v1/models") and models.answers(req):
                await models.answer(client, req)
                return
            # Routing, inline: the body is awaited only when routing needs what it says.
            info = RequestInfo(
                method=req.method.decode(),
                path=req.path.decode(errors="replace"),
                # A copy the strategy cannot change: the fields forwarded are the request's
                # own, whose lower-cased names were noted as they were parsed.
                headers=tuple(req.headers),
            )
            has_body = req.chunked or bool(req.content_length)
            router = self.router
            # Why the body names no usable model, when model routes needed it to.
            unusable: ProxyError | None = None
            read = False  # the body was read for its fields (once is enough, whatever it said)
            if has_body and router.needs_model(req):
                unusable = await self._read_body_fields(req, info, strict=True)
                read = True
            try:
                route = router.match(req, info.model)
            except ModelMissing as missing:
                # Only when no other route takes it (a non-JSON upload to a catch-all pool
                # goes there): the body's own problem is the answer.
                raise missing if unusable is None else unusable from None
            req.route = route.name
            pool = route.choose_pool(self.rng)
            if has_body and not read and pool.strategy.needs_body:
                await self._read_body_fields(req, info, strict=False)
            if route.auth is not None:
                route.auth.check(req)
            if route.mirror is not None and self.mirrors is not None:
                self.mirrors.maybe_mirror(route, req, info)
            pool.budget.requests += 1
            try:
                await self._forward(client, req, route, pool, info)
            finally:
                pool.budget.requests -= 1
        except ProxyError as err:
            if pool is not None and err.pool is None:
                err.pool = pool.name
            outcome = err.type
            if pool is not None and not isinstance(err, UpstreamError):
                self._record_error(pool, req, None, err)  # upstream ones were, per attempt
            client.answer_error(req, err)
        except asyncio.CancelledError:
            outcome = "client_gone"
            if pool is not None:
                pool.stats.client_disconnects += 1
            raise
        except Exception:
            outcome = "internal_error"
            log.exception("unexpected error while proxying request %s", req.request_id)
            client.answer_error(req, ProxyError("internal proxy error"))
        finally:
            self.active_requests -= 1
            if not self.active_requests and self.draining:
                self.idle.set()
            duration_s = time.monotonic() - req.started_s
            code_class = min(req.status // 100, 5)
            route_name = req.route
            if route_name is not None:
                by_route = self.route_responses.get(route_name)
                if by_route is None:
                    by_route = self.route_responses[route_name] = [0] * 6
                by_route[code_class] += 1
            if pool is not None:
                stats = pool.stats
                stats.inference.count_model(
                    self._model_of(req, info), served=200 <= req.status < 300
                )
                stats.responses_by_class[code_class] += 1
                stats.duration.observe(duration_s)
                if req.ttfb_s >= 0.0:
                    stats.ttfb.observe(req.ttfb_s)
            if self.access_log.wants(req.status):
                self._log_access(req, pool, outcome, duration_s)
            client.request_done(req)

    def error_answered(self, req: IncomingRequest | None, err: ProxyError, log_line: bool) -> None:
        """Count an error answer; ``log_line``: it was made for input no handler saw
        (malformed, a head or body over the limits), so it gets its access-log line here."""
        key = (err.status, err.type)
        self.error_responses[key] = self.error_responses.get(key, 0) + 1
        if not log_line or not self.access_log.wants(err.status):
            return
        if req is None:
            self.access_log.log_request(
                "", "", "", None, None, None, err.status, 0, 0, 0, 0.0, 0.0, err.type
            )
        else:
            self._log_access(req, None, err.type, time.monotonic() - req.started_s)

    @staticmethod
    def _model_of(req: IncomingRequest, info: RequestInfo | None) -> str | None:
        """The model the request named: parsed already, or found in the body it held."""
        if info is not None and info.model is not None:
            return info.model
        body = req.body
        model = model_in(body.head(4096))
        if model is None and body.size > 4096 and body.replayable:
            model = model_in(body.held())  # SDKs write the messages before the model
        return model

    def _log_access(
        self, req: IncomingRequest, pool: Pool | None, outcome: str, duration_s: float
    ) -> None:
        self.access_log.log_request(
            (req.request_id or b"").decode("latin-1"),
            req.method.decode("latin-1"),
            req.path.decode("latin-1"),
            req.route,
            pool.name if pool is not None else None,
            req.backend_name,
            req.status,
            req.attempts,
            req.body.size,
            req.bytes_out,
            req.ttfb_s,
            duration_s,
            outcome,
        )

    @staticmethod
    def _record_error(
        pool: Pool, req: IncomingRequest, backend: Backend | None, err: ProxyError
    ) -> None:
        pool.stats.recent_errors.append(
            ErrorRecord(
                time=time.time(),
                request_id=(req.request_id or b"").decode("latin-1"),
                backend=backend.name if backend is not None else None,
                status=err.status,
                type=err.type,
                message=err.message,
            )
        )

    async def _read_body_fields(
        self, req: IncomingRequest, info: RequestInfo, *, strict: bool
    ) -> ProxyError | None:
        """Fill ``info`` from the JSON body; returns why it gives no usable model, if so.

        ``strict``: the body must be read (model routes need it), so one too large to read is
        a 413. Otherwise the body is only a hint for the strategy: one too large goes unread.
        """
        try:
            data = await req.body.collect(self.limits.max_inspect_bytes)
        except BodyTooLarge as too_large:
            # Model routes cannot read it, but a later route that names no model may take it
            # (a large audio upload to a catch-all pool): the 413 is the answer only if not.
            return too_large if strict else None
        try:
            fields = parse_body(data)
        except ValueError as exc:
            return BadRequest(f"{exc}; this route needs the request's model")
        info.model = fields.model
        info.user = fields.user
        info.prompt = fields.prompt
        problem = fields.model_problem
        return None if problem is None else ModelMissing(problem)

    async def _forward(
        self,
        client: ClientConnection,
        req: IncomingRequest,
        route: Route,
        pool: Pool,
        info: RequestInfo,
    ) -> None:
        """Attempts until one answers, retrying what the route's policy allows."""
        policy = route.retry_policy(pool)
        loop = client.loop  # not asyncio.get_running_loop(): on Python 3.11 that costs a getpid()
        deadline = loop.time() + policy.deadline_s if policy.deadline_s is not None else None
        tried: list[Backend] = []
        retries = 0
        while True:
            if pool.retired:
                # A reload replaced the pool while the request waited or was being tried:
                # go on in its successor, where removed backends are no longer candidates.
                pool = pool.current()
            backend = self._choose_now(req, pool, tried, info)
            if backend is None:
                backend = await self._choose_queued(req, pool, tried, info, deadline)
                if backend is None:
                    continue  # the pool was replaced while the request queued
            if deadline is not None and loop.time() >= deadline:
                raise UpstreamTimeout(
                    f"no try could start within deadline_s ({policy.deadline_s:g}s)",
                    pool=pool.name,
                )
            tried.append(backend)
            # A retried status is read and dropped, so it is only swallowed when a retry is
            # sure to be allowed, the body included; other failures are judged once they happen.
            swallow = (
                retries < policy.max_retries
                and self._replayable_after_sending(req, policy)
                and pool.budget.allows(policy)
            )
            if retries:
                pool.budget.retries += 1
            statuses = policy.statuses if swallow else NO_STATUSES
            try:
                error = await self._attempt(client, req, pool, backend, policy, statuses, deadline)
            finally:
                if retries:
                    pool.budget.retries -= 1
            if error is None:
                return
            if isinstance(error, UpstreamStatus):
                # Swallowed on the promise of a retry; a body of unknown length may still have
                # outgrown what is kept, and then the proxy's own error says the status.
                retryable = self._replayable(req, policy)
            else:
                retryable = (
                    policy.retries_error(error)
                    and retries < policy.max_retries
                    and self._replayable(req, policy)
                    and pool.budget.allows(policy)
                )
            if req.response_started or not retryable:
                raise error
            if deadline is not None and loop.time() >= deadline:
                raise error
            hold_s = 0.0
            if isinstance(error, UpstreamStatus) and error.retry_after_s is not None:
                hold_s = min(error.retry_after_s, policy.retry_after_max_s)
                pool.hold(backend, hold_s)
                if not pool.eligible and hold_s > policy.backoff_max_s:
                    # Every backend is held or out: the client gets the answer and its
                    # Retry-After now, and waits itself, rather than inside the proxy.
                    raise error
            retries += 1
            pool.stats.count_retry(retry_reason(error))
            delay = policy.backoff_s(retries, self.rng)
            if hold_s and not pool.eligible:
                delay = max(delay, hold_s)  # a short hold, and nowhere else to go: wait it out
            if deadline is not None:
                delay = min(delay, max(deadline - loop.time(), 0.0))
            if delay > 0:
                await asyncio.sleep(delay)

    @staticmethod
    def _untried_left(pool: Pool, tried: list[Backend]) -> bool:
        """True if an eligible backend has not been tried for the request (it may be full)."""
        for backend in pool.eligible:
            if backend not in tried:
                return True
        return False

    @staticmethod
    def _may_resend(policy: RetryPolicy) -> bool:
        """Whether the route lets a request the backend may have read be sent again: it
        retries resets. A pooled connection that dies right after the request went out may
        be one the backend closed as idle, or a backend that read the request and crashed;
        only a request that is idempotent, or a policy that allows it, is replayed then."""
        return policy.max_retries > 0 and "reset" in policy.conditions

    @staticmethod
    def _replayable(req: IncomingRequest, policy: RetryPolicy) -> bool:
        """True if the request body can be sent again under ``policy``."""
        body = req.body
        return body.can_replay and (not body.sent_any or body.size <= policy.replay_max_bytes)

    @staticmethod
    def _replayable_after_sending(req: IncomingRequest, policy: RetryPolicy) -> bool:
        """True unless the body, once an attempt sends it, is known not to be kept for
        another: longer than ``replay_max_bytes`` or than the proxy holds. A chunked body
        still arriving is judged again once it has been sent."""
        body = req.body
        if not body.can_replay:
            return False
        size = req.content_length
        if size is None and body.complete:
            size = body.size
        return size is None or (size <= policy.replay_max_bytes and size <= body.replay_bytes)

    def _choose_now(
        self, req: IncomingRequest, pool: Pool, tried: list[Backend], info: RequestInfo
    ) -> Backend | None:
        """A backend for the next attempt, if one can be had without waiting: an untried one
        if any, else any eligible one. ``None`` when the request must queue (or fail)."""
        candidates = pool.candidates(tried)
        queue = pool.queue
        if not candidates and tried:
            if (
                queue is not None
                and len(queue.waiters) < queue.max_queue
                and self._untried_left(pool, tried)
            ):
                return None  # an untried backend is only full: queue for it, if there is room
            candidates = pool.candidates(())  # every backend was tried: retry on any
        # First come, first served: a newcomer queues behind requests already waiting.
        if candidates and (queue is None or tried or not queue.waiters):
            return self._pick(req, pool, candidates, tried, info)
        return None

    async def _choose_queued(
        self,
        req: IncomingRequest,
        pool: Pool,
        tried: list[Backend],
        info: RequestInfo,
        deadline: float | None = None,
    ) -> Backend | None:
        """Wait in the pool's queue until an eligible backend has room, then pick it; None
        when a reload replaced the pool meanwhile."""
        queue = pool.queue
        woken = False
        while True:
            if pool.retired and pool.current() is not pool:
                return None
            if queue is None or not pool.eligible:
                raise NoBackendAvailable(
                    f"no available backend in pool {pool.name}", retry_after_s=pool.held_for_s()
                )
            # Woken but beaten to the slot: first in line again. The request's deadline, if
            # sooner, bounds the wait.
            left_s = None
            if deadline is not None:
                left_s = max(deadline - asyncio.get_running_loop().time(), 0.0)
            await queue.wait(front=woken, timeout_s=left_s)
            woken = True
            candidates = pool.candidates(tried)
            if not candidates and tried:
                # The slot that woke it is on a backend it tried: it takes it rather than wait
                # on (a turn passed on could go round the waiters for ever).
                candidates = pool.candidates(())
            if candidates:
                return self._pick(req, pool, candidates, tried, info)

    def _pick(
        self,
        req: IncomingRequest,
        pool: Pool,
        candidates: Sequence[Backend],
        tried: list[Backend],
        info: RequestInfo,
    ) -> Backend:
        """Ask the pool's strategy; record why when decisions are reported."""
        strategy = pool.strategy
        # One candidate needs no choice, but a strategy that learns from the requests it
        # places (a prefix tree) is still told about it.
        only = len(candidates) == 1 and not strategy.needs_body
        backend = candidates[0] if only else strategy.pick(candidates, info)
        decision_header = self.settings.decision_header
        if decision_header is not None:
            why = "only candidate" if only else strategy.explain(backend, info)
            # Strategies give a few distinct reasons over and over: each is formatted once
            # (per header name: a reload may rename the header).
            known = self._decisions.get((decision_header, strategy.name, why))
            if known is None:
                known = self._decision(decision_header, strategy.name, why)
            reason, req.decision = known
            # tuple.__new__: a NamedTuple's own __new__ is a Python function, run per request.
            pool.stats.decisions.append(
                tuple.__new__(Decision, (time.time(), req.request_id or b"", backend.name, reason))
            )
        shadow = pool.shadow_strategy
        if shadow is not None and not tried:
            pool.stats.count_shadow(shadow.pick(candidates, info) is backend)
        return backend

    async def _attempt(
        self,
        client: ClientConnection,
        req: IncomingRequest,
        pool: Pool,
        backend: Backend,
        policy: RetryPolicy,
        retry_statuses: frozenset[int],
        deadline: float | None = None,
    ) -> ProxyError | None:
        """One attempt on ``backend``; returns the error that ended it, or ``None``.
        ``deadline`` (loop time): the request's; the wait for response headers ends there."""
        req.attempts += 1
        req.backend_name = backend.name
        upstreams = pool.upstreams[backend]
        timeouts = pool.timeouts
        headers_timeout_s = policy.per_try_timeout_s or timeouts.response_headers_s
        connect_s = timeouts.connect_s
        cut_by_deadline = False  # the request's deadline, not a timeout of the try, ends it
        if deadline is not None:
            left_s = max(deadline - client.loop.time(), 0.001)
            connect_s = min(connect_s, left_s)
            if headers_timeout_s is None or left_s < headers_timeout_s:
                headers_timeout_s = left_s
                cut_by_deadline = True
        attempt = Attempt(backend, decay_s=pool.rtt_decay_s)
        error: ProxyError | None = None
        status = 0
        try:
            conn = upstreams.take_idle()
            while True:
                if conn is None:
                    try:
                        conn = await upstreams.connect(connect_s)
                    except UpstreamUnreachable as err:
                        error = err
                        break
                exchange = Exchange(
                    client,
                    req,
                    conn,
                    attempt,
                    extra_headers=pool.backend_lines[backend] + self._extra_lines(req),
                    settings=self.settings,
                    headers_timeout_s=headers_timeout_s,
                    idle_timeout_s=timeouts.idle_s,
                    retry_statuses=retry_statuses,
                    inference=pool.stats.inference,
                    pool_name=pool.name,
                )
                exchange.start(self._head(client, req, backend))
                try:
                    error = await exchange.done
                finally:
                    exchange.close()
                status = exchange.status
                if error is None and status >= 500:
                    self._passed_on_5xx(pool, req, backend, exchange, policy)
                if (
                    error is not None
                    and exchange.stale
                    and req.body.can_replay
                    and (req.method in IDEMPOTENT or self._may_resend(policy))
                ):
                    conn = None  # the pooled connection was dead: replay on a fresh one
                    continue
                break
            if isinstance(error, RequestTimeout):
                raise error  # the client stopped sending its body: nothing learnt of the backend
            if cut_by_deadline and isinstance(error, UpstreamTimeout):
                raise error  # the request's deadline ended the wait: nothing learnt either
        except BaseException:  # that, the client leaving, or a bug: the slot is freed unjudged
            attempt.finish(abandoned=True)
            pool.attempt_ended(backend, failed=False, observed=False)
            raise
        attempt.finish(failed=error is not None and not isinstance(error, UpstreamStatus))
        outliers = pool.outliers
        failed = (error is not None and not isinstance(error, UpstreamStatus)) or (
            outliers is not None and outliers.is_failure_status(status)
        )
        pool.attempt_ended(backend, failed=failed)
        if error is not None:
            error.pool = pool.name
            self._record_error(pool, req, backend, error)
        return error

    def _head(self, client: ClientConnection, req: IncomingRequest, backend: Backend) -> bytes:
        assert req.request_id is not None
        return request_head(
            req.method,
            req.url,
            req.headers,
            names=req.names,
            host=req.host,
            default_host=backend.authority,
            client_ip=client.peer_ip_bytes,
            request_id=req.request_id,
            content_length=req.content_length,
            chunked=req.chunked,
            settings=self.settings,
            connection_header=req.connection_header,
            upgrade=req.upgrade,
        )

    def _passed_on_5xx(
        self,
        pool: Pool,
        req: IncomingRequest,
        backend: Backend,
        exchange: Exchange,
        policy: RetryPolicy,
    ) -> None:
        """A backend's own 5xx, passed on to the client (no retry took it): listed with the
        proxy's errors, and a 503's Retry-After still holds the backend out. Not a 429's: it
        is often one tenant's quota, not the server's state (a retried 429 still holds it)."""
        status = exchange.status
        error = UpstreamStatus(f"backend answered {status}", status=status, retry_after_s=None)
        self._record_error(pool, req, backend, error)
        if status == 503:
            retry_after_s = exchange.retry_after_s()
            if retry_after_s is not None:
                pool.hold(backend, min(retry_after_s, policy.retry_after_max_s))

    def _decision(self, header: bytes, strategy: str, why: str) -> tuple[str, bytes]:
        """``strategy: why``, and the response header line saying it; kept for next time."""
        if len(self._decisions) >= MAX_DECISION_TEXTS:
            self._decisions.clear()  # reasons with ever-new numbers in them: start over
        reason = f"{strategy}: {why}"
        known = self._decisions[(header, strategy, why)] = (
            reason,
            b"%s: %s\r\n" % (header, reason.encode()),
        )
        return known

    def _extra_lines(self, req: IncomingRequest) -> bytes:
        """Response header lines the proxy adds: the request id, and why this backend."""
        assert req.request_id is not None
        settings = self.settings
        return b"".join((settings.request_id_header, b": ", req.request_id, b"\r\n", req.decision))
