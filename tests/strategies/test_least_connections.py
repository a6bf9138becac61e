"""Tests for lb.strategies.least_connections: lowest (in_flight + 1) / weight wins."""

from __future__ import annotations

import random
from collections import Counter

from lb.backend import Backend
from lb.load import Attempt
from lb.strategies import LeastConnections, RequestInfo
from lb.strategies.least_connections import FULL_SCAN_MAX_CANDIDATES

REQUEST = RequestInfo(method="POST", path="/v1/chat/completions")


def make_backends(*weights: int) -> list[Backend]:
    return [
        Backend.from_url(f"http://127.0.0.1:{8001 + i}", weight=weight)
        for i, weight in enumerate(weights)
    ]


def make_strategy(backends: list[Backend]) -> LeastConnections:
    return LeastConnections(backends, rng=random.Random(1234))


def test_busy_backend_gets_no_picks_while_another_has_fewer() -> None:
    """A backend with 10 in flight gets nothing until the others have caught up to 10."""
    busy, b, _c = backends = make_backends(1, 1, 1)
    busy.in_flight, b.in_flight = 10, 3
    strategy = make_strategy(backends)
    for _ in range(17):
        strategy.pick(backends, REQUEST).in_flight += 1
    assert [x.in_flight for x in backends] == [10, 10, 10]


def test_idle_heavier_backend_beats_idle_lighter_one() -> None:
    """With nothing in flight, the weight-2 backend (score 1/2) beats the weight-1 one (1/1)."""
    _light, heavy = backends = make_backends(1, 2)
    strategy = make_strategy(backends)
    assert {strategy.pick(backends, REQUEST) for _ in range(100)} == {heavy}


def test_weight_two_with_one_in_flight_ties_idle_weight_one() -> None:
    """Weight 2 with 1 in flight (2/2) ties weight 1 with 0 in flight (1/1): an even split."""
    light, heavy = backends = make_backends(1, 2)
    heavy.in_flight = 1
    strategy = make_strategy(backends)
    counts = Counter(strategy.pick(backends, REQUEST) for _ in range(2000))
    assert 900 <= counts[light] <= 1100
    assert counts[light] + counts[heavy] == 2000


def test_weight_two_with_two_in_flight_loses_to_idle_weight_one() -> None:
    """Weight 2 with 2 in flight (3/2) loses to weight 1 with 0 in flight (1/1)."""
    light, heavy = backends = make_backends(1, 2)
    heavy.in_flight = 2
    strategy = make_strategy(backends)
    assert {strategy.pick(backends, REQUEST) for _ in range(100)} == {light}


def test_in_flight_counts_fill_in_proportion_to_weight() -> None:
    """Under growing concurrency, in-flight counts stay within one request of the weight ratio."""
    light, heavy = backends = make_backends(1, 2)
    strategy = make_strategy(backends)
    for _ in range(300):
        strategy.pick(backends, REQUEST).in_flight += 1
        assert abs(2 * light.in_flight - heavy.in_flight) <= 2


def test_ties_are_spread_uniformly() -> None:
    """Three equally loaded backends each get 1000 of 3000 picks, within 10%."""
    backends = make_backends(1, 1, 1)
    for backend in backends:
        backend.in_flight = 4
    strategy = make_strategy(backends)
    counts = Counter(strategy.pick(backends, REQUEST) for _ in range(3000))
    assert all(900 <= counts[b] <= 1100 for b in backends)


def test_subset_of_candidates_only_returns_members_of_the_subset() -> None:
    """The least loaded backend is not picked when the proxy left it out of the candidates."""
    _idle, b, c = backends = make_backends(1, 1, 1)
    b.in_flight = c.in_flight = 5
    strategy = make_strategy(backends)
    assert {strategy.pick([b, c], REQUEST) for _ in range(100)} == {b, c}


def test_lone_candidate_is_returned() -> None:
    """A single candidate is returned whatever its load."""
    _a, b = backends = make_backends(1, 1)
    b.in_flight = 100
    assert make_strategy(backends).pick([b], REQUEST) is b


def test_a_backend_failing_fast_is_not_preferred_and_is_tried_again_once_quiet() -> None:
    """Fast 503s count as phantom load, so the failing backend loses; the penalty then fades."""
    now = [100.0]
    failing, good = backends = make_backends(1, 1)
    for _ in range(3):
        attempt = Attempt(failing, clock=lambda: now[0])
        attempt.response_started(503)
        attempt.finish()
    strategy = LeastConnections(backends, rng=random.Random(1234), clock=lambda: now[0])
    assert failing.in_flight == 0
    assert {strategy.pick(backends, REQUEST) for _ in range(200)} == {good}
    now[0] += 120.0  # twelve decay periods without a failure
    picks = Counter(strategy.pick(backends, REQUEST) for _ in range(2000))
    assert picks[failing] > 800


