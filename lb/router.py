"""Routing: which pool a request goes to, by path prefix, headers and method.

Routes are tried in order; the first that matches wins. Without routes, every request goes to
the first pool. With routes and no match, the request is answered 404.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lb.client_auth import ClientKeys
from lb.downstream import IncomingRequest
from lb.errors import NoRoute
from lb.pool import Pool
from lb.retry import RetryPolicy


@dataclass(frozen=True, slots=True)
class Route:
    """One routing rule; ``headers`` names are lower case and compared exactly on value."""

    pool: Pool
    path_prefix: bytes = b"/"
    headers: tuple[tuple[bytes, bytes], ...] = ()
    methods: frozenset[bytes] | None = None
    retry: RetryPolicy | None = None  # overrides the pool's
    auth: ClientKeys | None = None  # client API keys required on this route

    @property
    def retry_policy(self) -> RetryPolicy:
        return self.retry if self.retry is not None else self.pool.retry

    def matches(self, req: IncomingRequest) -> bool:
        if not req.url.startswith(self.path_prefix):
            return False
        if self.methods is not None and req.method not in self.methods:
            return False
        for want_name, want_value in self.headers:
            for name, value in req.headers:
                if name.lower() == want_name and value == want_value:
                    break
            else:
                return False
        return True


class Router:
    """Maps a request to a route; raises :class:`NoRoute` when routes exist and none match."""

    def __init__(self, routes: Sequence[Route], default: Pool) -> None:
        self.routes = tuple(routes)
        self.default = Route(pool=default)

    def match(self, req: IncomingRequest) -> Route:
        if not self.routes:
            return self.default
        for route in self.routes:
            if route.matches(req):
                return route
        raise NoRoute(f"no route for {req.method.decode()} {req.path.decode(errors='replace')}")
