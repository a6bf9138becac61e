"""Connections to one backend: an HTTP/1.1 client protocol on llhttp, and a keep-alive pool.

A connection carries one exchange at a time (no upstream pipelining). The response is parsed by
llhttp (httptools) and handed, callback by callback, to the current :class:`ResponseSink`, so
response bytes reach the client without a task switch. A connection goes back to the pool only
after its response was read completely and cleanly, its request was written completely, and
the backend did not ask to close; otherwise it is closed.
"""

from __future__ import annotations

import asyncio
import functools
import os
import socket
import ssl
from typing import Final, Protocol, cast

import httptools

from lb.backend import Backend
from lb.errors import UpstreamFailed, UpstreamUnreachable
from lb.http1 import Headers
from lb.timers import Deadline

# How a response body is delimited on the wire (RFC 9112 section 6.3).
FRAMING_NONE: Final = 0  # HEAD, 204, 304: no body
FRAMING_LENGTH: Final = 1  # Content-Length
FRAMING_CHUNKED: Final = 2  # Transfer-Encoding: chunked
FRAMING_CLOSE: Final = 3  # neither: the body ends when the connection closes


# A backend whose response head (status line, headers, 1xx responses) exceeds this is broken.
MAX_RESPONSE_HEAD_BYTES: Final = 256 << 10


class RequestSource(Protocol):
    """The request body as the connection sees it: finished or not."""

    complete: bool


class ResponseSink(Protocol):
    """What a connection reports to while it carries an exchange; all calls are synchronous."""

    def on_response_head(
        self, status: int, headers: Headers, framing: int, keep_alive: bool
    ) -> None: ...

    def on_response_body(self, data: bytes) -> None: ...

    def on_response_end(self, trailers: Headers) -> None: ...

    def on_upstream_lost(self, error: UpstreamFailed, response_started: bool) -> None: ...

    def flush(self) -> None: ...

    def on_deadline(self) -> None: ...

    def on_upstream_write_paused(self, paused: bool) -> None: ...

    def on_tunnel_data(self, data: bytes) -> None: ...

    def on_tunnel_closed(self) -> None: ...


# Stands in for the parser of a closed connection (never fed): see connection_lost.
_CLOSED_PARSER: Final = httptools.HttpResponseParser(object())


