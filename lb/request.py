"""A client request as the proxy holds it, and the limits a client connection enforces.

:class:`IncomingRequest` is filled by :mod:`lb.downstream` as the head is parsed and carries
the request's response state (status, bytes, timings) until the access log reads it.
:class:`RequestInfo` is what a balancing strategy is shown of it (``lb.strategies`` exports it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lb.body import RequestBody
from lb.http1 import Headers


@dataclass(slots=True)
class ListenerLimits:
    """Per-connection limits; see ``lb.config.Limits`` for the meaning and defaults."""

    max_header_bytes: int = 65536
    max_body_bytes: int = 32 << 20
    header_timeout_s: float = 30.0
    keepalive_timeout_s: float = 75.0
    body_timeout_s: float = 60.0
    replay_bytes: int = 1 << 20
    max_connections: int = 10000
    max_inspect_bytes: int = 8 << 20
    request_id_header: bytes = b"x-request-id"


class IncomingRequest:
    """A client request: its head as received, its body stream and its response state."""

    __slots__ = (
        "attempts",
        "backend_name",
        "body",
        "bytes_out",
        "chunked",
        "connection_header",
        "content_length",
        "decision",
        "expect_continue",
        "headers",
        "host",
        "keep_alive",
        "method",
        "names",
        "request_id",
        "response_reusable",
        "response_started",
        "route",
        "started_s",
        "status",
        "ttfb_s",
        "upgrade",
        "url",
        "version",
    )

    def __init__(self) -> None:
        self.method = b""
        self.url = b""
        self.version = "1.1"
        self.headers: Headers = []
        # The lower-cased names of ``headers``, in step with them once the head is parsed (the
        # head's parse lowers each name already; forwarding reuses them). None: not known.
        self.names: list[bytes] | None = None
        self.keep_alive = True
        self.content_length: int | None = None
        self.chunked = False
        # A Connection field other than "keep-alive" came: its tokens name hop-by-hop fields.
        self.connection_header = False
        self.expect_continue = False
        self.host: bytes | None = None
        self.request_id: bytes | None = None
        self.body: RequestBody = None  # type: ignore[assignment]  # set at headers-complete
        self.response_started = False
        self.response_reusable = False  # the response was framed so the connection can go on
        self.status = 0  # the status answered to the client, once known
        self.started_s = 0.0  # loop time when the headers were complete
        self.ttfb_s = -1.0  # seconds to the response head, once sent
        # The Upgrade header of a WebSocket handshake the proxy may tunnel, else None.
        self.upgrade: bytes | None = None
        self.bytes_out = 0  # response bytes written to the client
        self.attempts = 0
        self.backend_name: str | None = None  # the backend of the last attempt
        self.decision = b""  # the decision header line ("x-lb-decision: strategy: why\r\n")
        self.route: str | None = None  # the name of the route that matched

    @property
    def path(self) -> bytes:
        """The request target without the query string."""
        q = self.url.find(b"?")
        return self.url if q < 0 else self.url[:q]


class RequestInfo:
    """What a strategy may know about the request being placed.

    ``headers`` are the client's header fields as received (names in their original case), a
    tuple the strategy reads but cannot change.
    The body fields are filled only when the pool's strategy sets ``needs_body`` (or a route
    matches on the model): ``model`` and ``user`` from an OpenAI-style JSON body, and
    ``prompt``, the text of every message in order (or the ``prompt`` of a completion),
    which prefix-affinity strategies key on. ``key`` is free for a strategy's own use, of any
    type.

    A plain class rather than a dataclass: one is made per request, and a dataclass's
    generated ``__init__`` would run as interpreted Python even in the compiled build.
    """

    __slots__ = ("headers", "key", "method", "model", "path", "prompt", "user")

    def __init__(
        self,
        method: str,
        path: str,
        headers: Sequence[tuple[bytes, bytes]] = (),
        model: str | None = None,
        user: str | None = None,
        prompt: str | None = None,
        key: Any = None,
    ) -> None:
        self.method = method
        self.path = path
        self.headers: Sequence[tuple[bytes, bytes]] = headers
        self.model = model
        self.user = user
        self.prompt = prompt
        # Any: a strategy's own, whatever it stores (typed, the compiled build would check it).
        self.key: Any = key

    def __repr__(self) -> str:
        return (
            f"RequestInfo(method={self.method!r}, path={self.path!r}, model={self.model!r}, "
            f"user={self.user!r}, prompt={self.prompt!r}, key={self.key!r})"
        )

    def header(self, name: bytes) -> bytes | None:
        """The first value of header ``name`` (lower case), or ``None``."""
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None
