"""Smooth weighted round robin: every backend gets its weight's share, interleaved, not bursty.

The algorithm is nginx's (``ngx_http_upstream_get_peer`` in
``src/http/ngx_http_upstream_round_robin.c``). Each backend carries a *current weight*,
starting at 0. On each pick, over the eligible candidates only:

    current[c] += weight[c]               for every candidate c
    chosen      = argmax_c current[c]     (the first one in pool order on a tie)
    current[chosen] -= sum_c weight[c]

Over any run of ``W = sum(weights)`` picks with an unchanged candidate set, each backend is
chosen exactly ``weight`` times, and its picks are spread through the cycle: weights 1 and 2
give ``B A B B A B ...``, never ``A A`` or ``B B B``. Candidates left out of a pick (unhealthy,
or already tried for this request) neither gain nor pay, exactly as nginx skips failed peers,
so the rotation resumes where it was when they return.

Unlike nginx, the weight does not shrink on errors (``Backend.effective_weight`` only ramps up
during slow start): failures are handled by
health checking and retries, outside the strategy.
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from lb.backend import Backend
from lb.strategies.base import Clock, RequestInfo, Strategy


class RoundRobin(Strategy):
    """Smooth weighted round robin over the candidates, by ``Backend.effective_weight``.

    The effective weight is the configured weight, ramped up during slow start.

    Takes no options. Keeps one current weight per backend of the pool; ``pick`` requires the
    candidates to come from the pool it was built with (a ``KeyError`` otherwise).
    """

    name: ClassVar[str] = "round_robin"
    options_allowed: ClassVar[frozenset[str]] = frozenset()

    def __init__(
        self,
        backends: Sequence[Backend],
        *,
        rng: random.Random | None = None,
        clock: Clock = time.monotonic,
        options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(backends, rng=rng, clock=clock, options=options)
        # nginx's `current_weight`, keyed by backend (identity-hashed: Backend has eq=False).
        self._current: dict[Backend, float] = dict.fromkeys(self.backends, 0.0)

    def pick(self, candidates: Sequence[Backend], request: RequestInfo) -> Backend:
        if len(candidates) == 1:
            # As nginx's `peers->single`: nothing to choose, and the rotation is left as it is.
            return candidates[0]
        current = self._current
        it = iter(candidates)
        best = next(it)
        total = best.effective_weight
        best_current = current[best] + total
        current[best] = best_current
        for backend in it:
            weight = backend.effective_weight
            total += weight
            value = current[backend] + weight
            current[backend] = value
            if value > best_current:  # strict: ties go to the earlier backend, as in nginx
                best = backend
                best_current = value
        current[best] = best_current - total
        return best
