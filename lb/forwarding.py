"""Header hygiene: the head sent to a backend and the head sent back to the client.

Hop-by-hop fields (and fields named in ``Connection``) never cross the proxy. Framing is
re-derived on each side: the body length or ``Transfer-Encoding: chunked`` is written by the
proxy for the connection it writes to. ``X-Forwarded-*`` and the request id are set here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Final

from lb.http1 import HOP_BY_HOP, Headers, connection_tokens, status_line

_STRIP_FROM_REQUEST: Final = HOP_BY_HOP | {b"expect", b"content-length"}
# What a copy made by another HTTP client must not carry over (it frames its own body).
HOP_BY_HOP_REQUEST: Final = _STRIP_FROM_REQUEST | {b"host"}
_STRIP_FROM_RESPONSE: Final = HOP_BY_HOP
_FORWARDED: Final = frozenset({b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host"})
_NO_TOKENS: Final[frozenset[bytes]] = frozenset()


class _RequestIds:
    """A random prefix and a decimal counter: ``str`` of an int and a concatenation, both
    direct calls in the compiled build."""

    __slots__ = ("count", "prefix")

    def __init__(self) -> None:
        self.prefix = os.urandom(6).hex().encode() + b"-"
        self.count = 0

    def next(self) -> bytes:
        self.count += 1
        return self.prefix + str(self.count).encode()


_REQUEST_IDS: Final = _RequestIds()


def new_request_id() -> bytes:
    """A request id unique to this process run: a random prefix and a counter."""
    return _REQUEST_IDS.next()


def lowered_names(headers: Headers, names: list[bytes] | None) -> list[bytes]:
    """The lower-cased names of ``headers``: ``names`` when the parse noted them and they are
    still in step with the fields (a rewrite of the fields drops them), else made here."""
    if names is not None and len(names) == len(headers):
        return names
    return [name.lower() for name, _ in headers]


@dataclass(slots=True)
class ForwardingSettings:
    """How heads are rewritten; see ``lb.config.Headers`` for the defaults."""

    backend_header: bytes | None = b"x-lb-backend"
    request_id_header: bytes = b"x-request-id"
    forwarded: bool = True
    decision_header: bytes | None = b"x-lb-decision"
    # Every request field name request_head does more with than copy: one lookup tells an
    # ordinary field, which is most of them.
    request_special: frozenset[bytes] = field(init=False, repr=False)
    # Response field names never copied to the client (the proxy writes its own request id).
    response_dropped: frozenset[bytes] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.request_special = _STRIP_FROM_REQUEST | _FORWARDED | {self.request_id_header}
        self.response_dropped = _STRIP_FROM_RESPONSE | {self.request_id_header}


def request_head(
    method: bytes,
    url: bytes,
    headers: Headers,
    *,
    names: list[bytes] | None = None,
    host: bytes | None,
    default_host: bytes,
    client_ip: bytes,
    request_id: bytes,
    content_length: int | None,
    chunked: bool,
    settings: ForwardingSettings,
    connection_header: bool = True,
    upgrade: bytes | None = None,
) -> bytes:
    """The request line and headers to send upstream, framing and forwarding fields included.

    ``names``: the lower-cased names of ``headers``, in order, when the caller has them.
    ``connection_header``: False when the caller knows ``headers`` hold no ``Connection``
    field but ``keep-alive`` ones (whose field is hop-by-hop anyway), so that no token needs
    looking for. ``upgrade``: the request is a WebSocket handshake; its ``Connection:
    upgrade`` and ``Upgrade`` (hop-by-hop, so not copied) are sent on to the backend.
    """
    tokens = connection_tokens(headers) if connection_header else _NO_TOKENS
    rid_name = settings.request_id_header
    forwarded = settings.forwarded
    prior_xff: list[bytes] = []
    # Pieces joined once at the end: cheaper than formatting each line.
    out = [method, b" ", url, b" HTTP/1.1\r\n"]
    special = settings.request_special
    names = lowered_names(headers, names)
    for i in range(len(headers)):
        name, value = headers[i]
        lname = names[i]
        if lname in tokens:
            continue
        if lname in special:
            if lname in _STRIP_FROM_REQUEST or lname == rid_name:
                continue
            if forwarded:  # an X-Forwarded-* field: replaced by the proxy's own
                if lname == b"x-forwarded-for":
                    prior_xff.append(value)
                continue
        # Appends, not ``out += (...)``: the compiled build calls PyList_Append directly, where
        # a tuple would be built and concatenated.
        out.append(name)
        out.append(b": ")
        out.append(value)
        out.append(b"\r\n")
    if host is None:
        out += (b"host: ", default_host, b"\r\n")
    if forwarded:
        prior_xff.append(client_ip)
        xff = client_ip if len(prior_xff) == 1 else b", ".join(prior_xff)
        out += (b"x-forwarded-for: ", xff, b"\r\nx-forwarded-proto: http\r\n")
        if host is not None:
            out += (b"x-forwarded-host: ", host, b"\r\n")
    out += (rid_name, b": ", request_id, b"\r\n")
    if upgrade is not None:
        out += (b"connection: upgrade\r\nupgrade: ", upgrade, b"\r\n")
    if chunked:
        out.append(b"transfer-encoding: chunked\r\n\r\n")
    elif content_length is not None:
        out += (b"content-length: ", str(content_length).encode(), b"\r\n\r\n")
    else:
        out.append(b"\r\n")
    return b"".join(out)


def response_head(
    status: int,
    headers: Headers,
    *,
    chunked: bool,
    keep_alive: bool,
    http10_keep_alive: bool,
    extra: bytes,
    settings: ForwardingSettings,
    connection_header: bool = True,
    names: list[bytes] | None = None,
) -> bytes:
    """The status line and headers to send to the client.

    ``extra`` holds ready-made header lines the proxy adds (backend name, request id);
    ``connection_header`` and ``names`` are as for :func:`request_head`.
    """
    tokens = connection_tokens(headers) if connection_header else _NO_TOKENS
    dropped = settings.response_dropped
    out = [status_line(status)]
    names = lowered_names(headers, names)
    for i in range(len(headers)):
        name, value = headers[i]
        lname = names[i]
        if lname in dropped or lname in tokens:
            continue
        out.append(name)
        out.append(b": ")
        out.append(value)
        out.append(b"\r\n")
    if chunked:
        out.append(b"transfer-encoding: chunked\r\n")
    if not keep_alive:
        out.append(b"connection: close\r\n")
    elif http10_keep_alive:
        out.append(b"connection: keep-alive\r\n")
    out.append(extra)
    out.append(b"\r\n")
    return b"".join(out)
