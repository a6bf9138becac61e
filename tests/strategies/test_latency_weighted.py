"""Tests for lb.strategies.latency_weighted: power of two choices over peak-EWMA cost."""

from __future__ import annotations

import random
from collections import Counter, deque

import pytest

from lb.backend import Backend
from lb.load import Attempt
from lb.strategies import LatencyWeighted, RequestInfo

REQUEST = RequestInfo(method="POST", path="/v1/chat/completions")


class FakeClock:
    """A clock that only moves when a test moves it."""

    def __init__(self, now_s: float = 1000.0) -> None:
        self.now_s = now_s

    def __call__(self) -> float:
        return self.now_s


def make_backends(*rtts_s: float, now_s: float = 1000.0) -> list[Backend]:
    """Backends with the given latency estimates, measured at ``now_s``."""
    backends = []
    for i, rtt_s in enumerate(rtts_s):
        backend = Backend.from_url(f"http://127.0.0.1:{8001 + i}")
        backend.rtt_estimate_s = rtt_s
        backend.rtt_stamp_s = now_s
        backends.append(backend)
    return backends


def make_strategy(
    backends: list[Backend], clock: FakeClock, decay_s: float | None = None
) -> LatencyWeighted:
    options = {} if decay_s is None else {"decay_s": decay_s}
    return LatencyWeighted(backends, rng=random.Random(1234), clock=clock, options=options)


def test_five_times_slower_backend_gets_few_picks_under_traffic() -> None:
    """With 12 requests kept in flight, more than 80% of picks go to the two fast backends."""
    fast_a, fast_b, _slow = backends = make_backends(0.050, 0.050, 0.250)
    strategy = make_strategy(backends, FakeClock())
    outstanding: deque[Backend] = deque()
    counts: Counter[Backend] = Counter()
    for _ in range(3000):
        chosen = strategy.pick(backends, REQUEST)
        counts[chosen] += 1
        chosen.in_flight += 1
        outstanding.append(chosen)
        if len(outstanding) > 12:
            outstanding.popleft().in_flight -= 1
    assert counts[fast_a] + counts[fast_b] > 0.8 * 3000


def test_costliest_backend_is_never_picked() -> None:
    """Of two distinct candidates the cheaper wins, so the costliest backend never does."""
    backends = make_backends(0.040, 0.050, 0.060, 0.070, 0.500)
    strategy = make_strategy(backends, FakeClock())
    picks = Counter(strategy.pick(backends, REQUEST) for _ in range(2000))
    assert picks[backends[-1]] == 0
    assert len(picks) == 4


def test_slow_backend_is_picked_again_once_its_estimate_decays() -> None:
    """A backend avoided for a 1 s estimate is chosen again once that estimate has decayed."""
    clock = FakeClock(now_s=1000.0)
    fast_a, fast_b, slow = backends = make_backends(0.050, 0.050, 1.000)
    strategy = make_strategy(backends, clock)
    assert slow not in {strategy.pick(backends, REQUEST) for _ in range(1000)}

    # A minute later: traffic has kept refreshing the fast backends at 50 ms, while the slow one
    # got no samples and relaxed towards the default guess (30 ms).
    clock.now_s += 60.0
    fast_a.rtt_stamp_s = fast_b.rtt_stamp_s = clock.now_s
    counts = Counter(strategy.pick(backends, REQUEST) for _ in range(1000))
    assert counts[slow] > 500  # it wins every pair it is drawn into: 2/3 of them


def test_long_decay_keeps_a_slow_backend_avoided() -> None:
    """With decay_s=1000, a minute is not enough for a 1 s estimate to fall below 50 ms."""
    clock = FakeClock(now_s=1000.0)
    fast_a, fast_b, slow = backends = make_backends(0.050, 0.050, 1.000)
    strategy = make_strategy(backends, clock, decay_s=1000.0)
    clock.now_s += 60.0
    fast_a.rtt_stamp_s = fast_b.rtt_stamp_s = clock.now_s
    assert slow not in {strategy.pick(backends, REQUEST) for _ in range(1000)}


def test_busy_backend_loses_to_idle_one_of_equal_latency() -> None:
    """At equal latency, a backend with 5 requests in flight loses to an idle one."""
    busy, idle = backends = make_backends(0.050, 0.050)
    busy.in_flight = 5
    strategy = make_strategy(backends, FakeClock())
    assert {strategy.pick(backends, REQUEST) for _ in range(100)} == {idle}


def test_fast_failures_make_a_backend_less_likely_than_a_healthy_one() -> None:
    """A backend answering 503 in 1 ms is picked less than one answering 200 in 20 ms."""
    clock = FakeClock(now_s=1000.0)
    healthy, failing = backends = make_backends(0.030, 0.030)
    for _ in range(5):
        attempt = Attempt(healthy, clock=clock)
        clock.now_s += 0.020
        attempt.response_started(200)
        attempt.finish()
        attempt = Attempt(failing, clock=clock)
        clock.now_s += 0.001
        attempt.response_started(503)
        attempt.finish()
    strategy = make_strategy(backends, clock)
    counts = Counter(strategy.pick(backends, REQUEST) for _ in range(1000))
    assert counts[failing] < counts[healthy]
    assert counts[healthy] > 900


def test_identical_pair_is_shared_evenly() -> None:
    """Two fresh, idle backends each get about half the picks rather than the first taking all."""
    backends = make_backends(0.030, 0.030)
    strategy = make_strategy(backends, FakeClock())
    counts = Counter(strategy.pick(backends, REQUEST) for _ in range(2000))
    assert all(900 <= counts[b] <= 1100 for b in backends)


def test_subset_of_candidates_only_returns_members_of_the_subset() -> None:
    """The cheapest backend is not picked when the proxy left it out of the candidates."""
    _cheapest, b, c, d = backends = make_backends(0.001, 0.050, 0.060, 0.070)
    strategy = make_strategy(backends, FakeClock())
    assert {strategy.pick([b, c, d], REQUEST) for _ in range(1000)} == {b, c}


def test_lone_candidate_is_returned() -> None:
    """A single candidate is returned whatever its cost."""
    _fast, slow = backends = make_backends(0.010, 5.0)
    assert make_strategy(backends, FakeClock()).pick([slow], REQUEST) is slow


@pytest.mark.parametrize("decay_s", [0, -1.0, float("nan"), float("inf"), "10", True])
def test_decay_option_must_be_a_positive_number(decay_s: object) -> None:
    """A decay_s that is not a positive finite number is rejected naming the option."""
    with pytest.raises(ValueError, match="option 'decay_s' for strategy 'latency_weighted'"):
        LatencyWeighted(make_backends(0.030), options={"decay_s": decay_s})