def test_sixteen_equal_weight_candidates_are_all_scanned() -> None:
    """Up to 16 candidates the single least loaded backend takes every pick."""
    backends = make_backends(*[1] * FULL_SCAN_MAX_CANDIDATES)
    for backend in backends:
        backend.in_flight = 5
    idle = backends[7]
    idle.in_flight = 0
    strategy = make_strategy(backends)
    assert {strategy.pick(backends, REQUEST) for _ in range(200)} == {idle}


def test_above_sixteen_equal_weight_candidates_the_better_of_two_random_ones_wins() -> None:
    """Over 17 equal-weight candidates the least loaded wins only when drawn: 2 picks in 17."""
    backends = make_backends(*[1] * (FULL_SCAN_MAX_CANDIDATES + 1))
    for backend in backends:
        backend.in_flight = 5
    idle = backends[7]
    idle.in_flight = 0
    strategy = make_strategy(backends)
    counts = Counter(strategy.pick(backends, REQUEST) for _ in range(17_000))
    assert 1_800 <= counts[idle] <= 2_200
    assert len(counts) == len(backends)


def test_large_equal_weight_pool_never_picks_its_busiest_backend() -> None:
    """In a pool of 100, a backend busier than all others loses every comparison it is in."""
    backends = make_backends(*[1] * 100)
    rng = random.Random(7)
    for backend in backends:
        backend.in_flight = rng.randint(0, 8)
    busiest = backends[42]
    busiest.in_flight = 9
    strategy = make_strategy(backends)
    assert busiest not in {strategy.pick(backends, REQUEST) for _ in range(5_000)}


def test_large_equal_weight_pool_passes_over_a_backend_failing_fast() -> None:
    """In a pool of 100 idle backends, one with recent failures is never picked."""
    now = [100.0]
    backends = make_backends(*[1] * 100)
    failing = backends[3]
    attempt = Attempt(failing, clock=lambda: now[0])
    attempt.response_started(503)
    attempt.finish()
    strategy = LeastConnections(backends, rng=random.Random(1234), clock=lambda: now[0])
    assert failing not in {strategy.pick(backends, REQUEST) for _ in range(5_000)}


def test_large_equal_weight_pool_spreads_idle_picks_evenly() -> None:
    """40 idle equal-weight backends each get 1000 of 40,000 picks, within 15%."""
    backends = make_backends(*[1] * 40)
    strategy = make_strategy(backends)
    counts = Counter(strategy.pick(backends, REQUEST) for _ in range(40_000))
    assert all(850 <= counts[b] <= 1_150 for b in backends)


def test_large_equal_weight_pool_keeps_in_flight_counts_within_a_few_requests() -> None:
    """Filling 100 backends with 2,000 requests keeps every count in 14..23 (average 20; uniformly
    random picks would spread about 8..35)."""
    backends = make_backends(*[1] * 100)
    strategy = make_strategy(backends)
    for _ in range(2_000):
        strategy.pick(backends, REQUEST).in_flight += 1
    assert max(b.in_flight for b in backends) <= 23
    assert min(b.in_flight for b in backends) >= 14


def test_large_pool_with_unequal_weights_fills_in_proportion_to_weight() -> None:
    """Ten backends of weight 10 and thirty of weight 1, filled with 1,300 requests: the
    heavy ones take about their share (1,000), and load per weight stays close everywhere."""
    backends = make_backends(*([10] * 10 + [1] * 30))
    strategy = make_strategy(backends)
    for _ in range(1_300):
        strategy.pick(backends, REQUEST).in_flight += 1
    heavy = sum(b.in_flight for b in backends if b.weight == 10)
    assert 900 <= heavy <= 1_100
    per_weight = [b.in_flight / b.weight for b in backends]
    assert max(per_weight) - min(per_weight) <= 8  # average 10 per unit of weight


def test_large_pool_with_unequal_weights_never_picks_its_busiest_backend() -> None:
    """Power of two choices, drawn by weight: the one backend far busier than the rest (for
    its weight) is never the better of two."""
    backends = make_backends(*[2 if i % 4 == 3 else 1 for i in range(100)])
    for backend in backends:
        backend.in_flight = 5
    busiest = backends[51]  # weight 1
    busiest.in_flight = 50
    strategy = make_strategy(backends)
    assert busiest not in {strategy.pick(backends, REQUEST) for _ in range(2_000)}


def test_large_pool_with_unequal_weights_picks_each_backend_when_idle() -> None:
    """Idle, every backend of a mixed-weight pool of 60 is picked now and then (none starves),
    the heavier ones more often."""
    backends = make_backends(*[3 if i % 3 == 0 else 1 for i in range(60)])
    strategy = make_strategy(backends)
    counts = Counter(strategy.pick(backends, REQUEST) for _ in range(30_000))
    assert all(counts[b] > 0 for b in backends)
    heavy = sum(counts[b] for b in backends if b.weight == 3) / 20
    light = sum(counts[b] for b in backends if b.weight == 1) / 40
    assert heavy > 2 * light
