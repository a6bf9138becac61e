"""One upstream attempt: a request written to a backend connection, its response relayed.

The :class:`Exchange` is the connection's :class:`~lb.upstream.ResponseSink`. Response bytes are
written to the client from the connection's callbacks, coalesced per read, so a chunk the
backend writes reaches the client at once and without a task switch. Flow control runs both
ways: a client that reads slowly pauses reading from the backend, a backend that reads slowly
pauses reading from the client. The proxy awaits :attr:`Exchange.done`, which resolves to
``None`` on a complete response or to the :class:`~lb.errors.ProxyError` that ended it.
"""

from __future__ import annotations

import asyncio
import time
from typing import Final

from lb.downstream import ClientConnection
from lb.errors import (
    ProxyError,
    RequestTimeout,
    UpstreamFailed,
    UpstreamStatus,
    UpstreamTimeout,
    error_body,
)
from lb.forwarding import ForwardingSettings, response_head
from lb.http1 import CRLF, Headers, chunk, chunk_head, last_chunk
from lb.inference import InferenceStats, ResponseMeter
from lb.load import Attempt
from lb.request import IncomingRequest
from lb.retry import parse_retry_after
from lb.timers import SLACK_S
from lb.upstream import FRAMING_CLOSE, FRAMING_LENGTH, FRAMING_NONE, UpstreamConnection

# The longest wait (or idle_s, if shorter) for the rest of an answer that will be retried:
# reading it only keeps the connection for reuse.
DISCARD_WAIT_S: Final = 1.0
# A reused connection that fails before any response byte within this long of the request
# being written is taken for one the backend closed as idle while the request was on its way:
# the request is replayed on a fresh connection. Failing later, the backend had it.
STALE_WINDOW_S: Final = 1.0


