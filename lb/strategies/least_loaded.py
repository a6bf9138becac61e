"""Least loaded: score each candidate on the load its model server reports, and take the lowest.

In the spirit of the Gateway API Inference Extension's endpoint picker (its queue and
KV-cache-utilization scorers), each candidate gets

    score = queue_weight    * waiting_norm
          + kv_weight       * kv_usage
          + inflight_weight * in_flight_norm

and the lowest score wins, ties broken uniformly at random. The terms:

- ``waiting_norm = reported_waiting / max(reported_waiting over fresh candidates)``, or over 1
  when that max is 0: requests queued inside the engine, the strongest sign that a request
  sent there waits before its first token.
- ``kv_usage``: ``reported_kv_usage``, 0..1. A full KV cache means new requests wait for
  memory, or preempt running ones. A server that exports no KV gauge (TGI) is judged by its
  running batch instead, ``reported_running / max(reported_running over fresh candidates)``
  (or over 1): when no fresh candidate reports KV usage and some report a running count, that
  share stands in for the KV term.
- ``in_flight_norm = load / max(load over candidates)`` (or over 1), where ``load`` is the
  proxy's own ``in_flight`` plus its recent failures (``failure_score_at(now, decay_s)``),
  as in ``least_connections``: a backend that fails fast (an immediate 503) holds nothing in
  flight and may report an empty queue, and must not look idle because of it.

How it combines with the proxy's own counts. The reports (``Backend.reported_*``, written by
:class:`lb.load_report.LoadReporter`) lag by up to a scrape interval: requests the proxy sent
since the last scrape are not in them. Rather than guess how many of those the server has
queued, the in-flight term covers them: it is exact and current, so between two scrapes a
burst spreads out instead of piling onto the backend that looked emptiest at the last scrape.
Weights (``Backend.effective_weight``, hence slow start) are not used: a server's reports
already reflect its capacity (a bigger server drains its queue sooner).

Stale or missing reports are never trusted as idle. A candidate is *fresh* when its report is
at most ``max_age_s`` old (on ``self.clock``, which must be the reporter's clock) and holds a
queue or a KV value. For a term a candidate has no fresh value for, the estimate is
pessimistic: ``waiting_norm = 1`` (as loaded as the most loaded fresh candidate), and
``kv_usage`` = the highest fresh KV usage among the candidates (1 if none has one; 1 too for
the running share). Among such candidates their own in-flight counts decide. When no candidate at
all is fresh (the reporter is off, or every scrape fails) the scores say nothing, and the
pick falls back to the least in-flight load alone; :meth:`LeastLoaded.explain` says so.

Prefix match (``prefix_weight`` > 0). The endpoint picker adds a prefix-cache scorer to the
load scorers, so a request goes where its prompt's prefix is likely cached unless that server
is loaded enough to outweigh the saving. Here likewise, with ``prefix_weight`` above 0 the
strategy keeps the approximate prefix tree of ``cache_aware`` (the prompt text sent to each
backend, :class:`lb.strategies.affinity.PromptTree`, bounded by ``max_tree_chars`` and
``max_prompt_chars``; it then reads the request body) and each candidate's score becomes

    score = (the load score above) - prefix_weight * match_share

where ``match_share`` is the share of the prompt (its first ``max_prompt_chars`` characters)
that the candidate was sent before, 0..1: the share of the prefill it would skip. Every term
is on the same 0..1 scale, so ``prefix_weight`` says how much load a cached prompt is worth.
With ``prefix_weight: 1`` and the whole prompt held, the holder keeps it while its load score
is less than 1 above another candidate's. Being the most queued candidate while the other has
no queue is already that much (the queue term is 1 against 0), so a holder keeps its prompts
while it only has more in flight (that term weighs at most 0.5) or somewhat more KV in use,
and gives them up once its engine queues them while another's does not: the prompt goes to a
backend with room, which the tree then records as a second holder of the prefix. A hot prefix
spreads over more replicas as they saturate, and gathers again as the queues drain (the tree
forgets an unused holder's entries least recently used first). The prompt is recorded under
the chosen backend whichever term decided. With no fresh report at all the fallback is the
in-flight load against the prefix: ``load_norm - prefix_weight * match_share``.

Options: ``queue_weight`` (default 1.0), ``kv_weight`` (1.0), ``inflight_weight`` (0.5), all
finite and >= 0, not all 0; ``prefix_weight`` (0: no prefix tree, the body is not read);
``max_tree_chars`` (2,000,000) and ``max_prompt_chars`` (8192), used only with a prefix
weight; ``max_age_s`` (1.0; keep it equal to the pool's ``load_report.max_age_s``);
``decay_s`` (``lb.backend.DEFAULT_DECAY_S``, how fast recent failures fade; keep it equal to
the pool's).

Cost. Up to 16 candidates: two O(n) passes, plus with a prefix weight one walk down the tree
and one insert (as ``cache_aware``). Above 16 candidates (see :mod:`lb.strategies.affinity`)
only the backends holding the longest prefixes of the prompt (at most 16) and two candidates
drawn at random are scored, normalised among themselves, so a pick costs the same at 20
backends or 1,000.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from lb.backend import DEFAULT_DECAY_S, Backend
from lb.strategies.affinity import (
    FULL_SCAN_MAX_CANDIDATES,
    MAX_HOLDERS,
    Membership,
    PromptTree,
    considered,
)
from lb.strategies.base import Clock, RequestInfo, Strategy

_DEFAULTS = {
    "queue_weight": 1.0,
    "kv_weight": 1.0,
    "inflight_weight": 0.5,
    "prefix_weight": 0.0,
    "max_age_s": 1.0,
    "decay_s": DEFAULT_DECAY_S,
}
_TREE_OPTIONS = frozenset({"max_tree_chars", "max_prompt_chars"})


class LeastLoaded(Strategy):
    """Pick the candidate with the lowest weighted sum of reported queue, reported KV usage
    and the proxy's own in-flight load; fall back to least in-flight when no report is fresh.

    Ties are broken at random with ``self.rng``; reports are aged with ``self.clock``. Options
    and defaults are in the module docstring; a bad value raises ``ValueError`` naming it.
    """

    name: ClassVar[str] = "least_loaded"
    options_allowed: ClassVar[frozenset[str]] = frozenset(_DEFAULTS) | _TREE_OPTIONS

    def __init__(
        self,
        backends: Sequence[Backend],
        *,
        rng: random.Random | None = None,
        clock: Clock = time.monotonic,
        options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(backends, rng=rng, clock=clock, options=options)
        values = {key: self._number(key, default) for key, default in _DEFAULTS.items()}
        if self.options.keys() & _TREE_OPTIONS and not values["prefix_weight"] > 0:
            PromptTree(self.name, self.options)  # checked even when unused
        self.queue_weight = values["queue_weight"]
        self.kv_weight = values["kv_weight"]
        self.inflight_weight = values["inflight_weight"]
        self.prefix_weight = values["prefix_weight"]
        self.max_age_s = values["max_age_s"]
        self.decay_s = values["decay_s"]
        for key in ("max_age_s", "decay_s"):
            if values[key] <= 0:
                raise ValueError(f"option {key!r} for strategy {self.name!r} must be > 0")
        if self.queue_weight == self.kv_weight == self.inflight_weight == 0:
            raise ValueError(f"the weights of strategy {self.name!r} cannot all be 0")
        # With a prefix weight: the prompts sent to each backend, and the request body.
        self.prompts: PromptTree | None = None
        if self.prefix_weight > 0:
            self.prompts = PromptTree(self.name, self.options)
            self.needs_body = True
        self._members = Membership()
        # Set by pick() for explain(): no candidate had a fresh report; the pick's match share.
        self._all_stale = False
        self._share = 0.0

    def _number(self, key: str, default: float) -> float:
        value = self.options.get(key, default)
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value < 0
        ):
            raise ValueError(
                f"option {key!r} for strategy {self.name!r} must be a number >= 0, got {value!r}"
            )
        return float(value)

    def is_fresh(self, backend: Backend, now_s: float) -> bool:
        """True if ``backend`` has a report at most ``max_age_s`` old with a queue or KV value."""
        return (
            backend.reported_waiting is not None or backend.reported_kv_usage is not None
        ) and now_s - backend.reported_at_s <= self.max_age_s

    def pick(self, candidates: Sequence[Backend], request: RequestInfo) -> Backend:
        now = self.clock()
        prompts = self.prompts
        prompt = request.prompt[: prompts.max_prompt_chars] if prompts and request.prompt else ""
        n = len(candidates)
        if n == 1:
            chosen = candidates[0]
            self._all_stale = not self.is_fresh(chosen, now)
            self._share = 0.0
            if prompt and prompts is not None:
                matched = prompts.tree.match_each(prompt, (chosen,))
                self._share = matched.get(chosen, 0) / len(prompt)
                prompts.record(prompt, chosen)
            return chosen
        matched = {}
        if prompt and prompts is not None:
            limit = MAX_HOLDERS if n > FULL_SCAN_MAX_CANDIDATES else None
            matched = prompts.tree.match_each(prompt, self._members.of(candidates), limit)
        if n > FULL_SCAN_MAX_CANDIDATES:
            candidates = considered(self.rng, candidates, list(matched))
        chosen = self._score(candidates, now, matched, len(prompt))
        self._share = matched.get(chosen, 0) / len(prompt) if prompt else 0.0
        if prompt and prompts is not None:
            prompts.record(prompt, chosen)
        return chosen

    def _score(
        self,
        candidates: Sequence[Backend],
        now: float,
        matched: dict[Backend, int],
        prompt_chars: int,
    ) -> Backend:
        """The candidate with the lowest score (module docstring), ties at random."""
        decay_s = self.decay_s

        # Pass 1: who is fresh, and the maxima the terms are normalised by.
        fresh: list[bool] = []
        loads: list[float] = []
        max_waiting = 0.0
        max_kv: float | None = None
        max_running: float | None = None
        max_load = 0.0
        for b in candidates:
            is_fresh = self.is_fresh(b, now)
            fresh.append(is_fresh)
            if is_fresh:
                waiting = b.reported_waiting
                if waiting is not None and waiting > max_waiting:
                    max_waiting = waiting
                kv = b.reported_kv_usage
                if kv is not None and (max_kv is None or kv > max_kv):
                    max_kv = kv
                running = b.reported_running
                if running is not None and (max_running is None or running > max_running):
                    max_running = running
            load = float(b.in_flight)
            if b.failure_score:
                load += b.failure_score_at(now, decay_s)
            loads.append(load)
            if load > max_load:
                max_load = load

        self._all_stale = not any(fresh)
        if self._all_stale and not matched:
            return self._least_load(candidates, loads)

        waiting_scale = max_waiting if max_waiting > 0 else 1.0
        load_scale = max_load if max_load > 0 else 1.0
        kv_unknown = max_kv if max_kv is not None else 1.0
        # No KV gauge anywhere (TGI): the running batch's share stands in for the KV term.
        by_running = max_kv is None and max_running is not None
        running_scale = max_running if max_running is not None and max_running > 0 else 1.0
        w_queue, w_kv, w_inflight = self.queue_weight, self.kv_weight, self.inflight_weight
        if self._all_stale:
            # No report says anything: the in-flight load alone, against the prefix.
            w_queue, w_kv, w_inflight = 0.0, 0.0, 1.0
        w_prefix = self.prefix_weight / prompt_chars if prompt_chars else 0.0

        # Pass 2: score; reservoir sampling of size 1 among ties (see least_connections).
        random = self.rng.random
        best = candidates[0]
        best_score = math.inf
        ties = 0
        for i, b in enumerate(candidates):
            waiting = b.reported_waiting if fresh[i] else None
            if by_running:
                running = b.reported_running if fresh[i] else None
                kv = None if running is None else running / running_scale
            else:
                kv = b.reported_kv_usage if fresh[i] else None
            score = (
                w_queue * (1.0 if waiting is None else waiting / waiting_scale)
                + w_kv * (kv_unknown if kv is None else kv)
                + w_inflight * (loads[i] / load_scale)
            )
            if matched:
                score -= w_prefix * matched.get(b, 0)
            if score < best_score:
                best, best_score, ties = b, score, 1
            elif score == best_score:
                ties += 1
                if random() * ties < 1.0:
                    best = b
        return best

    def _least_load(self, candidates: Sequence[Backend], loads: list[float]) -> Backend:
        """The candidate with the least in-flight load, ties at random."""
        random = self.rng.random
        best = candidates[0]
        best_load = loads[0]
        ties = 1
        for i in range(1, len(candidates)):
            load = loads[i]
            if load < best_load:
                best, best_load, ties = candidates[i], load, 1
            elif load == best_load:
                ties += 1
                if random() * ties < 1.0:
                    best = candidates[i]
        return best

    def explain(self, backend: Backend, request: RequestInfo) -> str:
        """``queue 0, kv 0.31`` for a fresh pick (the proxy adds the strategy name before it;
        ``, prefix 87%`` is added with a prefix weight); otherwise says the reports were stale
        and the in-flight count decided."""
        prefix = f", prefix {int(self._share * 100)}%" if self.prompts is not None else ""
        if self._all_stale:
            return f"stale reports, least in_flight ({backend.in_flight}){prefix}"
        if not self.is_fresh(backend, self.clock()):
            return f"stale report, in_flight {backend.in_flight}{prefix}"
        waiting = backend.reported_waiting
        kv = backend.reported_kv_usage
        queue_text = "?" if waiting is None else f"{waiting:g}"
        if kv is None and backend.reported_running is not None:
            return f"queue {queue_text}, running {backend.reported_running:g}{prefix}"
        kv_text = "?" if kv is None else f"{kv:.2f}"
        return f"queue {queue_text}, kv {kv_text}{prefix}"
