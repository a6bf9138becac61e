"""The errors a client can see, and the one JSON shape they are rendered in.

Low-level failures (socket errors, parser errors, timeouts) are mapped to these at the boundary
where they happen; everything above works with this short, flat hierarchy.
"""

from __future__ import annotations

import json
import math


class ProxyError(Exception):
    """An error answered to the client with ``status`` and a JSON body of ``type``/``message``."""

    status = 500
    type = "internal_error"

    def __init__(self, message: str, *, pool: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.pool = pool
        self.headers: list[bytes] = []  # extra response header lines, e.g. b"retry-after: 1\r\n"


class BadRequest(ProxyError):
    status = 400
    type = "bad_request"


class NoRoute(ProxyError):
    status = 404
    type = "no_route"


class ModelNotFound(ProxyError):
    """No route serves the model a request named; answered in the OpenAI error shape."""

    status = 404
    type = "invalid_request_error"
    code = "model_not_found"

    def __init__(self, model: str) -> None:
        super().__init__(f"The model `{model}` does not exist or is not served here.")
        self.model = model


class ModelMissing(ProxyError):
    """A route matches on the model, and the request's JSON body names none."""

    status = 400
    type = "invalid_request_error"
    code = "model_missing"

    def __init__(self, message: str = "you must provide a model parameter") -> None:
        super().__init__(message)


class Unauthorized(ProxyError):
    """A route needs a client key the request lacks or gets wrong."""

    status = 401
    type = "unauthorized"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.headers = [b'www-authenticate: Bearer realm="lb"\r\n']


class RequestTimeout(ProxyError):
    status = 408
    type = "request_timeout"


class BodyTooLarge(ProxyError):
    status = 413
    type = "body_too_large"


class HeadersTooLarge(ProxyError):
    status = 431
    type = "headers_too_large"


class Rejected(ProxyError):
    """The pool is saturated: the queue is full or the wait expired."""

    type = "overloaded"

    def __init__(self, message: str, *, status: int, retry_after_s: int) -> None:
        super().__init__(message)
        self.status = status
        self.headers = [b"retry-after: %d\r\n" % retry_after_s]


class MethodNotAllowed(ProxyError):
    status = 405
    type = "method_not_allowed"


class VersionNotSupported(ProxyError):
    status = 505
    type = "http_version_not_supported"


class NotImplementedByProxy(ProxyError):
    """A request feature the proxy does not support (a transfer coding, a protocol upgrade)."""

    status = 501
    type = "not_implemented"


class UpstreamError(ProxyError):
    """Base of the failures of an upstream attempt (one backend, one try)."""


class UpstreamUnreachable(UpstreamError):
    """The backend could not be connected to (refused, unreachable, connect timeout)."""

    status = 502
    type = "backend_unreachable"


class UpstreamFailed(UpstreamError):
    """The backend closed, reset or spoke invalid HTTP before a complete response."""

    status = 502
    type = "backend_error"


class UpstreamStatus(UpstreamError):
    """The backend answered a status that is retried; raised when no retry could follow."""

    type = "backend_status"

    def __init__(self, message: str, *, status: int, retry_after_s: float | None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after_s = retry_after_s
        if retry_after_s is not None:
            self.headers = [b"retry-after: %d\r\n" % max(int(retry_after_s), 0)]


class NoBackendAvailable(ProxyError):
    status = 503
    type = "no_backend_available"

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        if retry_after_s is not None:  # the backends asked for quiet until then
            self.headers = [b"retry-after: %d\r\n" % max(math.ceil(retry_after_s), 1)]


class UpstreamTimeout(UpstreamError):
    status = 504
    type = "timeout"


def error_body(err: ProxyError) -> bytes:
    """The stable JSON error shape: ``{"error": {"type", "message", "pool"}}``.

    A model that is not served, or not named, also carries OpenAI's ``code`` and ``param``, so
    OpenAI SDKs raise their usual NotFoundError or BadRequestError.
    """
    error: dict[str, object] = {"type": err.type, "message": err.message, "pool": err.pool}
    if isinstance(err, ModelNotFound | ModelMissing):
        error["code"] = err.code
        error["param"] = "model"
    return json.dumps({"error": error}, separators=(",", ":")).encode()