class Exchange:
    """Relays one response from ``conn`` to ``client`` for ``req``."""

    __slots__ = (
        "_active_s",
        "_awaiting_token",
        "_chunked",
        "_discard",
        "_ended",
        "_extra",
        "_headers",
        "_headers_timeout_s",
        "_idle_s",
        "_inference",
        "_meter",
        "_out",
        "_pool_name",
        "_retry_statuses",
        "_sent_s",
        "_settings",
        "_tunnel",
        "attempt",
        "client",
        "conn",
        "done",
        "loop",
        "req",
        "stale",
        "status",
    )

    def __init__(
        self,
        client: ClientConnection,
        req: IncomingRequest,
        conn: UpstreamConnection,
        attempt: Attempt,
        *,
        extra_headers: bytes,
        settings: ForwardingSettings,
        headers_timeout_s: float | None,
        idle_timeout_s: float | None,
        retry_statuses: frozenset[int] = frozenset(),
        inference: InferenceStats | None = None,
        pool_name: str | None = None,
    ) -> None:
        self.client = client
        self.req = req
        self.conn = conn
        self.attempt = attempt
        self.loop = client.loop
        self.done: asyncio.Future[ProxyError | None] = self.loop.create_future()
        self.stale = False  # failed on a reused connection before any response byte
        self._sent_s = 0.0  # loop time the request was written
        self.status = 0
        self._extra = extra_headers
        self._settings = settings
        self._headers_timeout_s = headers_timeout_s
        self._idle_s = idle_timeout_s
        self._out: list[bytes] = []
        self._chunked = False
        self._ended = False
        self._retry_statuses = retry_statuses  # answers that are swallowed and retried
        self._discard = False
        self._headers: Headers = []
        self._inference = inference
        self._meter: ResponseMeter | None = None
        self._tunnel = False  # a WebSocket tunnel: bytes relayed both ways until one side ends
        self._awaiting_token = False  # a stream whose first token is still to come
        self._pool_name = pool_name  # for errors the client reads before the attempt ends
        # Loop time of the last byte relayed once the response started (-1: none yet). The
        # idle deadline is armed once and, when it fires, moved to idle_s past this time if
        # bytes came since: a chunk costs an attribute write, not a deadline update.
        self._active_s = -1.0

    def start(self, head: bytes) -> None:
        """Write the request head and the body held so far; stream the rest as it comes."""
        client, conn, req = self.client, self.conn, self.req
        client.upstream = conn
        data = head + req.body.attach(conn)
        conn.begin(self, req.body, req.method == b"HEAD", data, upgrade=req.upgrade is not None)
        if client.write_paused:
            conn.pause_reading()
        self._sent_s = now = self.loop.time()
        timeout_s = self._headers_timeout_s
        conn.deadline.set(None if timeout_s is None else now + timeout_s)

    def close(self) -> None:
        """End the attempt whatever state it is in; the connection is cut if it is unfinished."""
        body = self.req.body
        if body.sink is self.conn:
            body.detach()
        if self.client.upstream is self.conn:
            self.client.upstream = None
            self.client.pause_for_upstream(False)
        if self.conn.sink is self:
            self.conn.abort()

    # -- ResponseSink -----------------------------------------------------------------------

    def on_response_head(
        self, status: int, headers: Headers, framing: int, keep_alive: bool
    ) -> None:
        self.conn.deadline.set(None)
        self.status = status
        # A token stream's latency is its time to first token: the server sends its headers
        # before queueing and prefill (lb.load).
        self._awaiting_token = stream = (
            self._inference is not None
            and 200 <= status < 300
            and self.conn.content_type.find(b"event-stream") >= 0
        )
        self.attempt.response_started(status, deferred=stream)
        self._headers = headers
        if status in self._retry_statuses:
            # The client never sees this answer: its body is read and dropped, and the
            # request is tried again (the connection stays reusable). A body slow to come
            # is not waited for: the connection is cut and the retry goes ahead.
            self._discard = True
            idle_s = self._idle_s
            self.conn.deadline.set_in(
                DISCARD_WAIT_S if idle_s is None else min(idle_s, DISCARD_WAIT_S)
            )
            return
        req = self.req
        if status == 101:
            self._open_tunnel(headers)
            return
        http11 = req.version == "1.1"
        self._chunked = chunked = framing > FRAMING_LENGTH and http11
        reusable = framing != FRAMING_CLOSE or chunked
        # An answer that comes before the client finished its body ends the connection (the
        # rest of the body is not read), so it says so, as the proxy's own answers do.
        keep = (
            req.keep_alive and reusable and req.body.complete and not self.client.handler.draining
        )
        self._out.append(
            response_head(
                status,
                headers,
                chunked=chunked,
                keep_alive=keep,
                http10_keep_alive=keep and not http11,
                extra=self._extra,
                settings=self._settings,
                connection_header=self.conn.connection_header,
                names=self.conn.header_names,
            )
        )
        req.response_started = True
        req.response_reusable = keep
        req.status = status
        req.ttfb_s = time.monotonic() - req.started_s
        if self._inference is not None and 200 <= status < 300:
            self._meter = self._meter_for(self.conn.content_type)
        if framing == FRAMING_NONE:
            self._chunked = False

    def _open_tunnel(self, headers: Headers) -> None:
        """Relay the 101 answer, then the client's bytes to the backend and back."""
        req = self.req
        upgrade = b"websocket"
        for name, value in headers:
            if name.lower() == b"upgrade":
                upgrade = value
        self._out.append(
            response_head(
                101,
                headers,
                chunked=False,
                keep_alive=True,  # no "connection: close": the next line says what follows
                http10_keep_alive=False,
                extra=b"connection: upgrade\r\nupgrade: %s\r\n%s" % (upgrade, self._extra),
                settings=self._settings,
            )
        )
        req.response_started = True
        req.response_reusable = False
        req.status = 101
        req.ttfb_s = time.monotonic() - req.started_s
        self._tunnel = True
        held = self.client.open_tunnel(self)
        if held:
            self.on_client_data(held)

    # -- the tunnel (TunnelPeer and the connection's tunnel callbacks) ------------------------

    def on_client_data(self, data: bytes) -> None:
        self.conn.write(data)
        self.flush()  # nothing to write the client, but the bytes count against idle_s

    def on_client_closed(self) -> None:
        self._ended = True
        self.conn.close()  # what the client sent last is still written, then the backend sees EOF
        self._resolve(None)

    def on_tunnel_data(self, data: bytes) -> None:
        self._out.append(data)

    def on_tunnel_closed(self) -> None:
        self._ended = True
        self.flush()
        self._resolve(None)  # the client connection is closed once the request is done

    def _meter_for(self, content_type: bytes) -> ResponseMeter | None:
        assert self._inference is not None
        # The usual JSON answer by startswith (a C call in the compiled build, where find()
        # parses its arguments each time), others by find(): not ``in``, which on Python 3.11
        # first tries the needle as an integer and raises and clears a TypeError.
        if content_type.startswith(b"application/json"):
            sse = False
        elif content_type.find(b"event-stream") >= 0:
            sse = True
        elif content_type.find(b"json") >= 0:
            sse = False
        else:
            return None
        return ResponseMeter(self._inference, self.req.started_s, sse=sse)

    def on_response_body(self, data: bytes) -> None:
        if not self._discard:
            out = self._out
            if self._chunked:  # chunk(data) in pieces, joined once when flushed
                out.append(chunk_head(len(data)))
                out.append(data)
                out.append(CRLF)
            else:
                out.append(data)
            meter = self._meter
            if meter is not None:
                meter.on_body(data)
                if self._awaiting_token and meter.events:
                    self._awaiting_token = False
                    self.attempt.first_token()

    def on_response_end(self, trailers: Headers) -> None:
        self._ended = True
        if self._discard:
            self._resolve(self._status_error())
            return
        if self._chunked:
            self._out.append(last_chunk(trailers))
        if self._meter is not None:
            self._meter.on_end()
        self._resolve(None)

    def retry_after_s(self) -> float | None:
        """The response's ``Retry-After`` in seconds, if it has a valid one."""
        retry_after = None
        for name, value in self._headers:
            if name.lower() == b"retry-after":
                retry_after = parse_retry_after(value, time.time())
        return retry_after

    def _status_error(self) -> UpstreamStatus:
        return UpstreamStatus(
            f"backend {self.attempt.backend.name} answered {self.status}",
            status=self.status,
            retry_after_s=self.retry_after_s(),
        )

    def _is_event_stream(self) -> bool:
        return self.conn.content_type.startswith(b"text/event-stream")

    def _end_stream_with_error(self, error: ProxyError) -> None:
        """A started SSE response that breaks gets an ``error`` event before the cut."""
        if self.req.response_started and not self._discard and self._is_event_stream():
            if error.pool is None:
                error.pool = self._pool_name
            payload = error_body(error)
            event = b"event: error\ndata: %s\n\n" % payload
            self._out.append(chunk(event) if self._chunked else event)
            self.flush()

    def flush(self) -> None:
        if self._discard:
            return
        out = self._out
        if out:
            if not self.client.closed:
                data = out[0] if len(out) == 1 else b"".join(out)
                self.client.transport.write(data)
                self.req.bytes_out += len(data)
            out.clear()
        if (
            not self._ended
            and self.req.response_started
            and self._idle_s is not None
            and not self.conn.closed
        ):
            now = self.loop.time()  # the idle deadline counts from now (armed the first time)
            if self._active_s < 0.0:
                self.conn.deadline.set(now + self._idle_s)
            self._active_s = now

    def on_upstream_lost(self, error: UpstreamFailed, response_started: bool) -> None:
        self.flush()
        conn = self.conn
        # A kept-alive connection the backend closed as it was reused fails at once; one that
        # fails later had the request in the backend's hands, and is no stale connection.
        self.stale = (
            not response_started
            and not conn.got_bytes
            and conn.reused
            and self.loop.time() - self._sent_s <= STALE_WINDOW_S
        )
        if self._discard:
            self._resolve(self._status_error())  # the retry is due anyway
            return
        self._end_stream_with_error(error)
        self._resolve(error)

    def on_upstream_write_paused(self, paused: bool) -> None:
        self.client.pause_for_upstream(paused)

    # -- timers -----------------------------------------------------------------------------

    def on_deadline(self) -> None:
        """No response head within the headers timeout, or a gap longer than the idle one."""
        if not self.status:
            waiting = self._backend_waits_for_body()
            self.conn.abort()
            if waiting:
                quiet_s = time.monotonic() - self.req.body.fed_at_s
                self._resolve(
                    RequestTimeout(
                        f"the request body was still unfinished after {self._headers_timeout_s:g}s"
                        f" (its last byte came {quiet_s:.1f}s ago)"
                    )
                )
                return
            self._resolve(
                UpstreamTimeout(
                    f"backend {self.attempt.backend.name} sent no response headers "
                    f"within {self._headers_timeout_s:g}s"
                )
            )
            return
        if self._ended:
            return
        if self._discard:  # the body of an answer being retried did not come in time
            self.conn.abort()
            self._resolve(self._status_error())
            return
        if self._idle_s is not None and self._active_s >= 0.0:
            due = self._active_s + self._idle_s
            if self.loop.time() + SLACK_S < due:
                self.conn.deadline.set(due)  # bytes came since it was armed: not idle yet
                return
        if self.client.write_paused and not self._tunnel:
            # The client reads nothing, so the backend is not read either: its silence is
            # the client's doing, and no failure of the backend's.
            self.flush()
            self.conn.abort()
            self._resolve(RequestTimeout(f"the client read nothing for {self._idle_s:g}s"))
            return
        if self._tunnel:
            # A tunnel idle both ways for idle_s ends; both sides are closed, no error event.
            self._ended = True
            self.flush()
            self.conn.close()
            self._resolve(None)
            return
        self.flush()
        self.conn.abort()
        error = UpstreamTimeout(
            f"backend {self.attempt.backend.name} sent nothing for {self._idle_s:g}s"
        )
        self._end_stream_with_error(error)
        self._resolve(error)

    def _backend_waits_for_body(self) -> bool:
        """True if the body is unfinished and the backend has every byte of it the client
        sent: the backend may well be waiting for the rest, so a missing answer is the slow
        client's doing, not the backend's failure (clients dribbling their uploads must not
        get healthy backends ejected). A backend that stopped reading is judged."""
        transport = self.conn.transport
        return (
            not self.req.body.complete
            and transport is not None
            and not transport.get_write_buffer_size()
        )

    def _resolve(self, result: ProxyError | None) -> None:
        if not self.done.done():
            self.done.set_result(result)
