"""Routing: which pool a request goes to, by path prefix, headers, method and model.

Routes are tried in order; the first that matches wins. Without routes, every request goes to
the first pool. With routes and no match, the request is answered 404 (in the OpenAI error
shape when it named a model no route serves). A route may split its requests between pools by
weight (a canary) and mirror a share of them to a shadow pool.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from lb.client_auth import ClientKeys
from lb.errors import ModelMissing, ModelNotFound, NoRoute, Unauthorized
from lb.pool import Pool
from lb.request import IncomingRequest
from lb.retry import RetryPolicy


@dataclass(frozen=True, slots=True)
class Route:
    """One routing rule; ``headers`` names are lower case and compared exactly on value."""

    pool: Pool
    name: str = "default"
    path_prefix: bytes = b"/"
    headers: tuple[tuple[bytes, bytes], ...] = ()
    methods: frozenset[bytes] | None = None
    retry: RetryPolicy | None = None  # overrides the pool's
    auth: ClientKeys | None = None  # client API keys required on this route
    models: frozenset[str] | None = None  # matches these body models only
    split: tuple[tuple[Pool, int], ...] = ()  # (pool, weight): chosen per request
    mirror: Pool | None = None
    mirror_share: float = 0.0  # 0..1

    def retry_policy(self, pool: Pool) -> RetryPolicy:
        return self.retry if self.retry is not None else pool.retry

    def choose_pool(self, rng: random.Random) -> Pool:
        """The pool for one request: the route's, or one of its split by weight."""
        split = self.split
        if not split:
            return self.pool
        total = sum(w for _, w in split)
        draw = rng.random() * total
        for pool, weight in split:
            draw -= weight
            if draw < 0:
                return pool
        return split[-1][0]

    def matches(self, req: IncomingRequest) -> bool:
        """Path, method and headers match (the model is checked separately)."""
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
        self.model_routes = any(r.models is not None for r in self.routes)
        self.any_auth = any(r.auth is not None for r in self.routes)

    def pools_reached(self) -> frozenset[str]:
        """Names of the pools a request can be routed to (split sides included; a mirror's
        shadow pool, which answers no client, is not)."""
        if not self.routes:
            return frozenset((self.default.pool.name,))
        names = set()
        for route in self.routes:
            names.add(route.pool.name)
            names.update(pool.name for pool, _ in route.split)
        return frozenset(names)

    def authorize_early(self, req: IncomingRequest) -> None:
        """Before reading a body or answering for the proxy: if every route that could take
        ``req`` requires an API key, one of them must accept it (raises ``Unauthorized``)."""
        guarded = [r for r in self.routes if r.matches(req)]
        if not guarded or any(r.auth is None for r in guarded):
            return
        error: Exception | None = None
        for route in guarded:
            assert route.auth is not None
            try:
                route.auth.verify(req)
                return
            except Unauthorized as exc:
                error = exc
        assert error is not None
        req.route = guarded[0].name  # refused there: counted and logged under that route
        raise error

    def needs_model(self, req: IncomingRequest) -> bool:
        """True if a route that could take ``req`` matches on the body's model."""
        if not self.model_routes:
            return False
        return any(r.models is not None and r.matches(req) for r in self.routes)

    def match(self, req: IncomingRequest, model: str | None = None) -> Route:
        if not self.routes:
            return self.default
        for route in self.routes:
            if route.matches(req) and (route.models is None or model in route.models):
                return route
        if self.needs_model(req):
            if model is not None:
                raise ModelNotFound(model)
            if req.chunked or req.content_length is not None:
                raise ModelMissing()  # a body (even empty) naming no model, where one is needed
        raise NoRoute(f"no route for {req.method.decode()} {req.path.decode(errors='replace')}")
