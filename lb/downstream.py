"""The client side of the proxy: one protocol instance per client connection, parsed by llhttp.

It turns bytes into :class:`IncomingRequest` objects and hands each to the request handler, one
at a time and in order (pipelined requests wait, and reading pauses, while one is answered),
from one task per connection, which waits between keep-alive requests. It enforces the limits a
client cannot be trusted with: header size, time to send the headers, body size, idle keep-alive
time. Malformed input gets a 4xx JSON answer and the connection is closed; nothing a client
sends can raise out of this protocol.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import deque
from collections.abc import Coroutine
from typing import Any, Final, Protocol, cast

import httptools

from lb.body import RequestBody
from lb.errors import (
    BadRequest,
    BodyTooLarge,
    HeadersTooLarge,
    MethodNotAllowed,
    NotImplementedByProxy,
    ProxyError,
    Rejected,
    RequestTimeout,
    VersionNotSupported,
    error_body,
)
from lb.http1 import needs_normalizing, normalize_target, status_line
from lb.request import IncomingRequest, ListenerLimits
from lb.timers import SLACK_S, TimerWheel, WheelDeadline
from lb.tunnel import TUNNEL_HOLD_BYTES, TunnelPeer, websocket_upgrade

TASK_NAME: Final = "lb-connection"

# RFC 3986 section 3.2.2 host, optionally with a port: an IP literal in brackets, or a name
# of unreserved, percent-encoded and sub-delimiter characters (an IPv4 address is one).
_HOST: Final = re.compile(rb"(?:\[[0-9A-Za-z:.%_~\-]+\]|[0-9A-Za-z\-._~%!$&'()*+,;=]*)(?::[0-9]*)?")

# Host values found valid, so that each is matched once (a regex match costs about 3% of a
# request), not on every request; bounded, since clients choose them: emptied when full.
_VALID_HOSTS: Final[set[bytes]] = set()
MAX_VALID_HOSTS: Final = 1024


def _valid_host(host: bytes) -> bool:
    if _HOST.fullmatch(host) is None:
        return False
    if len(_VALID_HOSTS) >= MAX_VALID_HOSTS:
        _VALID_HOSTS.clear()
    _VALID_HOSTS.add(host)
    return True


log = logging.getLogger("lb.downstream")

# After an answer to a request whose body is still coming, the client's bytes are read and
# dropped this long before the connection closes (see ClientConnection.close_lingering).
LINGER_S: Final = 2.0
# Connections refused over max_connections are logged at most this often, with their count.
REFUSAL_LOG_S: Final = 10.0
# Refused connections lingering while their 503 is read, at most; beyond, they are cut.
MAX_REFUSED_LINGERING: Final = 256


class _Refusals:
    """Connections refused over max_connections, in this process: how many since the last
    warning and when that was, and how many linger while their 503 is read."""

    __slots__ = ("lingering", "logged_s", "unlogged")

    def __init__(self) -> None:
        self.unlogged = 0
        self.logged_s = float("-inf")
        self.lingering = 0


_REFUSALS: Final = _Refusals()

# Reasons the client's reading is paused; reading resumes when none is left.
# The request fields the head's parse reads; the others are only forwarded.
_HEAD_FIELDS: Final = frozenset(
    {b"content-length", b"transfer-encoding", b"host", b"expect", b"connection"}
)
PAUSE_PIPELINE: Final = 1  # pipelined requests wait, and PIPELINE_HOLD_BYTES more are held
PAUSE_BODY_HELD: Final = 2  # body bytes wait for an upstream connection
PAUSE_UPSTREAM: Final = 4  # the backend is not reading the body as fast as the client sends it
PAUSE_TUNNEL: Final = 8  # bytes after a WebSocket handshake wait for the backend's answer


# Bytes read and held unparsed behind a waiting pipelined request. Reading goes on until then,
# so that a client that leaves is noticed: a paused socket does not report its close.
PIPELINE_HOLD_BYTES: Final = 64 << 10

# Stands in for the parser of a connection that is closed: never fed (data_received returns
# first), it only lets the closed connection drop its own parser and the cycle through it.
_CLOSED_PARSER: Final = httptools.HttpRequestParser(object())


class Handler(Protocol):
    draining: bool
    connections: set[ClientConnection]
    timers: TimerWheel  # the connections' header and keep-alive deadlines

    def handle(self, conn: ClientConnection, req: IncomingRequest) -> Coroutine[Any, Any, None]: ...

    def error_answered(self, req: IncomingRequest | None, err: ProxyError, log_line: bool) -> None:
        """Told of every error answer the proxy makes; ``log_line``: no handler wrote (or
        will write) the access-log line for it (input refused before the handler saw it)."""


class ClientConnection(asyncio.Protocol):
    """One client connection: parses requests, runs them through the handler in order."""

    def __init__(self, handler: Handler, limits: ListenerLimits) -> None:
        self.handler = handler
        self.limits = limits
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.peer_ip = ""
        self.peer_ip_bytes = b""
        self.closed = False
        self._handed: IncomingRequest | None = None  # the last request given to the handler
        self._refused = False  # over max_connections: answered 503, lingering
        self.write_paused = False
        self.upstream: Any = None  # the UpstreamConnection answering now, for backpressure
        self._parser = httptools.HttpRequestParser(self)
        self._parsing: IncomingRequest | None = None
        self._current: IncomingRequest | None = None
        self._queue: deque[IncomingRequest] = deque()
        self._pipeline_held = bytearray()  # read behind a queued request, not parsed yet
        self._linger: asyncio.TimerHandle | None = None  # the end of a lingering close
        self._task: asyncio.Task[None] | None = None  # runs the requests, one after another
        self._serving = False  # the task has taken its first step
        self._waiter: asyncio.Future[None] | None = None  # the task waits here for the next one
        # One deadline for the header timeout and the keep-alive idle timeout (never both).
        self._deadline = WheelDeadline(handler.timers, self._on_deadline)
        self._pause = 0
        self._header_bytes = 0
        self._head_raw_bytes = 0
        self._headers_done = False
        self._body_timed = False  # the deadline times the gaps in the body being read
        # Bytes of reads that carried no body byte since the head (chunk lines, trailers):
        # bounded like the head, since llhttp also holds an unfinished line there.
        self._framing_raw_bytes = 0
        self._body_seen = False
        self._callback_error: ProxyError | None = None
        # A pipelined request after the one being answered was bad: answered once the
        # requests queued before it are, then the connection closes.
        self._deferred_error: ProxyError | None = None
        self._last_parsed: IncomingRequest | None = None  # the last request fully read
        # A WebSocket handshake waiting for the backend: bytes the client sent after it.
        self._tunnel_held: bytearray | None = None
        self._tunnel: TunnelPeer | None = None  # the tunnel the client's bytes now go to

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        peer = transport.get_extra_info("peername")
        self.peer_ip = peer[0] if isinstance(peer, tuple) else ""
        self.peer_ip_bytes = self.peer_ip.encode()  # written into every X-Forwarded-For
        if len(self.handler.connections) >= self.limits.max_connections:
            self._refuse()
            return
        self.handler.connections.add(self)
        self._deadline.set_in(self.limits.header_timeout_s)

    def _refuse(self) -> None:
        """Over ``max_connections``: a 503 with Retry-After, then a lingering close, so the
        client reads why (a bare close reads as an empty reply). Logged at most once per
        ``REFUSAL_LOG_S`` with the count, so a flood of connections cannot flood the log."""
        refusals = _REFUSALS
        refusals.unlogged += 1
        now = self.loop.time()
        if now - refusals.logged_s >= REFUSAL_LOG_S:
            log.warning("refusing client connections: %d open (limits.max_connections); "
                        "%d refused", len(self.handler.connections),
                        refusals.unlogged)  # fmt: skip
            refusals.logged_s = now
            refusals.unlogged = 0
        if refusals.lingering >= MAX_REFUSED_LINGERING:
            self.closed = True  # a flood: no descriptor is held for telling it why
            self.transport.abort()
            return
        # Counted, but no access-log line each: a flood of connections is not a log flood.
        too_many = Rejected("too many client connections", status=503, retry_after_s=1)
        self.answer_error(None, too_many, log_line=False)
        self._refused = True
        refusals.lingering += 1
        self.close_lingering()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        if self._tunnel_held is not None:
            self._hold_tunnel_bytes(data)
            return
        if self._tunnel is not None:
            self._tunnel.on_client_data(data)
            return
        if self._queue:
            held = self._pipeline_held
            held += data
            if len(held) > PIPELINE_HOLD_BYTES:
                self._pause_reading(PAUSE_PIPELINE)
            return
        try:
            self._body_seen = False
            last = self._last_parsed
            self._parser.feed_data(data)
            if self._parsing is not None:
                # llhttp buffers a header line until it ends, so callbacks alone cannot bound
                # a never-ending line: count what arrived while the head is still unfinished,
                # and after it, reads without a body byte (a chunk line, trailers).
                if not self._headers_done:
                    began_here = self._head_raw_bytes == 0  # on_message_begin ran in this read
                    if began_here and self._last_parsed is not last:
                        # Begun behind requests this read completed (pipelined), the head owns
                        # only the read's tail: its parsed pieces stand for it. The part of an
                        # unfinished line in this read goes uncounted (a head may pass the
                        # limit by up to one read before its 431); the reads that follow count.
                        self._head_raw_bytes = self._header_bytes + 1
                    else:
                        self._head_raw_bytes += len(data)
                    if self._head_raw_bytes > self.limits.max_header_bytes:
                        self._fail(self._header_limit_error())
                    elif began_here and self._current is None:
                        # A head begun in this read and unfinished: it has header_timeout_s
                        # from now. (One that ends in the read it began in never waits.)
                        self._deadline.set_in(self.limits.header_timeout_s)
                else:
                    if not self._body_timed:
                        # A body that did not come whole with its head: the gaps between its
                        # reads are timed (one deadline, moved only when it fires).
                        self._body_timed = True
                        self._deadline.set_in(self.limits.body_timeout_s)
                    if self._body_seen:
                        self._framing_raw_bytes = 0
                    else:
                        self._framing_raw_bytes += len(data)
                        if self._framing_raw_bytes > self.limits.max_header_bytes:
                            self._fail(
                                HeadersTooLarge(
                                    "a chunk line or the trailers exceed "
                                    f"{self.limits.max_header_bytes} bytes"
                                )
                            )
        except httptools.HttpParserUpgrade as exc:
            offset = exc.args[0] if exc.args and isinstance(exc.args[0], int) else len(data)
            last = self._last_parsed
            if last is not None and last.upgrade is not None and not self.closed:
                # A WebSocket handshake: what follows may be tunnel bytes, kept until the
                # backend answers. If it does not switch protocols they are parsed as HTTP.
                self._tunnel_held = bytearray()
                self._hold_tunnel_bytes(data[offset:])
            elif offset < len(data):
                # Any other upgrade was answered as plain HTTP/1.1: parse what follows it.
                self.data_received(data[offset:])
        except httptools.HttpParserError as exc:
            err = self._callback_error or BadRequest(f"malformed HTTP request: {exc}")
            self._callback_error = None
            self._fail(err)

    def eof_received(self) -> bool:
        # The client half-closed: the transport closes and connection_lost aborts what is
        # running, as nginx does for a client that goes away. (Defined here, not inherited, so
        # the compiled class answers without an interpreted call.)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._refused:
            self._refused = False
            _REFUSALS.lingering -= 1
        self.closed = True
        self.handler.connections.discard(self)
        self._deadline.cancel()
        self._queue.clear()
        self._pipeline_held.clear()
        self._tunnel_held = None
        if self._tunnel is not None:
            self._tunnel.on_client_closed()  # the normal end of a tunnel, not an abandonment
        elif self._waiter is not None:  # between requests: the task wakes up and ends
            self._waiter.set_result(None)
            self._waiter = None
        else:
            self._cancel_task()  # the handler aborts the upstream request: the client is gone
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        if self._current is None or self._task is None:
            self._let_go()  # nothing runs a request now (a running task lets go as it ends)

    def _let_go(self) -> None:
        """A closed connection with nothing running: break the reference cycles it is part
        of (its parser's callbacks, its deadline's), so it is freed at once rather than by
        a full garbage collection, which the proxy runs rarely."""
        self._parser = _CLOSED_PARSER
        self._deadline.close()
        self._current = self._last_parsed = self._parsing = None  # their bodies' callbacks
        self._handed = None

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.upstream is not None:
            self.upstream.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.upstream is not None:
            self.upstream.resume_reading()
        elif self._current is None and self._queue and not self.closed:
            self._start_queued()  # held back by pause_writing in _next_request

    def _start_queued(self) -> None:
        """Start the next pipelined request; once none is left, read what is held behind."""
        self._start(self._queue.popleft())
        if not self._queue and self._deferred_error is None:
            self._resume_reading(PAUSE_PIPELINE)
            held = bytes(self._pipeline_held)
            self._pipeline_held.clear()
            if held:
                self.data_received(held)

    # -- llhttp callbacks -------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._parsing = IncomingRequest()
        self._header_bytes = 0
        self._head_raw_bytes = 0
        self._framing_raw_bytes = 0
        self._headers_done = False
        self._body_timed = False

    def on_url(self, url: bytes) -> None:
        self._count_header_bytes(len(url))
        req = self._parsing
        assert req is not None
        req.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        req = self._parsing
        assert req is not None
        # Trailer fields count against the same limit as the head: they are held until the
        # body ends, so without it a chunked body could end in an endless trailer section.
        self._header_bytes += len(name) + len(value) + 4  # _count_header_bytes, inline
        if self._header_bytes > self.limits.max_header_bytes:
            self._callback_error = self._header_limit_error()
            raise self._callback_error
        if self._headers_done:
            req.body.trailers.append((name, value))
            return
        req.headers.append((name, value))

    def _count_header_bytes(self, n: int) -> None:
        self._header_bytes += n
        if self._header_bytes > self.limits.max_header_bytes:
            self._callback_error = self._header_limit_error()
            raise self._callback_error

    def _header_limit_error(self) -> HeadersTooLarge:
        return HeadersTooLarge(
            f"request line and headers exceed {self.limits.max_header_bytes} bytes"
        )

    def on_headers_complete(self) -> None:
        req = self._parsing
        assert req is not None
        self._headers_done = True
        req.started_s = time.monotonic()  # not loop.time(): uvloop caches it per iteration, in ms
        parser = self._parser
        req.method = parser.get_method()
        req.version = parser.get_http_version()
        if req.version != "1.1" and req.version != "1.0":
            self._callback_error = VersionNotSupported(
                f"HTTP/{req.version} is not spoken here: HTTP/1.1 and HTTP/1.0 are"
            )
            raise self._callback_error
        req.keep_alive = parser.should_keep_alive()
        rid_name = self.limits.request_id_header
        req.names = names = []
        for name, value in req.headers:
            lname = name.lower()
            names.append(lname)
            if lname not in _HEAD_FIELDS and lname != rid_name:
                continue  # one lookup for the common field, which only is forwarded
            if lname == b"content-length":
                req.content_length = int(value)  # llhttp has checked digits and duplicates
            elif lname == b"transfer-encoding":
                # llhttp accepts it only with chunked as the final coding; other codings
                # would be lost in re-framing, so they are refused (as nginx does).
                if value.strip().lower() != b"chunked":
                    self._callback_error = NotImplementedByProxy(
                        f"transfer coding {value.decode(errors='replace')!r} is not supported"
                    )
                    raise self._callback_error
                req.chunked = True
            elif lname == b"host":
                if req.host is not None:  # RFC 9112 section 3.2: refused, not guessed at
                    self._callback_error = BadRequest("more than one Host header")
                    raise self._callback_error
                req.host = value
            elif lname == b"expect":
                req.expect_continue = value.strip().lower() == b"100-continue"
            elif lname == b"connection":
                # Tokens name more hop-by-hop fields, but keep-alive's field is one already:
                # the usual value spares request_head another pass over the fields.
                if value.lower() != b"keep-alive":
                    req.connection_header = True
            elif lname == rid_name:
                req.request_id = value
        if req.chunked and req.version == "1.0":
            # RFC 9112 section 6.1: HTTP/1.0 framing with a transfer coding is faulty; the
            # message is read as chunked, and the connection ends after it.
            req.keep_alive = False
        url = req.url
        if url[:1] != b"/" and (url[:7].lower() == b"http://" or url[:8].lower() == b"https://"):
            # Absolute form (RFC 9112 section 3.2.2): its authority is the host, and the rest
            # is the path every route and backend sees.
            after = url.partition(b"://")[2]
            end = len(after)
            for sep in (b"/", b"?"):
                at = after.find(sep)
                if 0 <= at < end:
                    end = at
            if end == 0 or _HOST.fullmatch(after, 0, end) is None:
                # No host, user:password@host (RFC 9110 section 4.2.4: an error), or one
                # that is no host at all.
                self._callback_error = BadRequest("invalid authority in the request target")
                raise self._callback_error
            path = after[end:]
            req.url = path if path.startswith(b"/") else b"/" + path
            req.host = authority = after[:end]
            headers = [(n, v) for n, v in req.headers if n.lower() != b"host"]
            headers.append((b"Host", authority))  # what the backend is asked for
            req.headers = headers
            req.names = None
        else:
            method = req.method
            if (
                url[:1] != b"/"
                and method != b"CONNECT"  # its authority form: refused with a 405 below
                and not (url == b"*" and method == b"OPTIONS")
            ):
                # RFC 9112 section 3.2: a path, an absolute URI (http or https only, here), or
                # the asterisk of OPTIONS.
                self._callback_error = BadRequest(
                    "the request target must be a path, an http(s) URI, or * for OPTIONS"
                )
                raise self._callback_error
            host = req.host
            if host is None:
                if req.version == "1.1":
                    self._callback_error = BadRequest("an HTTP/1.1 request needs a Host header")
                    raise self._callback_error
            elif host not in _VALID_HOSTS and not _valid_host(host):
                # RFC 9112 section 3.2: a Host that is no host[:port] gets a 400, not a
                # place in X-Forwarded-Host and the backend's URL.
                self._callback_error = BadRequest("invalid Host header")
                raise self._callback_error
        # Routes (and their API keys) match the normalized path, and the backend gets the
        # same: /%70rivate or /a/../private cannot slip past a route for /private.
        url = req.url
        if needs_normalizing(url):
            req.url = normalize_target(url)
        has_body = req.chunked or bool(req.content_length)
        if parser.should_upgrade():
            # CONNECT tunnels are not offered. A WebSocket handshake is forwarded, and becomes
            # a tunnel if the backend switches protocols; other upgrades (h2c) are answered as
            # plain HTTP/1.1 (Upgrade is hop-by-hop). Either way only without a request body.
            if req.method == b"CONNECT":
                self._callback_error = MethodNotAllowed("CONNECT is not supported")
                raise self._callback_error
            if has_body:
                self._callback_error = NotImplementedByProxy(
                    "protocol upgrade with a request body is not supported"
                )
                raise self._callback_error
            req.upgrade = websocket_upgrade(req.headers) if req.method == b"GET" else None
        limit = self.limits.max_body_bytes
        if req.content_length is not None and req.content_length > limit:
            self._callback_error = BodyTooLarge(
                f"request body of {req.content_length} bytes exceeds the limit of {limit} bytes"
            )
            raise self._callback_error
        req.body = RequestBody(
            chunked=req.chunked,
            max_bytes=limit,
            replay_bytes=self.limits.replay_bytes,
            on_hold=self._hold_body,
            complete=not has_body,
        )
        if self._current is None and not self.write_paused:
            self._deadline.set(None)
            self._start(req)
        else:
            # Behind the request being answered, or behind answers the client has not read:
            # resume_writing starts it then (see _next_request).
            self._queue.append(req)
            if self._current is None:
                self._deadline.set_in(self.limits.keepalive_timeout_s)

    def on_body(self, data: bytes) -> None:
        req = self._parsing
        assert req is not None
        self._body_seen = True
        try:
            req.body.feed(data)
        except BodyTooLarge as exc:
            self._callback_error = exc
            raise

    def on_message_complete(self) -> None:
        req = self._parsing
        assert req is not None
        self._parsing = None
        self._last_parsed = req
        if not req.body.complete:
            req.body.finish(req.body.trailers)

    # -- request lifecycle ------------------------------------------------------------------

    def _start(self, req: IncomingRequest) -> None:
        self._current = req
        if req.expect_continue and not req.body.complete:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            waiter.set_result(None)
        elif self._task is None:
            # Named here: an unnamed task formats a "Task-N" name for itself.
            self._task = asyncio.Task(self._serve(), loop=self.loop, name=TASK_NAME)
        # Otherwise the task is finishing the request before this one and goes on with it.

    async def _serve(self) -> None:
        """The connection's task: answers the current request, then waits for the next.

        It ends when the connection closes; cancelled (the client left, or its body was
        bad), it ends the request being answered with it. However it ends, the connection
        lets go of it: a finished task holds its coroutine, and through it this connection,
        a reference cycle only a full collection would free."""
        self._serving = True
        handler = self.handler
        try:
            while not self.closed:
                req = self._current
                if req is None:
                    waiter = self._waiter = self.loop.create_future()
                    await waiter
                    continue
                self._handed = req
                try:
                    await handler.handle(self, req)
                except Exception:  # the handler answers its errors: this is a bug, not input
                    log.exception("request handler failed; closing the client connection")
                    self.abort()
                if self._current is req:  # a handler that did not report it done
                    self.request_done(req)
        finally:
            self._task = None
            self._waiter = None  # cancelled with the task if it was waiting
            self._serving = False
            if not self.closed:
                # Cancelled from elsewhere (the loop shutting down): nothing would answer
                # this connection's requests any more.
                self.abort()
            self._let_go()

    def _cancel_task(self) -> None:
        task = self._task
        if task is None:
            return
        task.cancel()
        if not self._serving:
            # Cancelled before its first step (the request it was made for failed in the
            # read that brought it): it never runs _serve, so the connection lets go here.
            self._task = None

    # -- WebSocket tunnel -------------------------------------------------------------------

    def open_tunnel(self, peer: TunnelPeer) -> bytes:
        """The backend switched protocols: from now on the client's bytes go to ``peer``.
        Returns what the client sent after the handshake, for ``peer`` to forward first."""
        held = bytes(self._tunnel_held or b"")
        self._tunnel_held = None
        self._tunnel = peer
        self._resume_reading(PAUSE_TUNNEL)
        return held

    def _hold_tunnel_bytes(self, data: bytes) -> None:
        held = self._tunnel_held
        assert held is not None
        held += data
        if len(held) > TUNNEL_HOLD_BYTES:
            self._pause_reading(PAUSE_TUNNEL)  # resumed when the backend answers

    def request_done(self, req: IncomingRequest) -> None:
        """Called once by the handler when ``req`` has been answered (or abandoned)."""
        self._tunnel = None
        held = None
        if req.upgrade is not None and self._tunnel_held is not None:
            # The backend answered the handshake without switching protocols: the connection
            # stays HTTP, and what the client sent after the handshake is parsed as requests.
            held = bytes(self._tunnel_held)
            self._tunnel_held = None
            self._resume_reading(PAUSE_TUNNEL)
        self._next_request(req)
        if held and not self.closed:
            self.data_received(held)

    def _next_request(self, req: IncomingRequest) -> None:
        self._current = None
        self.upstream = None
        if self.closed:
            self._let_go()  # nothing more is read on a closed connection
            return
        if not (
            req.keep_alive
            and req.response_reusable
            and req.body.complete
            and not self.handler.draining
        ):
            if req.body.complete:
                self.close()
            else:
                self.close_lingering()
            return
        if self._pause:
            self._resume_reading(PAUSE_BODY_HELD | PAUSE_UPSTREAM)
        if self._queue:
            if not self.write_paused:
                self._start_queued()
            else:
                # The client is not reading its answers: resume_writing starts the next one
                # (answers the proxy makes itself would otherwise pile up without bound), and
                # a client that reads nothing for keepalive_timeout_s is closed.
                self._deadline.set_in(self.limits.keepalive_timeout_s)
        elif self._deferred_error is not None:
            self.answer_error(None, self._deferred_error)
            self._deferred_error = None
            self.close_lingering()
        elif self._parsing is None:
            self._deadline.set_in(self.limits.keepalive_timeout_s)
        else:
            self._deadline.set_in(self.limits.header_timeout_s)

    def answer_error(
        self, req: IncomingRequest | None, err: ProxyError, *, log_line: bool | None = None
    ) -> None:
        """Answer ``err`` as JSON; after a response has started, cut the connection instead.
        ``log_line``: whether the answer needs its own access-log line (by default, when
        there is no request, which no handler saw)."""
        if self.closed:
            return
        if req is not None and req.response_started:
            self.abort()
            return
        keep_ok = err.status in (401, 404, 429, 502, 503, 504)
        self.answer(req, err.status, error_body(err), extra=err.headers, keep_ok=keep_ok)
        self.handler.error_answered(req, err, req is None if log_line is None else log_line)

    def answer(
        self,
        req: IncomingRequest | None,
        status: int,
        body: bytes,
        *,
        content_type: bytes = b"application/json",
        extra: list[bytes] | None = None,
        keep_ok: bool = True,
    ) -> None:
        """Answer with a complete response the proxy makes itself (an error, /v1/models)."""
        if self.closed:
            return
        keep = (
            keep_ok
            and req is not None
            and req.keep_alive
            and req.body.complete
            and not self.handler.draining
        )
        head = [
            status_line(status),
            b"content-type: " + content_type + b"\r\n",
            b"content-length: %d\r\n" % len(body),
        ]
        if extra:
            head.extend(extra)
        if req is not None and req.request_id is not None:
            head.append(self.limits.request_id_header + b": " + req.request_id + b"\r\n")
        if not keep:
            head.append(b"connection: close\r\n")
        head.append(b"\r\n")
        data = b"".join(head) + body
        self.transport.write(data)
        if req is not None:
            req.bytes_out += len(data)
            req.ttfb_s = time.monotonic() - req.started_s
            req.response_started = True
            req.response_reusable = keep
            req.status = status

    def close_if_idle(self) -> None:
        """Close the connection unless a request is being read or answered (used on drain)."""
        if self._current is None and self._parsing is None:
            self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.transport.close()

    def close_lingering(self) -> None:
        """Close after an answer while the client may still be sending its body: end the
        writing side, then read and drop what arrives for up to ``LINGER_S``. Closing at once
        would make the kernel answer the unread bytes with a reset, which destroys the answer
        before the client has read it (nginx's lingering close)."""
        if self.closed:
            return
        self.closed = True  # nothing more is parsed or answered: data_received drops it all
        transport = self.transport
        if self._pause:
            self._pause = 0
            transport.resume_reading()
        if transport.can_write_eof():
            transport.write_eof()
        self._linger = self.loop.call_later(LINGER_S, transport.close)

    def abort(self) -> None:
        linger = self._linger
        if not self.closed or linger is not None:  # a lingering close is cut short too
            self.closed = True
            if linger is not None:
                linger.cancel()
                self._linger = None
            self.transport.abort()

    def _fail(self, err: ProxyError) -> None:
        """The input is unusable: answer ``err`` if nothing else is being answered, then close."""
        self._pause_reading(PAUSE_PIPELINE)
        self._pipeline_held.clear()  # nothing after the bad input can be framed
        current = self._current
        if current is None:
            self.answer_error(None, err)
            self.close_lingering()
        elif current is self._parsing:
            # The failing input is the body of the request being answered.
            never_ran = self._handed is not current  # then no handler logs the request
            self._cancel_task()
            self.answer_error(current, err, log_line=never_ran)
            self.close_lingering()
            if self._task is None:  # it never ran: let go now, not when the lingering ends
                self._let_go()
        else:
            # A later pipelined request is bad: the requests before it are answered in order,
            # then the error, then the connection closes (nginx reads a pipeline one request at
            # a time, and so answers the same way however the bytes were split into reads).
            bad = self._parsing
            if bad is not None and bad in self._queue:
                self._queue.remove(bad)  # its body was the bad input
            self._deferred_error = err

    def _on_deadline(self) -> None:
        """The head being read took too long (408), an idle keep-alive connection expired, or
        a body being read went quiet for body_timeout_s (408)."""
        req = self._parsing
        if req is not None and self._headers_done:
            self._check_body_pace(req)
            return
        if self._current is not None:
            return  # a request is being answered and none read: nothing to time out
        if self._queue or self.write_paused:
            # Answers wait for a client that reads none of them: it is cut off without a
            # word (a 408 now would be read as a queued request's answer), and at once, since
            # a close would first wait for the full buffer to drain.
            self.abort()
            return
        if req is not None:
            self.answer_error(None, RequestTimeout("the request headers did not arrive in time"))
        self.close()

    def _check_body_pace(self, req: IncomingRequest) -> None:
        timeout_s = self.limits.body_timeout_s
        quiet_s = time.monotonic() - req.body.fed_at_s
        if self._pause or req is not self._current:
            # The proxy stopped reading (the backend is slow to take the body, or the client
            # does not read its answer), or the body is a queued request's, held unparsed
            # behind the one answered: a quiet body is not the client's doing now.
            self._deadline.set_in(timeout_s)
        elif quiet_s < timeout_s - SLACK_S:
            self._deadline.set_in(timeout_s - quiet_s)
        else:
            self._fail(
                RequestTimeout(f"the request body stopped: no byte of it for {quiet_s:.1f}s")
            )

    def _hold_body(self, holding: bool) -> None:
        if holding:
            self._pause_reading(PAUSE_BODY_HELD)
        else:
            self._resume_reading(PAUSE_BODY_HELD)

    def pause_for_upstream(self, paused: bool) -> None:
        if paused:
            self._pause_reading(PAUSE_UPSTREAM)
        else:
            self._resume_reading(PAUSE_UPSTREAM)

    def _pause_reading(self, reason: int) -> None:
        if not self._pause and not self.closed:
            self.transport.pause_reading()
        self._pause |= reason

    def _resume_reading(self, reasons: int) -> None:
        if not self._pause:
            return
        self._pause &= ~reasons
        if not self._pause and not self.closed:
            self.transport.resume_reading()
