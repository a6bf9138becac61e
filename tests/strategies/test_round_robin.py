"""Tests for lb.strategies.round_robin: smooth weighted round robin."""

from __future__ import annotations

import itertools
import random
from collections import Counter

from lb.backend import Backend
from lb.pool import Pool, PoolTimeouts
from lb.strategies import RequestInfo, RoundRobin
from lb.strategies.round_robin import SMOOTH_MAX_BACKENDS

REQUEST = RequestInfo(method="POST", path="/v1/chat/completions")


def make_backends(*weights: int) -> list[Backend]:
    return [
        Backend.from_url(f"http://127.0.0.1:{8001 + i}", weight=weight)
        for i, weight in enumerate(weights)
    ]


def test_weights_one_and_two_give_exact_thirds_in_every_window_of_three() -> None:
    """Weights 1 and 2 give the light backend exactly one pick in every 3 consecutive picks."""
    light, heavy = backends = make_backends(1, 2)
    strategy = RoundRobin(backends)
    picks = [strategy.pick(backends, REQUEST) for _ in range(300)]
    assert picks[:3] == [heavy, light, heavy]
    for start in range(len(picks) - 2):
        assert picks[start : start + 3].count(light) == 1


def test_weight_one_backend_is_never_picked_twice_in_a_row() -> None:
    """With weights 1 and 2 the weight-1 backend never gets two consecutive picks."""
    light, _ = backends = make_backends(1, 2)
    strategy = RoundRobin(backends)
    picks = [strategy.pick(backends, REQUEST) for _ in range(300)]
    assert not any(a is light and b is light for a, b in itertools.pairwise(picks))


def test_equal_weights_cycle_in_pool_order() -> None:
    """Equal weights visit the backends one after another in pool order."""
    backends = make_backends(1, 1, 1)
    strategy = RoundRobin(backends)
    picks = [strategy.pick(backends, REQUEST) for _ in range(30)]
    assert picks == backends * 10


def test_weights_one_two_three_give_exact_shares_over_600_picks() -> None:
    """Weights 1, 2 and 3 give exactly 100, 200 and 300 of 600 picks."""
    backends = make_backends(1, 2, 3)
    strategy = RoundRobin(backends)
    counts = Counter(strategy.pick(backends, REQUEST) for _ in range(600))
    assert [counts[b] for b in backends] == [100, 200, 300]


def test_subset_of_candidates_only_returns_members_of_the_subset() -> None:
    """When the proxy excludes a backend, only the remaining candidates are ever picked."""
    a, _b, c = backends = make_backends(1, 5, 1)
    strategy = RoundRobin(backends)
    picks = {strategy.pick([a, c], REQUEST) for _ in range(100)}
    assert picks == {a, c}


def test_subset_keeps_the_weight_ratio_among_its_members() -> None:
    """Picks over a subset are shared by the subset's own weights."""
    a, _b, c = backends = make_backends(1, 5, 3)
    strategy = RoundRobin(backends)
    counts = Counter(strategy.pick([a, c], REQUEST) for _ in range(400))
    assert (counts[a], counts[c]) == (100, 300)


def test_rotation_resumes_after_picks_that_excluded_a_backend() -> None:
    """Retries that leave a backend out do not skew the long-run shares of the full pool."""
    a, b = backends = make_backends(1, 1)
    strategy = RoundRobin(backends)
    for _ in range(10):
        strategy.pick([a], REQUEST)
    counts = Counter(strategy.pick(backends, REQUEST) for _ in range(100))
    assert counts[a] == counts[b] == 50


def test_lone_candidate_is_returned() -> None:
    """A single candidate is returned as it is."""
    _a, b = backends = make_backends(1, 2)
    strategy = RoundRobin(backends)
    assert strategy.pick([b], REQUEST) is b


# -- large pools: the earliest-deadline-first heap ----------------------------------------------


def large_pool(*weights: int) -> list[Backend]:
    """Backends for a pool above SMOOTH_MAX_BACKENDS, so picks use the heap schedule."""
    backends = make_backends(*weights)
    assert len(backends) > SMOOTH_MAX_BACKENDS
    return backends


def test_large_pool_uses_the_heap_and_small_pool_the_scan() -> None:
    """Pools above SMOOTH_MAX_BACKENDS use the heap schedule, smaller ones nginx's scan."""
    assert RoundRobin(make_backends(*[1] * SMOOTH_MAX_BACKENDS)).uses_heap is False
    assert RoundRobin(make_backends(*[1] * (SMOOTH_MAX_BACKENDS + 1))).uses_heap is True


def test_large_pool_of_equal_weights_rotates_in_pool_order() -> None:
    """Equal weights in a large pool visit the backends one after another in pool order."""
    backends = large_pool(*[1] * 40)
    strategy = RoundRobin(backends)
    candidates = tuple(backends)
    assert [strategy.pick(candidates, REQUEST) for _ in range(120)] == backends * 3


def test_large_pool_gives_each_backend_exactly_its_weight_in_every_cycle() -> None:
    """Weights 1, 2 and 3 over 60 backends: every cycle of sum(weights) picks is exact."""
    weights = [1 + i % 3 for i in range(60)]
    backends = large_pool(*weights)
    strategy = RoundRobin(backends)
    candidates = tuple(backends)
    cycle = sum(weights)
    for _ in range(20):
        counts = Counter(strategy.pick(candidates, REQUEST) for _ in range(cycle))
        assert [counts[b] for b in backends] == weights


