"""Tests for lb.strategies.round_robin: smooth weighted round robin."""

from __future__ import annotations

import itertools
from collections import Counter

from lb.backend import Backend
from lb.strategies import RequestInfo, RoundRobin

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
