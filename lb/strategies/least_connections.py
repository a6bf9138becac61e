"""Weighted least connections: send the request where the fewest requests are in flight per weight.

Each candidate is scored by the load it would carry *after* taking this request, per unit of
weight, and the lowest score wins:

    score = (in_flight + 1 + recent_failures) / weight

``recent_failures`` is ``Backend.failure_score_at(now)``: each failed attempt adds 1, decaying
with the pool's ``decay_s`` (and halved by a success). A backend that fails fast (an immediate
503 or 429) holds almost nothing in flight and would otherwise look the least loaded of all;
its failures count as phantom requests instead, and fade so it is tried again once quiet.

Ties are broken uniformly at random. Scores are compared cross-multiplied,
``(i_a + 1) * w_b < (i_b + 1) * w_a``, so ties are detected exactly while no backend has recent
failures. Over more than 16 candidates only two are compared (see "Cost, and large pools").

Why ``+ 1``. Without it every idle backend scores 0 whatever its weight, so weight would only
start to matter once requests pile up. With it:

- among idle backends the heaviest wins: weight 2 scores 0.5, weight 1 scores 1.0;
- backends fill in proportion to weight: a weight-2 backend with one request in flight (2/2)
  ties an idle weight-1 backend (1/1), and with two in flight (3/2) loses to it, so a weight-2
  backend takes its second request before a weight-1 backend takes its second, and under
  concurrency in-flight counts stay within one request of proportional to weight.

Said honestly, the cost of the ``+ 1``: under very light load (at most one request in flight at
a time) every request finds all backends idle, so the heaviest backend gets *all* of them.
Weight here is capacity under concurrency, not a share of traffic; use ``round_robin`` for
shares. Equal-weight idle backends tie and share the traffic evenly.

Sources: HAProxy's ``leastconn`` (``src/lb_fwlc.c``) keys a busy server at
``(inflight + 1) * SRV_EWGHT_MAX / eweight``, the same score, but keys an idle server at 0, so
idle servers tie whatever their weight; here the ``+ 1`` applies to idle backends too. Envoy's
``least_request`` policy uses, for unequal weights, the effective weight
``weight / (active_requests + 1) ^ active_request_bias``, with bias 1 the reciprocal of this
score (Envoy schedules in proportion to it, and picks by power of two choices when weights are
equal; here the best backend is taken outright, except in large equal-weight pools, below).

Cost, and large pools. A full scan costs ~100 ns per candidate on CPython 3.11: ~2 us over 16
candidates, ~100 us over 1,000 (``python -m benchmarks.picking``). So above
:data:`FULL_SCAN_MAX_CANDIDATES` (16) candidates a pick draws two distinct candidates and takes
the one with the lower score instead (power of two choices; Mitzenmacher, "The Power of Two
Choices in Randomized Load Balancing", IEEE TPDS 2001), and its cost no longer grows with the
pool. In equal-weight pools the two are drawn uniformly: Envoy's rule, ``least_request`` with
``choice_count`` 2. With unequal weights uniform draws would cap what any backend can receive at
about ``2 / n`` of the picks, so a backend weighing more than twice the average could never take
its share (simulated, weights 10 and 1: the heavy backends took 10% of requests instead of
77%); there each draw is proportional to effective weight instead, by rejection (a uniform
draw kept with probability ``weight / max_weight``; ``max_weight / mean weight`` draws
expected, at most :data:`MAX_DRAWS`), and the same weights then fill in proportion (tested:
ten backends of weight 10 and thirty of weight 1 take 69-85% and 15-31% of 1,300 requests).
What changes against the full scan: a pick is the better of two, not always the least loaded.
The most loaded candidate is still never chosen while no other ties its score, and under
steady load the busiest backend holds a few requests above the average (simulated, 100 to
1,000 backends averaging 8 in flight: about 3, against at most 1 for the full scan), the gap
growing as ``log log n``.

Like Envoy's, this reads the very counter that is exported as a metric (``Backend.in_flight``,
written by :class:`lb.load.Attempt`): what you see is what it used.
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from lb.backend import Backend, decay_seconds
from lb.strategies.base import Clock, RequestInfo, Strategy

# Above this many candidates a pick compares two drawn at random instead of scanning them all
# (the module docstring says why, and how the draw respects unequal weights).
FULL_SCAN_MAX_CANDIDATES = 16
# Draws of a weighted sample (and redraws of a second one equal to the first) before giving up.
MAX_DRAWS = 64


class LeastConnections(Strategy):
    """Pick the candidate with the lowest ``(in_flight + 1 + recent_failures) / weight``.

    Above ``FULL_SCAN_MAX_CANDIDATES`` candidates: the lower of two candidates drawn at random
    (uniformly when the pool's weights are equal, else in proportion to weight).
    Ties are broken at random with ``self.rng``. Option ``decay_s`` (default
    ``lb.backend.DEFAULT_DECAY_S``): how fast recent failures fade.
    """

    name: ClassVar[str] = "least_connections"
    options_allowed: ClassVar[frozenset[str]] = frozenset({"decay_s"})

    def __init__(
        self,
        backends: Sequence[Backend],
        *,
        rng: random.Random | None = None,
        clock: Clock = time.monotonic,
        options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(backends, rng=rng, clock=clock, options=options)
        try:
            self.decay_s = decay_seconds(self.options)
        except ValueError as exc:
            raise ValueError(f"option 'decay_s' for strategy {self.name!r} {exc}") from None
        # Configured weights are fixed for the strategy's life (it is rebuilt with the pool),
        # except through the admin API: max_weight follows a weight seen above it.
        self.equal_weights = len({backend.weight for backend in self.backends}) <= 1
        self.max_weight = float(max((b.weight for b in self.backends), default=1))

    def pick(self, candidates: Sequence[Backend], request: RequestInfo) -> Backend:
        n = len(candidates)
        if n == 1:
            return candidates[0]
        random = self.rng.random
        now = self.clock()
        decay_s = self.decay_s
        if n > FULL_SCAN_MAX_CANDIDATES:
            if self.equal_weights:
                # Two distinct indices, as in latency_weighted: i from n, j from the n - 1
                # others.
                i = int(random() * n)
                j = int(random() * (n - 1))
                if j >= i:
                    j += 1
                a = candidates[i]
                b = candidates[j]
            else:
                a = self._draw_by_weight(candidates, n)
                b = self._draw_by_weight(candidates, n)
                for _ in range(MAX_DRAWS):
                    if b is not a:
                        break
                    b = self._draw_by_weight(candidates, n)
            load_a = a.in_flight + 1.0
            if a.failure_score:
                load_a += a.failure_score_at(now, decay_s)
            load_b = b.in_flight + 1.0
            if b.failure_score:
                load_b += b.failure_score_at(now, decay_s)
            # load_b / weight_b < load_a / weight_a, cross-multiplied. On a tie keep a: the
            # pair was drawn in random order, so each of the two is equally likely.
            if load_b * a.effective_weight < load_a * b.effective_weight:
                return b
            return a
        it = iter(candidates)
        best = next(it)
        best_load = best.in_flight + 1.0
        if best.failure_score:
            best_load += best.failure_score_at(now, decay_s)
        best_weight = best.effective_weight
        ties = 1
        for backend in it:
            load = backend.in_flight + 1.0
            if backend.failure_score:
                load += backend.failure_score_at(now, decay_s)
            weight = backend.effective_weight
            # load / weight  vs  best_load / best_weight, cross-multiplied (weights are > 0).
            mine = load * best_weight
            theirs = best_load * weight
            if mine < theirs:
                best = backend
                best_load = load
                best_weight = weight
                ties = 1
            elif mine == theirs:
                # Reservoir sampling of size 1: the k-th tied backend replaces the choice with
                # probability 1/k, which leaves each of the k equally likely, with no list.
                # The score is unchanged, so best_load and best_weight still describe it.
                ties += 1
                if random() * ties < 1.0:
                    best = backend
        return best

    def _draw_by_weight(self, candidates: Sequence[Backend], n: int) -> Backend:
        """A candidate drawn with probability proportional to its effective weight, by
        rejection: uniform draws, each kept with probability ``weight / max_weight``
        (``max_weight / mean weight`` draws expected; after :data:`MAX_DRAWS`, the last)."""
        random = self.rng.random
        max_weight = self.max_weight
        backend = candidates[0]
        for _ in range(MAX_DRAWS):
            backend = candidates[int(random() * n)]
            weight = backend.effective_weight
            if weight > max_weight:  # raised through the admin API since the pool was built
                self.max_weight = max_weight = weight
            if random() * max_weight < weight:
                return backend
        return backend
