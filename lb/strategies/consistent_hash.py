"""Consistent hashing with bounded loads: a key keeps its backend unless that backend is too busy.

Sticky placement by key (a session, a user, a prompt prefix) keeps a model server's prefix
cache warm for that key, and consistent hashing keeps most keys in place when the backend set
changes. Plain consistent hashing lets one hot key overload its owner; the bounded-loads variant
caps every backend at a multiple ``c`` of the average load and sends the excess on around the
ring (Mirrokni, Thorup, Zadimoghaddam, "Consistent Hashing with Bounded Loads", SODA 2018,
arXiv:1608.01350; HAProxy's ``hash-balance-factor``, ``chash_server_is_eligible`` in
``src/lb_chash.c``, contributed by Andrew Rodland of Vimeo for its video caches, 2016).

The ring. Each backend gets ``virtual_nodes * weight`` points (option ``virtual_nodes``,
default 100; ``weight`` the configured weight), at ``H(f"{name}#{i}")``, built once (the
strategy is rebuilt when the backends change). Points depend on the backend's ``name`` only, so
adding or removing a backend moves only the keys whose owner it is or becomes, about ``1/n`` of
them, and every proxy instance computes the same ring. ``H`` is the first 8 bytes of BLAKE2b:
stable across processes (Python's ``hash()`` of a str is salted per process); well mixed
(``zlib.crc32`` is faster but linear over GF(2), so keys a few bits apart, such as numbered
session ids, get hashes a fixed pattern apart); 64 bits wide, so points practically never
collide; in the standard library, and well under a microsecond for short keys.

The key (option ``key``, default ``"prompt"``):

- ``"prompt"``: the first ``prefix_tokens`` tokens of the prompt (option, default 256), a token
  taken as 4 characters, so the first ``4 * prefix_tokens`` characters of
  ``RequestInfo.prompt``. Prompts opening with the same long system prompt therefore share
  a backend (and its prefix cache), and the bound below keeps that from overloading it;
- ``"user"``: the body's ``user`` field;
- ``{"header": "x-session-id"}``: that header's value; the body is then not read
  (``needs_body`` is False).

A request without its key (no header, no ``user``, no prompt) has no affinity to keep, and goes
to the least-loaded candidate by ``(in_flight + 1) / effective_weight``, ties at random. It is
not hashed by some other field: stickiness that depends on which fields a request happens to
carry would be surprising.

The bound. Over the candidates (in large pools, the pool: see the cost below), with
``total = sum(in_flight) + 1`` (counting this request) and ``W = sum(effective_weight)``,
backend ``b`` may take the request when

    in_flight[b] < ceil(c * total * effective_weight[b] / W)       (c = ``balance_factor``)

With equal weights that is ``ceil(c * average)`` with ``average = total / len(candidates)``,
the paper's capacity: no backend is given a request that takes it past it. Unequal weights
scale each backend's share, as HAProxy does (it distributes the rounding remainder exactly;
here each bound is rounded up). ``c`` (default 1.25) must be at least 1: some candidate is
then always under its bound, since ``sum(in_flight) < total <= sum(bounds)``.

The walk. The key's owner is the backend of the first point clockwise from ``H(key)`` (bisect).
If the owner is not a candidate (unhealthy, already tried, full) or is at its bound, the next
distinct backends clockwise are tried in turn; the first that is a candidate under its bound
wins. Should none be (only by float rounding), the least-loaded candidate is taken. A single
candidate is returned without hashing. ``explain`` gives ``hash owner``, ``hash owner
overloaded, next``, ``hash owner unavailable, next``, ``no key: least loaded``, ``only
candidate`` or ``all over bound: least loaded``.

Cost per pick: one hash of the key (O(key length), at most ``4 * prefix_tokens`` characters),
O(log P) for the bisect over ``P = virtual_nodes * sum(weights)`` points, and O(1) ring steps
while the owner can take the request (at most P, about ``n ln n`` expected, to meet every
backend once). Membership in the candidates is O(1): the pool hands out the same eligible
tuple until it changes (its set is kept here) or a view that answers membership itself. An
idle owner is under any bound, so it is taken without computing one; otherwise the bound
needs ``total`` and ``W``. Over up to :data:`EXACT_TOTALS_MAX` (32) candidates they are summed
over the candidates (~50 ns each); over more, they are read from the pool's running totals
(:class:`lb.backend.PoolLoad`: in-flight kept by :class:`lb.load.Attempt`, eligible weight by
the pool), in O(1). What that changes in large pools: ``total`` counts every request in flight
on the pool's backends, including the few an unavailable backend may still be finishing, and
``W`` includes backends already tried for this request, so on a retry the bounds are slightly
tighter; the walk falls back to the least loaded should no candidate be under its bound.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import random
import time
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from lb.backend import Backend
from lb.strategies.affinity import Membership
from lb.strategies.base import Clock, RequestInfo, Strategy

CHARS_PER_TOKEN = 4  # the usual rule of thumb for English text with BPE tokenizers
# Float rounding guard for the bound: c * total * w / W must not round up past an integer.
BOUND_EPSILON = 1e-9
# Over more candidates than this, the bound reads the pool's running totals instead of a sum.
EXACT_TOTALS_MAX = 32


def ring_hash(data: bytes) -> int:
    """The 64-bit ring position of ``data``: the first 8 bytes of BLAKE2b, big-endian."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def _key_bytes(text: str) -> bytes:
    # A JSON body may carry lone surrogates ("\ud800"); hash them rather than fail.
    return text.encode("utf-8", "surrogatepass")


