"""HTTP/1.1 message pieces shared by both sides of the proxy: header hygiene and serialisation.

Parsing is llhttp's job (through httptools); this module only decides which headers cross the
proxy and writes heads and chunk frames. Header names are compared in lower case and written
back as they were received.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Final

from lb import native

Headers = list[tuple[bytes, bytes]]

# RFC 9110 section 7.6.1: connection-specific fields, never forwarded. Proxy-Authorization
# and Proxy-Authenticate are hop-by-hop too (RFC 9110 11.7).
HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)

REASONS: Final[dict[int, bytes]] = {s.value: s.phrase.encode() for s in HTTPStatus}

CRLF: Final = b"\r\n"
LAST_CHUNK: Final = b"0\r\n\r\n"


_STATUS_LINES: Final[dict[int, bytes]] = {
    status: b"HTTP/1.1 %d %s\r\n" % (status, reason) for status, reason in REASONS.items()
}


def status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    return line if line is not None else b"HTTP/1.1 %d Unknown\r\n" % status


def connection_tokens(headers: Headers) -> frozenset[bytes]:
    """Lower-cased names listed in ``Connection`` headers: hop-by-hop for this message too.

    Never ``host``: it is required on every HTTP/1.1 request, and naming it cannot drop it.
    """
    tokens: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b","))
    tokens.discard(b"host")
    return frozenset(tokens)


# The size lines of chunks up to 4 KiB (an SSE event is a few hundred bytes), made once.
CHUNK_HEADS: Final = [b"%x\r\n" % size for size in range(4096)]


def chunk_head(size: int) -> bytes:
    """The size line that opens a chunk of ``size`` bytes (formatted only past 4 KiB)."""
    return CHUNK_HEADS[size] if size < len(CHUNK_HEADS) else b"%x\r\n" % size


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body."""
    return chunk_head(len(data)) + data + CRLF


def last_chunk(trailers: Headers) -> bytes:
    """The terminating chunk, with trailer fields if any."""
    if not trailers:
        return LAST_CHUNK
    return b"0\r\n" + b"".join(b"%b: %b\r\n" % kv for kv in trailers) + CRLF


# Whether these modules run compiled: a few scans take the form that is fastest for each build.
COMPILED: Final = native.build_in_use == "compiled"

_PERCENT: Final = 37  # ord("%")
_DOT: Final = 46  # ord(".")
_SLASH: Final = 47  # ord("/")
# Percent-encoded octets of unreserved characters, decoded by normalization (RFC 3986 2.3).
_UNRESERVED: Final = frozenset(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~"
)


def needs_normalizing(url: bytes) -> bool:
    """Whether ``url`` holds a ``%``, ``/.`` or ``//``: the only targets
    :func:`normalize_target` may change (the query included, where it changes nothing).

    Interpreted, three finds in C are quickest; compiled, :func:`scan_target` is (there each
    bytes.find parses its arguments anew and costs more than that whole scan of a usual path).
    """
    if COMPILED:
        return scan_target(url)
    return url.find(b"%") >= 0 or url.find(b"/.") >= 0 or url.find(b"//") >= 0


def scan_target(url: bytes) -> bool:
    """:func:`needs_normalizing` in one pass by index, a C loop in the compiled build."""
    slash = False
    for i in range(len(url)):
        c = url[i]
        if c == _PERCENT or (slash and (c == _DOT or c == _SLASH)):  # noqa: SIM109 (C compares)
            return True
        slash = c == _SLASH
    return False


def normalize_target(url: bytes) -> bytes:
    """The request target with its path normalized, its query untouched.

    As Envoy's ``normalize_path`` and ``merge_slashes`` do: percent-encoded unreserved
    characters are decoded (RFC 3986 section 6.2.2.2; ``%2F`` stays encoded), dot segments are
    removed (section 5.2.4) and runs of slashes merged, so that ``/%70rivate``, ``/a/../private``
    and ``//private`` are all ``/private`` for route matching and for the backend alike. A
    path that has nothing to normalize comes back equal; callers skip the call for a target
    without ``%``, ``/.`` or ``//``.
    """
    path, question, query = url.partition(b"?")
    if not path.startswith(b"/"):
        return url
    if path.find(b"%") >= 0:
        path = _decode_unreserved(path)
    out: list[bytes] = []
    segments = path.split(b"/")
    for segment in segments[1:-1]:
        if segment == b"..":
            if out:
                out.pop()
        elif segment and segment != b".":
            out.append(segment)
    last = segments[-1]
    if last == b"..":
        if out:
            out.pop()
        last = b""
    elif last == b".":
        last = b""
    out.append(last)
    return b"/" + b"/".join(out) + question + query


def _decode_unreserved(path: bytes) -> bytes:
    pieces = path.split(b"%")
    out = [pieces[0]]
    for piece in pieces[1:]:
        code = piece[:2]
        try:
            byte = int(code, 16) if len(code) == 2 else -1
        except ValueError:
            byte = -1
        if byte in _UNRESERVED:
            out.append(bytes((byte,)) + piece[2:])
        else:
            out.append(b"%" + piece)
    return b"".join(out)
