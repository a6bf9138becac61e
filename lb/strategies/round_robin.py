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

Large pools. The scan above is linear in the candidates (it runs compiled, in
:mod:`lb.rotation`, but a pick over 1,000 backends would still cost a thousand dictionary
updates), so pools of more than
:data:`SMOOTH_MAX_BACKENDS` (32) backends use an earliest-deadline-first schedule instead
(stride scheduling: Waldspurger and Weihl, "Stride Scheduling", MIT/LCS/TM-528, 1995; the
schedule of Envoy's ``EdfScheduler``, ``source/common/upstream/edf_scheduler.h``), kept in a
binary heap so a pick costs O(log n). Turn ``k`` (0, 1, 2, ...) of the backend at position
``i`` of ``n`` has the deadline

    deadline = (k + phase) / weight           phase = (i + 1) / n

and a pick takes the earliest deadline and schedules that backend's next turn. In each unit
of deadline every backend has exactly ``weight`` turns (integer weights), so any ``W =
sum(weights)`` picks starting at a multiple of ``W`` give each backend exactly its weight, and
equal weights rotate in pool order. The phases spread the backends over the unit, so a
heavy backend's turns fall between the light ones' (weight 5 among weight-1 backends: every
fifth of the cycle, not five in a row), which is the smoothness nginx's scan gives. Deadlines
are computed afresh from ``k``, not accumulated, so rounding does not drift. What differs
from the scan:

- a backend whose turn comes while it is not a candidate (unhealthy, ejected, drained, full,
  already tried for this request) *loses* that turn: its next one is scheduled as if it had
  been picked. It comes back in step with the others, without a burst to catch up, and skipping
  it costs one heap step per turn it misses: a pick costs O(log n) times the pool's total
  weight over the candidates' (1 while all are candidates, at most 2 outside panic mode);
- a weight change (slow start, the admin API) takes effect from the backend's next turn: that
  turn's deadline was set with the old weight. From there its deadlines go on as
  ``last + k / weight``.
"""

from __future__ import annotations

import heapq
import random
import time
from collections.abc import Container, Mapping, Sequence
from typing import Any, ClassVar

from lb.backend import Backend
from lb.rotation import smooth_pick
from lb.strategies.base import Clock, RequestInfo, Strategy

# Pools of up to this many backends use nginx's smooth scan; larger ones the heap schedule.
SMOOTH_MAX_BACKENDS = 32


class RoundRobin(Strategy):
    """Smooth weighted round robin over the candidates, by ``Backend.effective_weight``.

    The effective weight is the configured weight, ramped up during slow start. Pools of up to
    ``SMOOTH_MAX_BACKENDS`` backends use nginx's scan, larger ones the earliest-deadline-first
    heap (see the module docstring).

    Takes no options. Keeps one current weight (or one deadline) per backend of the pool;
    ``pick`` requires the candidates to come from the pool it was built with (a ``KeyError``
    otherwise, from the scan; the heap returns a candidate it knows of, or the first one).
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
        self.uses_heap = len(self.backends) > SMOOTH_MAX_BACKENDS
        # nginx's `current_weight`, keyed by backend (identity-hashed: Backend has eq=False).
        self._current: dict[Backend, float] = (
            {} if self.uses_heap else dict.fromkeys(self.backends, 0.0)
        )
        # The heap schedule: (deadline of the next turn, position in the pool) per backend, and
        # for each position the base, phase, turn and weight its deadlines are computed with.
        self._heap: list[tuple[float, int]] = []
        self._base: list[float] = []
        self._phase: list[float] = []
        self._turns: list[int] = []
        self._weights: list[float] = []
        if self.uses_heap:
            n = len(self.backends)
            self._weights = [b.effective_weight for b in self.backends]
            self._base = [0.0] * n
            self._phase = [(i + 1) / n for i in range(n)]
            self._turns = [0] * n
            self._heap = [(self._phase[i] / w, i) for i, w in enumerate(self._weights)]
            heapq.heapify(self._heap)
        # Membership of the last candidate tuple seen (the pool hands out the same tuple until
        # its eligible set changes), so a heap pick tests membership in O(1).
        self._members_of: tuple[Backend, ...] | None = None
        self._members: frozenset[Backend] = frozenset()

    def pick(self, candidates: Sequence[Backend], request: RequestInfo) -> Backend:
        if len(candidates) == 1:
            # As nginx's `peers->single`: nothing to choose, and the rotation is left as it is.
            return candidates[0]
        if self.uses_heap:
            return self._pick_by_deadline(candidates)
        return smooth_pick(self._current, candidates)

    def explain(self, backend: Backend, request: RequestInfo) -> str:
        """The rotation chose it: its turn, by weight, whatever its load."""
        return "next in turn"

    def _membership(self, candidates: Sequence[Backend]) -> Container[Backend]:
        """Something to test ``backend in candidates`` with in O(1)."""
        if isinstance(candidates, tuple):
            if candidates is not self._members_of:
                self._members_of = candidates
                self._members = frozenset(candidates)
            return self._members
        if isinstance(candidates, list):
            return set(candidates)
        return candidates  # a view (lb.pool.CandidateView) answers membership itself

    def _pick_by_deadline(self, candidates: Sequence[Backend]) -> Backend:
        """The earliest deadline among the candidates; earlier non-candidates lose their turn."""
        members = self._membership(candidates)
        heap, backends = self._heap, self.backends
        base, phase, turns, weights = self._base, self._phase, self._turns, self._weights
        # Each step schedules one turn. A candidate's next deadline is at most 2 / w_c away
        # (phase <= 1), and until then every other backend j has at most 2 * w_j / w_c + 1
        # turns: with weights within a factor of 10 (slow start's floor), under 21 n steps.
        # Past the bound (weights far apart, or one just raised from its floor) the first
        # candidate is taken.
        for _ in range(32 * len(heap)):
            deadline, position = heap[0]
            backend = backends[position]
            weight = backend.effective_weight
            if weight == weights[position]:
                turn = turns[position] + 1
            else:  # the weight changed: deadlines go on from this one at the new pace
                base[position] = deadline
                phase[position] = 0.0
                weights[position] = weight
                turn = 1
            turns[position] = turn
            heapq.heapreplace(heap, (base[position] + (turn + phase[position]) / weight, position))
            if backend in members:
                return backend
        return candidates[0]