# Bounds of the ring, built at start-up and on every reload: each point costs a hash and memory.
MAX_VIRTUAL_NODES = 10_000
MAX_RING_POINTS = 4_000_000


class ConsistentHash(Strategy):
    """Consistent hashing with bounded loads over a ring of virtual nodes.

    Options (defaults): ``key`` (``"prompt"``; or ``"user"``, or ``{"header": name}``),
    ``virtual_nodes`` (100, points per unit of weight), ``balance_factor`` (1.25, >= 1),
    ``prefix_tokens`` (256, for the prompt key). A bad value raises ``ValueError``.
    ``needs_body`` is True unless the key is a header. ``self.rng`` breaks least-loaded ties.
    """

    name: ClassVar[str] = "consistent_hash"
    options_allowed: ClassVar[frozenset[str]] = frozenset(
        {"key", "virtual_nodes", "balance_factor", "prefix_tokens"}
    )

    def __init__(
        self,
        backends: Sequence[Backend],
        *,
        rng: random.Random | None = None,
        clock: Clock = time.monotonic,
        options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(backends, rng=rng, clock=clock, options=options)
        opts = self.options
        key = opts.get("key", "prompt")
        self.key_source: str  # "prompt", "user" or "header"
        self.header_name: bytes | None = None
        if key in ("prompt", "user"):
            self.key_source = key
        elif (
            isinstance(key, Mapping)
            and list(key) == ["header"]
            and isinstance(key["header"], str)
            and key["header"].strip()
        ):
            self.key_source = "header"
            try:
                self.header_name = key["header"].strip().lower().encode("ascii")
            except UnicodeEncodeError:
                raise ValueError(
                    f"option 'key' for strategy {self.name!r}: header name {key['header']!r} "
                    "is not ASCII"
                ) from None
        else:
            raise ValueError(
                f"option 'key' for strategy {self.name!r} must be 'prompt', 'user' or "
                f"{{header: <name>}}, got {key!r}"
            )
        self.needs_body = self.key_source != "header"
        self.virtual_nodes = self._positive_int("virtual_nodes", opts.get("virtual_nodes", 100))
        if self.virtual_nodes > MAX_VIRTUAL_NODES:
            raise ValueError(
                f"option 'virtual_nodes' for strategy {self.name!r} must be at most "
                f"{MAX_VIRTUAL_NODES}, got {self.virtual_nodes!r}"
            )
        ring_points = self.virtual_nodes * sum(backend.weight for backend in self.backends)
        if ring_points > MAX_RING_POINTS:
            raise ValueError(
                f"option 'virtual_nodes' for strategy {self.name!r}: {self.virtual_nodes} per "
                f"unit of weight makes a ring of {ring_points} points (at most {MAX_RING_POINTS}); "
                "lower virtual_nodes or the backends' weights"
            )
        self.prefix_tokens = self._positive_int("prefix_tokens", opts.get("prefix_tokens", 256))
        self.prefix_chars = self.prefix_tokens * CHARS_PER_TOKEN
        factor = opts.get("balance_factor", 1.25)
        if (
            isinstance(factor, bool)
            or not isinstance(factor, int | float)
            or not math.isfinite(factor)
            or factor < 1
        ):
            raise ValueError(
                f"option 'balance_factor' for strategy {self.name!r} must be a number >= 1, "
                f"got {factor!r}"
            )
        self.balance_factor = float(factor)

        # The ring, as two parallel lists sorted by position (ties, practically never, by
        # backend order so the ring is still deterministic).
        points = sorted(
            (ring_hash(_key_bytes(f"{backend.name}#{i}")), order, backend)
            for order, backend in enumerate(self.backends)
            for i in range(self.virtual_nodes * backend.weight)
        )
        self._positions = [position for position, _, _ in points]
        self._owners = [backend for _, _, backend in points]
        self._distinct = len(set(self._owners))
        self._reason = ""
        # Membership of the last candidate tuple seen (see "Cost" in the module docstring).
        self._members = Membership()  # O(1) `in` over the candidates

    def _positive_int(self, option: str, value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(
                f"option {option!r} for strategy {self.name!r} must be an integer >= 1, "
                f"got {value!r}"
            )
        return value

    def key_of(self, request: RequestInfo) -> bytes | None:
        """The bytes ``request`` is hashed by, or ``None`` when it lacks the configured key."""
        source = self.key_source
        if source == "prompt":
            prompt = request.prompt
            return _key_bytes(prompt[: self.prefix_chars]) if prompt else None
        if source == "user":
            user = request.user
            return _key_bytes(user) if user else None
        assert self.header_name is not None
        return request.header(self.header_name) or None

    def pick(self, candidates: Sequence[Backend], request: RequestInfo) -> Backend:
        key = self.key_of(request)
        if key is None:
            self._reason = "no key: least loaded"
            return self._least_loaded(candidates)
        if len(candidates) == 1 or not self._owners:
            self._reason = "only candidate"
            return candidates[0]

        eligible = self._members.of(candidates)
        owners = self._owners
        count = len(owners)
        start = bisect.bisect_left(self._positions, ring_hash(key))
        if start == count:
            start = 0
        owner = owners[start]
        if owner.in_flight == 0 and owner in eligible:
            # Idle: under any bound, since ceil(c * total * w / W) >= 1 for total >= 1.
            self._reason = "hash owner"
            return owner

        # Bound of backend b: ceil(c * total * effective_weight[b] / W), divided last so that
        # equal weights give exactly ceil(c * total / n).
        pool_load = owner.pool_load
        if (
            len(candidates) > EXACT_TOTALS_MAX
            and pool_load is not None
            and pool_load.eligible_weight > 0
        ):
            total = pool_load.in_flight + 1  # the pool's running totals: O(1)
            weight_sum = pool_load.eligible_weight
        else:
            total = 1
            weight_sum = 0.0
            for backend in candidates:
                total += backend.in_flight
                weight_sum += backend.effective_weight
        c_total = self.balance_factor * total
        seen: set[Backend] = set()
        note = "hash owner"
        for step in range(count):
            backend = owners[(start + step) % count]
            if backend in seen:
                continue
            if backend in eligible and backend.in_flight < math.ceil(
                c_total * backend.effective_weight / weight_sum - BOUND_EPSILON
            ):
                self._reason = note
                return backend
            if not seen:  # the owner itself is passed over: say why
                note = (
                    "hash owner overloaded, next"
                    if backend in eligible
                    else "hash owner unavailable, next"
                )
            seen.add(backend)
            if len(seen) == self._distinct:
                break
        self._reason = "all over bound: least loaded"
        return self._least_loaded(candidates)

    def explain(self, backend: Backend, request: RequestInfo) -> str:
        """Why the last pick went where it did: the owner, a later backend, or least loaded."""
        return self._reason

    def _least_loaded(self, candidates: Sequence[Backend]) -> Backend:
        """The lowest ``(in_flight + 1) / effective_weight``, ties uniformly at random."""
        best = candidates[0]
        best_load = best.in_flight + 1.0
        best_weight = best.effective_weight
        ties = 1
        for backend in candidates[1:]:
            load = backend.in_flight + 1.0
            weight = backend.effective_weight
            # load / weight vs best_load / best_weight, cross-multiplied (weights are > 0).
            mine = load * best_weight
            theirs = best_load * weight
            if mine < theirs:
                best, best_load, best_weight, ties = backend, load, weight, 1
            elif mine == theirs:
                ties += 1  # reservoir sampling of size 1: each tie is kept with 1/k
                if self.rng.random() * ties < 1.0:
                    best = backend
        return best
