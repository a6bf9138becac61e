"""Cache-aware routing: send a prompt where its prefix was sent before, unless load is skewed.

A model server keeps the KV cache of recent prompts (vLLM's automatic prefix caching, SGLang's
RadixAttention), so a request whose prompt starts like one a backend served recently is cheaper
there: the shared prefix is not computed again. The proxy cannot see those caches; it keeps an
approximation instead, a radix tree of the prompt text it sent to each backend
(:class:`lb.strategies.prefix_tree.PrefixTree`). This is sglang-router's ``cache_aware`` policy
(sgl-project/sglang, ``sgl-router/src/policies/cache_aware.rs`` and ``tree.rs``).

For each request, over the candidates, with ``load = in_flight``:

1. Imbalanced, when ``max_load - min_load > balance_abs_threshold`` (default 32) and
   ``max_load > min_load * balance_rel_threshold`` (default 1.1): the least-loaded candidate.
   Affinity must not pile a hot prefix onto one server while others idle.
2. Otherwise the candidate holding the longest prefix of the prompt, if
   ``matched_chars / len(prompt) >= cache_threshold`` (default 0.5).
3. Otherwise (no backend holds enough of the prompt to matter) the least-loaded candidate,
   and among equally loaded ones the one whose tree holds the fewest characters: the most
   room in its cache for a new prefix, so new prefixes spread over the backends. A prompt
   no cache can help is placed by load alone, so a slow replica does not take a full share
   of new work just because its tree is small (sglang goes by tree size first).

Rule 2 with the model servers' own reports (``load_report`` enabled on the pool): when the
holder chosen by rule 2 reports a queue (``reported_waiting > 0`` in a report at most
``max_age_s``, default 1 s, old) while other candidates report none, the holder's batch is
full and a request sent there waits for a slot; the request goes instead to the least loaded
of the candidates reporting no queue, then the smallest tree, as rule 3 ("holder queueing:
least loaded"). That candidate becomes a second holder of the prefix, so a hot prefix spreads
as its replicas saturate, long before the in-flight gap reaches the absolute threshold (32
requests by default: two whole batches of a server running 16 at once). This follows the
Gateway API Inference Extension's endpoint picker, whose queue scorer competes with its
prefix-cache scorer. A stale or missing report is neither queueing nor free, so without
reports the rules are exactly sglang's.

Ties are broken by the lower ``in_flight``, then uniformly at random. The prompt is then
recorded under the chosen backend, whichever rule chose it, as sglang does. Weights are not
used (nor are they by sglang); a request with no prompt goes to the least loaded.

Only the first ``max_prompt_chars`` (default 8192) characters of a prompt are matched and
recorded, and ``len(prompt)`` in the ratio is of that truncated prompt, so long prompts can
still reach the threshold. The tree is bounded by ``max_tree_chars`` (default 2,000,000): the
characters held summed over backends, plus 64 per (node, backend) entry (see
``prefix_tree``). Whenever an insert takes it over, least recently used leaves are evicted
until it is within the budget again; that costs O(1) per entry evicted, no walk over the tree,
so it is amortised into the inserts and never stalls a pick.

Large pools. Above 16 candidates the load scan would cost ~100 ns per candidate; a pick then
considers only the backends holding the longest prefixes of the prompt (at most 16) and two
candidates drawn at random (see :mod:`lb.strategies.affinity`), and applies the three rules
among those: prefix holders are always considered, the imbalance test and the least-loaded
choices compare the few. Up to 16 candidates nothing changes.

Cost per request: O(n) over the candidates for the load scan, plus two walks down the tree
(match, then insert), each O(len(prompt)) character comparisons done in C plus O(backends) per
node on the path. Measured ad hoc (CPython 3.11, 3 to 8 backends, tree at its default budget):
10-15 us mean for 2,000-character prompts sharing system prompts (p99 ~30 us), ~15 us for
short prompts, ~30 us mean and ~90 us p99 for multi-turn conversations up to 8,192 characters
(about 35 nodes deep).

Memory, measured with tracemalloc (``test_tree_memory_per_cached_char_is_reported`` prints
it): ~1.7 bytes per stored character for ~2,000-character ASCII prompts, so ~1.7 MB per MB of
distinct prompt text (labels are ``str`` slices: 1 byte per character for ASCII, 2 or 4 for
wider text), and ~550 bytes per node, which dominates only for very short prompts. Full at the
default budget the tree measured 4.5 MB (2,000-character prompts) and 19 MB (12-character
prompts, 22k nodes, the worst case the per-entry charge allows). The nodes are objects the
cyclic garbage collector tracks (up to ~85k at the default budget), which lengthens the
interpreter's occasional full collections by tens of milliseconds; a smaller
``max_tree_chars`` shrinks both.

The strategy is rebuilt, with a fresh tree, whenever the pool's backends change.

Differences from sglang: the match ratio is compared with ``>=`` (sglang: ``>``); the budget
is one global figure with a per-entry charge, enforced on insert (sglang: characters per
backend, enforced by a timer thread walking the whole tree); ties on match length and tree size
go to the lower in-flight count, then random (sglang takes the first backend it finds); the
truncation to ``max_prompt_chars`` is ours, and so are the queue rule and the sampling in
large pools.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from lb.backend import Backend
from lb.strategies.affinity import (
    FULL_SCAN_MAX_CANDIDATES,
    MAX_HOLDERS,
    Membership,
    PromptTree,
    considered,
    two_at_random,
)
from lb.strategies.base import Clock, RequestInfo, Strategy
from lb.strategies.prefix_tree import PrefixTree


def _number(name: str, value: object, *, integer: bool) -> float:
    """``value`` as a finite number, or ``ValueError`` naming option ``name``."""
    kind = "an integer" if integer else "a number"
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or (integer and not isinstance(value, int))
        or not math.isfinite(value)
    ):
        raise ValueError(
            f"option {name!r} for strategy 'cache_aware' must be {kind}, got {value!r}"
        )
    return value


class CacheAware(Strategy):
    """Prefix affinity over an approximate radix tree, with a load-imbalance override.

    Options (defaults): ``balance_abs_threshold`` (32, an integer >= 0), ``balance_rel_threshold``
    (1.1, >= 1), ``cache_threshold`` (0.5, in [0, 1]), ``max_tree_chars`` (2,000,000),
    ``max_prompt_chars`` (8192, at most ``max_tree_chars``), ``max_age_s`` (1.0, > 0: how old a
    load report may be and still count); a bad value raises ``ValueError``.
    Reads the request's ``prompt`` (``needs_body`` is True). ``self.rng`` breaks ties.
    """

    name: ClassVar[str] = "cache_aware"
    options_allowed: ClassVar[frozenset[str]] = frozenset(
        {
            "balance_abs_threshold",
            "balance_rel_threshold",
            "cache_threshold",
            "max_tree_chars",
            "max_prompt_chars",
            "max_age_s",
        }
    )
    needs_body = True

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
        self.balance_abs_threshold = int(
            _number("balance_abs_threshold", opts.get("balance_abs_threshold", 32), integer=True)
        )
        self.balance_rel_threshold = _number(
            "balance_rel_threshold", opts.get("balance_rel_threshold", 1.1), integer=False
        )
        self.cache_threshold = _number(
            "cache_threshold", opts.get("cache_threshold", 0.5), integer=False
        )
        self.max_age_s = _number("max_age_s", opts.get("max_age_s", 1.0), integer=False)
        if not self.max_age_s > 0:
            raise ValueError("option 'max_age_s' for strategy 'cache_aware' must be > 0")
        if self.balance_abs_threshold < 0:
            raise ValueError(
                "option 'balance_abs_threshold' for strategy 'cache_aware' must be >= 0"
            )
        if self.balance_rel_threshold < 1:
            raise ValueError(
                "option 'balance_rel_threshold' for strategy 'cache_aware' must be >= 1"
            )
        if not 0 <= self.cache_threshold <= 1:
            raise ValueError(
                "option 'cache_threshold' for strategy 'cache_aware' must be in [0, 1]"
            )
        self.prompts = PromptTree(self.name, opts)  # the budgets, shared with least_loaded
        self.tree: PrefixTree[Backend] = self.prompts.tree
        self._members = Membership()
        self._reason = ""

    def pick(self, candidates: Sequence[Backend], request: RequestInfo) -> Backend:
        prompt = request.prompt
        large = len(candidates) > FULL_SCAN_MAX_CANDIDATES
        if not prompt:
            self._reason = "no prompt: least loaded"
            return self._least_loaded(two_at_random(self.rng, candidates) if large else candidates)
        prompt = prompt[: self.prompts.max_prompt_chars]

        matched = 0
        holders: list[Backend] = []
        if large:
            # A bounded set: the longest holders (deepest first) and two at random.
            found = self.tree.match_each(prompt, self._members.of(candidates), MAX_HOLDERS)
            if found:
                matched = next(iter(found.values()))
                holders = [b for b, depth in found.items() if depth == matched]
            candidates = considered(self.rng, candidates, list(found))

        # One pass for the imbalance test: min and max in_flight over the candidates.
        min_load = max_load = candidates[0].in_flight
        for backend in candidates:
            load = backend.in_flight
            if load < min_load:
                min_load = load
            elif load > max_load:
                max_load = load
        if (
            max_load - min_load > self.balance_abs_threshold
            and max_load > min_load * self.balance_rel_threshold
        ):
            chosen = self._least_loaded(candidates)
            self._reason = "imbalanced: least loaded"
        else:
            if not large:
                allowed = candidates if len(candidates) <= 4 else self._members.of(candidates)
                matched, holders = self.tree.match(prompt, allowed)
            share = matched / len(prompt)
            if holders and share >= self.cache_threshold:
                chosen = self._least_loaded(holders)
                self._reason = f"prefix match {int(share * 100)}%"
                if self._queueing(chosen):
                    free = self._not_queueing(candidates)
                    if free:
                        chosen = self._least_loaded_then_smallest_tree(free)
                        self._reason = "holder queueing: least loaded"
            else:
                chosen = self._least_loaded_then_smallest_tree(candidates)
                self._reason = "no match: least loaded"

        self.prompts.record(prompt, chosen)
        return chosen

    def _queueing(self, backend: Backend) -> bool:
        """True if ``backend``'s fresh load report shows requests waiting for a batch slot."""
        waiting = backend.reported_waiting
        return (
            waiting is not None
            and waiting > 0
            and self.clock() - backend.reported_at_s <= self.max_age_s
        )

    def _not_queueing(self, candidates: Sequence[Backend]) -> list[Backend]:
        """The candidates whose fresh load report shows an empty queue."""
        now = self.clock()
        max_age_s = self.max_age_s
        return [
            b for b in candidates if b.reported_waiting == 0 and now - b.reported_at_s <= max_age_s
        ]

    def explain(self, backend: Backend, request: RequestInfo) -> str:
        """The rule that chose the last pick: a match share, the imbalance, or no match."""
        return self._reason

    def _least_loaded(self, backends: Sequence[Backend]) -> Backend:
        """The backend with the lowest ``in_flight``, ties uniformly at random."""
        best = backends[0]
        ties = 1
        for backend in backends[1:]:
            if backend.in_flight < best.in_flight:
                best = backend
                ties = 1
            elif backend.in_flight == best.in_flight:
                # Reservoir sampling of size 1: each of the k tied backends is kept with 1/k.
                ties += 1
                if self.rng.random() * ties < 1.0:
                    best = backend
        return best

    def _least_loaded_then_smallest_tree(self, candidates: Sequence[Backend]) -> Backend:
        """The candidate with the least ``in_flight``, then caching the fewest characters,
        then at random."""
        sizes = self.tree.tenant_chars
        best = candidates[0]
        best_key = (best.in_flight, sizes.get(best, 0))
        ties = 1
        for backend in candidates[1:]:
            key = (backend.in_flight, sizes.get(backend, 0))
            if key < best_key:
                best, best_key, ties = backend, key, 1
            elif key == best_key:
                ties += 1
                if self.rng.random() * ties < 1.0:
                    best = backend
        return best
