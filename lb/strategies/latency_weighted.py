"""Latency-weighted power of two choices: of two random candidates, take the cheaper.

Cost of a backend at time ``now``:

    cost = rtt_at(now) * (in_flight + 1) / weight

``rtt_at`` is the backend's peak-EWMA latency estimate (:meth:`lb.backend.Backend.rtt_at`,
written by :class:`lb.load.Attempt`), of the time to response headers or, for a token stream,
to its first token (a model server sends a stream's headers before it queues and prefills the
request, so only the first token shows a slow or busy replica): a sample above the estimate
replaces it at once, a sample
below it is blended in with weight ``1 - exp(-elapsed / decay_s)``, and between samples it
relaxes towards ``DEFAULT_RTT_S``, so a backend that was once slow is tried again after a while.
Failed attempts are recorded there as *slow* samples (at least twice the estimate and at least
``FAILURE_FLOOR_S``), so a backend that fails fast (an immediate 503 or 429, a refused
connection) looks expensive, not fast. ``(in_flight + 1)`` turns latency into expected queueing
cost, as in tower; dividing by ``weight`` lets a bigger server carry proportionally more.

Each pick draws two distinct candidates uniformly at random and returns the one with the lower
cost; with exactly two candidates both are compared. Comparing two random choices instead of
scanning all keeps picks O(1) and, unlike always taking the global minimum, does not stampede
every proxy worker onto the same backend between load updates; the costliest candidate is never
chosen while there are at least two (Mitzenmacher, "The Power of Two Choices in Randomized Load
Balancing", IEEE TPDS 2001).

Sources: tower's ``load::peak_ewma`` (cost = estimate * (pending + 1)) with
``balance::p2c``; Finagle's ``PeakEwma`` load metric with its P2C balancer, from which tower's is
taken; linkerd's proxy balances the same way.

Option ``decay_s`` (seconds, default :data:`lb.backend.DEFAULT_DECAY_S`): the time constant
used to decay estimates when reading them. Keep it equal to the ``decay_s`` given to
:class:`lb.load.Attempt`, which folds the samples in.
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from lb.backend import Backend, decay_seconds
from lb.strategies.base import Clock, RequestInfo, Strategy


class LatencyWeighted(Strategy):
    """Power of two choices over ``rtt_at(now) * (in_flight + 1) / weight``.

    Options: ``decay_s`` (a positive number of seconds, default ``DEFAULT_DECAY_S``); any other
    value raises ``ValueError``. Uses ``self.rng`` to draw the two candidates and ``self.clock``
    to age the latency estimates.
    """

    name: ClassVar[str] = "latency_weighted"
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

    def pick(self, candidates: Sequence[Backend], request: RequestInfo) -> Backend:
        n = len(candidates)
        if n == 1:
            return candidates[0]
        if n == 2:
            a, b = candidates
        else:
            random = self.rng.random
            # Two distinct indices: draw i from n, j from the n - 1 others. int(random() * n)
            # is below n for every n under 2**53, and much cheaper than randrange.
            i = int(random() * n)
            j = int(random() * (n - 1))
            if j >= i:
                j += 1
            a = candidates[i]
            b = candidates[j]
        now = self.clock()
        decay_s = self.decay_s
        cost_a = a.rtt_at(now, decay_s) * (a.in_flight + 1) / a.effective_weight
        cost_b = b.rtt_at(now, decay_s) * (b.in_flight + 1) / b.effective_weight
        if cost_a < cost_b:
            return a
        if cost_b < cost_a:
            return b
        # An exact tie (two fresh, idle backends). Drawn pairs are already in random order, but
        # two candidates come in pool order: toss a coin, or the first would take every request.
        if n > 2 or self.rng.random() < 0.5:
            return a
        return b