class UpstreamConnection(asyncio.Protocol):
    """One TCP (or TLS) connection to a backend, speaking HTTP/1.1 as a client."""

    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.sink: ResponseSink | None = None
        self.closed = False
        self._reading_paused = False
        self.requests_sent = 0
        self.idle_since_s = 0.0
        self.body: RequestSource | None = None
        # The current exchange's response deadline (headers, then idle gaps); it outlives
        # exchanges so that moving it per request costs no loop timer.
        self.loop = asyncio.get_running_loop()
        self.deadline = Deadline(self.loop, self._on_deadline)
        self._parser = httptools.HttpResponseParser(self)
        self._reset_response_state()

    def _reset_response_state(self) -> None:
        self._headers: Headers = []
        # The lower-cased names of the final response's headers, in order (see lb.forwarding).
        self.header_names: list[bytes] = []
        self._trailers: Headers = []
        self._headers_done = False
        self._final = False  # the head being parsed is a final (non-1xx) response
        self._complete = False
        self._broken = False
        self._got_bytes = False
        self._head_bytes = 0
        self._framing_bytes = 0  # of reads without a body byte after the head: see data_received
        self._body_seen = False
        self._head_request = False
        self._close_delimited = False
        self._keep_alive = False
        self._upgrade = False  # the request is a WebSocket handshake
        self._tunnel = False  # the backend switched protocols: bytes are relayed as they come
        self.content_type = b""  # of the current response, lowercased, once its head is parsed
        # False once a final head is parsed with no Connection field but keep-alive ones.
        self.connection_header = True

    # -- used by the proxy ------------------------------------------------------------------

    @property
    def reused(self) -> bool:
        """True when this connection already carried a request before the current one."""
        return self.requests_sent > 1

    @property
    def got_bytes(self) -> bool:
        """True once any byte of the current response has arrived."""
        return self._got_bytes

    def begin(
        self,
        sink: ResponseSink,
        body: RequestSource,
        head_request: bool,
        data: bytes,
        upgrade: bool = False,
    ) -> None:
        """Attach ``sink`` for the next response and write the start of the request.

        ``upgrade``: the request is a WebSocket handshake; a 101 answer turns the connection
        into a tunnel (``on_tunnel_data`` / ``on_tunnel_closed``) that is never pooled again.
        """
        self._reset_response_state()
        self._head_request = head_request
        self._upgrade = upgrade
        self.sink = sink
        self.body = body
        self.requests_sent += 1
        assert self.transport is not None
        self.transport.write(data)

    def write(self, data: bytes) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(data)

    def pause_reading(self) -> None:
        if not self.closed and self.transport is not None and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        # Only when paused: resuming a reading transport still costs uvloop a system call.
        if not self.closed and self.transport is not None and self._reading_paused:
            self._reading_paused = False
            self.transport.resume_reading()

    def _on_deadline(self) -> None:
        if self.sink is not None:
            self.sink.on_deadline()

    def _release(self) -> None:
        """The response is complete: back to the pool if the connection is clean, else close."""
        self.sink = None
        self.deadline.set(None)
        body = self.body
        self.body = None
        if self.closed:
            return
        if not self._broken and self._keep_alive and body is not None and body.complete:
            if self._reading_paused:
                self.resume_reading()
            self.pool.release(self)
        else:
            self.close()

    def abort(self) -> None:
        """Close at once, without flushing: the backend sees the request go away."""
        self.sink = None
        self.deadline.cancel()
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.abort()

    def close(self) -> None:
        self.sink = None
        self.deadline.cancel()
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass

    def data_received(self, data: bytes) -> None:
        sink = self.sink
        if self._tunnel and sink is not None:
            sink.on_tunnel_data(data)
            sink.flush()
            return
        if sink is None:
            # Bytes on an idle connection: nothing asked for them, so the stream is unusable.
            self.abort()
            self.pool.forget(self)
            return
        self._got_bytes = True
        if not self._headers_done:
            self._head_bytes += len(data)
            if self._head_bytes > MAX_RESPONSE_HEAD_BYTES:
                self._fail(sink, UpstreamFailed("backend response headers are too large"))
                return
        self._body_seen = False
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            if not self._tunnel:
                self._fail(sink, UpstreamFailed("backend switched protocols unasked"))
                return
            offset = exc.args[0] if exc.args and isinstance(exc.args[0], int) else len(data)
            if offset < len(data) and self.sink is sink:
                sink.on_tunnel_data(data[offset:])
        except httptools.HttpParserError as exc:
            if self._complete:
                self._broken = True  # garbage after a complete response: do not reuse
            else:
                # An error raised by a callback below is what httptools raised this one from.
                cause = exc.__context__
                if not isinstance(cause, UpstreamFailed):
                    cause = UpstreamFailed(f"invalid HTTP response from backend: {exc}")
                self._fail(sink, cause)
                return
        if self.sink is not sink:
            return  # the callbacks ended the exchange
        if self._headers_done and not self._complete:
            # llhttp holds an unfinished chunk line or trailer until it ends: reads that bring
            # no body byte are bounded like the head.
            if self._body_seen:
                self._framing_bytes = 0
            else:
                self._framing_bytes += len(data)
                if self._framing_bytes > MAX_RESPONSE_HEAD_BYTES:
                    sink.flush()
                    self._fail(sink, UpstreamFailed("backend chunk line or trailers too large"))
                    return
        sink.flush()
        if self._complete and self.sink is sink:
            if self._head_request:
                # llhttp cannot be told that a HEAD response has no body; start a fresh parser.
                self._parser = httptools.HttpResponseParser(self)
            self._release()

    def _fail(self, sink: ResponseSink, error: UpstreamFailed) -> None:
        self.abort()
        self.pool.forget(self)
        sink.on_upstream_lost(error, self._headers_done)

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost does the accounting

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.deadline.close()  # nothing is parsed or timed on this connection any more:
        self._parser = _CLOSED_PARSER  # let go of both, and of the cycles through them
        self.pool.forget(self)
        sink = self.sink
        if sink is None:
            return
        self.sink = None
        if self._tunnel:
            sink.on_tunnel_closed()
            return
        if self._close_delimited and exc is None and not self._complete:
            # A response without Content-Length or chunked framing ends when the backend closes.
            self._complete = True
            sink.on_response_end(self._trailers)
            sink.flush()
            return
        if self._complete:
            return
        reason = f"connection to backend lost: {exc}" if exc else "backend closed the connection"
        sink.on_upstream_lost(UpstreamFailed(reason), self._headers_done)

    def pause_writing(self) -> None:
        if self.sink is not None:
            self.sink.on_upstream_write_paused(True)

    def resume_writing(self) -> None:
        if self.sink is not None:
            self.sink.on_upstream_write_paused(False)

    # -- llhttp callbacks -------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._complete:
            self._broken = True  # a second response to one request
        self._headers = []

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._final:
            self._trailers.append((name, value))
        else:
            self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status == 101 and self._upgrade:
            # The WebSocket handshake succeeded: what follows the head is the tunnel.
            self._headers_done = True
            self._tunnel = True
            sink = self.sink
            if sink is not None:
                sink.on_response_head(status, self._headers, FRAMING_NONE, False)
            return
        if status < 100:
            # llhttp takes any three digits. Taken for an interim response, such an answer's
            # body would reach the client ahead of any response head.
            raise UpstreamFailed(f"invalid HTTP response from backend: status {status}")
        if status < 200:
            return  # 1xx interim response: llhttp parses the final one next
        self._final = True
        self._headers_done = True
        self._keep_alive = self._parser.should_keep_alive()
        # One pass over the headers: the body's framing, and its type for the sink.
        content_type = b""
        length = chunked = connection = False
        self.header_names = names = []
        for name, value in self._headers:
            lname = name.lower()
            names.append(lname)
            if lname == b"content-type":
                content_type = value.lower()
            elif lname == b"connection" and value.lower() != b"keep-alive":
                connection = True  # tokens to look for (keep-alive's field is hop-by-hop)
            elif lname == b"content-length":
                length = True
            elif lname == b"transfer-encoding":
                if value.strip().lower() != b"chunked":
                    # Another coding (gzip...) would be re-framed and lose its meaning.
                    raise UpstreamFailed(
                        "backend used transfer coding "
                        f"{value.decode('latin-1')!r}, which is not supported"
                    )
                chunked = True
        self.content_type = content_type
        self.connection_header = connection
        if self._head_request or status in (204, 304):
            framing = FRAMING_NONE
        elif chunked:  # Transfer-Encoding overrides Content-Length (RFC 9112 section 6.3)
            framing = FRAMING_CHUNKED
        elif length:
            framing = FRAMING_LENGTH
        else:
            framing = FRAMING_CLOSE
        self._close_delimited = framing == FRAMING_CLOSE
        sink = self.sink
        if sink is None or self._broken:
            return
        sink.on_response_head(status, self._headers, framing, self._keep_alive)
        if self._head_request:
            self._complete = True
            if self.sink is sink:
                sink.on_response_end([])

    def on_body(self, body: bytes) -> None:
        self._body_seen = True
        sink = self.sink
        if sink is not None and not self._head_request and not self._broken:
            sink.on_response_body(body)

    def on_message_complete(self) -> None:
        if not self._final or self._complete:
            return
        self._complete = True
        sink = self.sink
        if sink is not None:
            sink.on_response_end(self._trailers)


