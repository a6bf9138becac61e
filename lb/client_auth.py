"""Client API keys: a route may require ``Authorization: Bearer KEY`` or ``api-key: KEY``.

Keys are compared in constant time, against every configured key whatever the outcome, so the
time taken says nothing about how close a guess was. A missing or wrong key is answered 401
before anything reaches a backend. The key header is removed from the forwarded request
unless the route sets ``forward_key``; it is never logged (the access log has no headers).
"""

from __future__ import annotations

import hmac
from typing import Final

from lb.errors import Unauthorized
from lb.request import IncomingRequest

_AUTHORIZATION: Final = b"authorization"
_API_KEY: Final = b"api-key"


class ClientKeys:
    """The keys one route accepts."""

    def __init__(self, keys: frozenset[str], *, forward_key: bool = False) -> None:
        self._keys = tuple(k.encode() for k in sorted(keys))
        self.forward_key = forward_key

    def check(self, req: IncomingRequest) -> None:
        """Raise :class:`Unauthorized` unless ``req`` carries an accepted key; then drop the
        key header from the request unless ``forward_key``."""
        self.verify(req)
        if not self.forward_key:
            req.headers = [(n, v) for n, v in req.headers if n.lower() not in _KEY_HEADERS]
            req.names = None

    def verify(self, req: IncomingRequest) -> None:
        """Raise :class:`Unauthorized` unless ``req`` carries an accepted key."""
        presented: bytes | None = None
        for name, value in req.headers:
            lname = name.lower()
            if lname == _AUTHORIZATION:
                scheme, _, token = value.strip().partition(b" ")
                if scheme.lower() == b"bearer":
                    presented = token.strip()
            elif lname == _API_KEY and presented is None:
                presented = value.strip()
        if not presented:
            raise Unauthorized("an API key is required (Authorization: Bearer KEY or api-key)")
        accepted = False
        for key in self._keys:
            accepted |= hmac.compare_digest(presented, key)
        if not accepted:
            raise Unauthorized("invalid API key")


_KEY_HEADERS: Final = frozenset({_AUTHORIZATION, _API_KEY})