def test_large_pool_spreads_a_heavy_backend_through_the_cycle() -> None:
    """A weight-5 backend among 39 of weight 1 is never picked within 5 picks of its last."""
    backends = large_pool(5, *[1] * 39)
    heavy = backends[0]
    strategy = RoundRobin(backends)
    candidates = tuple(backends)
    picks = [strategy.pick(candidates, REQUEST) for _ in range(44 * 10)]
    at = [i for i, backend in enumerate(picks) if backend is heavy]
    assert len(at) == 50
    assert min(b - a for a, b in itertools.pairwise(at)) >= 5


def test_large_pool_only_returns_candidates_and_shares_by_their_weights() -> None:
    """With a third of a large pool left out, picks go only to the rest, by their weights."""
    weights = [1 + i % 2 for i in range(45)]
    backends = large_pool(*weights)
    strategy = RoundRobin(backends)
    candidates = tuple(b for i, b in enumerate(backends) if i % 3 != 0)
    cycle = sum(b.weight for b in candidates)
    for _ in range(10):
        counts = Counter(strategy.pick(candidates, REQUEST) for _ in range(cycle))
        assert set(counts) == set(candidates)
        assert all(counts[b] == b.weight for b in candidates)


def test_large_pool_backend_coming_back_gets_no_burst() -> None:
    """A backend left out for a while rejoins at its share, without a catch-up burst."""
    backends = large_pool(*[1] * 40)
    strategy = RoundRobin(backends)
    returning = backends[7]
    without = tuple(b for b in backends if b is not returning)
    for _ in range(39 * 25):
        assert strategy.pick(without, REQUEST) is not returning
    picks = [strategy.pick(tuple(backends), REQUEST) for _ in range(40 * 5)]
    counts = Counter(picks)
    assert counts[returning] == 5
    assert all(counts[b] == 5 for b in backends)


def test_large_pool_candidates_changing_every_pick_never_starve_anyone() -> None:
    """Candidates drawn afresh for each pick (retries, health flapping): all are served."""
    rng = random.Random(7)
    backends = large_pool(*[1 + i % 4 for i in range(50)])
    strategy = RoundRobin(backends)
    counts: Counter[Backend] = Counter()
    for _ in range(5000):
        candidates = [b for b in backends if rng.random() < 0.8]
        chosen = strategy.pick(candidates, REQUEST)
        assert chosen in candidates
        counts[chosen] += 1
    assert set(counts) == set(backends)
    heavy = sum(counts[b] for b in backends if b.weight == 4)
    light = sum(counts[b] for b in backends if b.weight == 1)
    assert 3.0 < heavy / light < 5.0


def test_large_pool_weight_change_takes_effect_from_the_next_turn() -> None:
    """Raising one backend's effective weight (slow start ends) raises its share to match."""
    backends = large_pool(*[1] * 40)
    ramping = backends[3]
    ramping.effective_weight = 0.5
    strategy = RoundRobin(backends)
    candidates = tuple(backends)
    for _ in range(400):
        strategy.pick(candidates, REQUEST)
    ramping.effective_weight = 2.0
    for _ in range(41 * 2):
        strategy.pick(candidates, REQUEST)  # the turn scheduled at weight 0.5 comes and goes
    counts = Counter(strategy.pick(candidates, REQUEST) for _ in range(41 * 10))
    assert counts[ramping] == 20
    assert all(counts[b] == 10 for b in backends if b is not ramping)


def test_large_pool_accepts_the_pools_candidate_view() -> None:
    """A retry's view of the pool (tried backends left out) is never answered with a tried one."""
    backends = large_pool(*[1] * 40)
    pool = Pool("p", backends, RoundRobin(backends), {}, PoolTimeouts())
    tried = backends[::5]
    candidates = pool.candidates(tried)
    picks = {pool.strategy.pick(candidates, REQUEST) for _ in range(200)}
    assert picks == set(backends) - set(tried)


def test_the_rotation_is_the_same_whatever_sequence_the_candidates_come_in() -> None:
    """A tuple (a first attempt), a list, or a pool's view leaving the tried ones out: the
    same candidates in the same order give the same picks."""
    from lb.pool import CandidateView

    backends = make_backends(1, 2, 3, 1, 1)
    index = {b: i for i, b in enumerate(backends)}
    forms = {
        "tuple": tuple(backends[1:]),
        "list": list(backends[1:]),
        "view": CandidateView(tuple(backends), index, [0]),
    }
    runs = {}
    for name, candidates in forms.items():
        strategy = RoundRobin(backends)
        runs[name] = [strategy.pick(candidates, REQUEST).name for _ in range(70)]
    assert runs["tuple"] == runs["list"] == runs["view"]
    assert Counter(runs["tuple"]) == {
        backends[1].name: 20,
        backends[2].name: 30,
        backends[3].name: 10,
        backends[4].name: 10,
    }


def test_a_user_strategy_may_subclass_round_robin_and_call_its_pick() -> None:
    class Tagged(RoundRobin):
        name = "tagged_round_robin"

        def pick(self, candidates, request):  # type: ignore[no-untyped-def]
            self.calls = getattr(self, "calls", 0) + 1
            return super().pick(candidates, request)

    a, b = backends = make_backends(1, 1)
    strategy = Tagged(backends)
    assert [strategy.pick(backends, REQUEST) for _ in range(4)] == [a, b, a, b]
    assert strategy.calls == 4