@functools.cache
def _default_context() -> ssl.SSLContext:
    """The system's trusted CAs with hostname checks, for backends with no pool settings."""
    return ssl.create_default_context()


class ConnectionPool:
    """Keep-alive connections to one backend, most recently used first.

    ``max_idle`` (default 128) bounds the idle connections kept; ``idle_timeout_s`` (default
    60, nginx's for its upstream keep-alive) closes a connection unused that long, checked by
    one timer per pool. A connection the backend closes while idle is dropped when its close
    arrives.
    """

    def __init__(
        self,
        backend: Backend,
        *,
        max_idle: int = 128,
        idle_timeout_s: float = 60.0,
    ) -> None:
        self.backend = backend
        self.max_idle = max_idle
        self.idle_timeout_s = idle_timeout_s
        self._idle: list[UpstreamConnection] = []
        self._reaper: asyncio.TimerHandle | None = None
        self._closed = False
        self.connects_total = 0  # connections opened
        self.connect_failures_total = 0  # connects refused, timed out or failing TLS

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    def take_idle(self) -> UpstreamConnection | None:
        """A pooled connection that still looks open, or ``None``."""
        idle = self._idle
        while idle:
            conn = idle.pop()
            if not conn.closed and conn.transport is not None and not conn.transport.is_closing():
                return conn
        return None

    async def connect(self, timeout_s: float) -> UpstreamConnection:
        """Open a new connection; raises :class:`UpstreamUnreachable` on any failure."""
        loop = asyncio.get_running_loop()
        backend = self.backend
        context = None
        if backend.scheme == "https":
            # The context is read at each connect, so a reload's new TLS settings apply to
            # every connection opened after it.
            context = backend.ssl_context or _default_context()
        try:
            async with asyncio.timeout(timeout_s):
                _, conn = await loop.create_connection(
                    lambda: UpstreamConnection(self),
                    backend.host,
                    backend.port,
                    ssl=context,
                    server_hostname=(backend.server_name or backend.host) if context else None,
                )
        except TimeoutError:
            self.connect_failures_total += 1
            raise UpstreamUnreachable(
                f"connect to backend {backend.name} timed out after {timeout_s:g}s"
            ) from None
        except OSError as exc:  # ssl.SSLError included
            self.connect_failures_total += 1
            if isinstance(exc, ssl.SSLCertVerificationError):
                reason = f"TLS certificate not accepted: {exc.verify_message}"
            elif isinstance(exc, ssl.SSLError):
                reason = f"TLS handshake failed: {exc.reason or exc}"
            elif exc.errno:
                reason = os.strerror(exc.errno).lower()
            else:
                reason = str(exc)
            raise UpstreamUnreachable(
                f"connect to backend {backend.name} failed: {reason}"
            ) from None
        self.connects_total += 1
        return conn

    def release(self, conn: UpstreamConnection) -> None:
        """Take back a connection whose exchange ended cleanly."""
        if self._closed or len(self._idle) >= self.max_idle:
            conn.close()
            return
        loop = conn.loop  # not asyncio.get_running_loop(): on Python 3.11 that costs a getpid()
        conn.idle_since_s = loop.time()
        self._idle.append(conn)
        if self._reaper is None:
            self._reaper = loop.call_later(self.idle_timeout_s, self._reap)

    def resize(self, max_idle: int, idle_timeout_s: float) -> None:
        """A reload's pooling settings: idle connections beyond ``max_idle`` close now, the
        longest idle first; the new idle timeout applies from the next reaping."""
        self.max_idle = max_idle
        self.idle_timeout_s = idle_timeout_s
        idle = self._idle
        while len(idle) > max_idle:
            idle.pop(0).close()

    def forget(self, conn: UpstreamConnection) -> None:
        """Drop a connection that closed while pooled."""
        try:
            self._idle.remove(conn)
        except ValueError:
            pass

    def _reap(self) -> None:
        self._reaper = None
        loop = asyncio.get_running_loop()
        deadline = loop.time() - self.idle_timeout_s
        keep: list[UpstreamConnection] = []
        for conn in self._idle:
            if conn.idle_since_s <= deadline:
                conn.close()
            else:
                keep.append(conn)
        self._idle = keep
        if keep:
            oldest = min(c.idle_since_s for c in keep)
            self._reaper = loop.call_at(oldest + self.idle_timeout_s, self._reap)

    def close(self) -> None:
        """Close every idle connection; connections released later are closed too."""
        self._closed = True
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
        for conn in self._idle:
            conn.close()
        self._idle.clear()
