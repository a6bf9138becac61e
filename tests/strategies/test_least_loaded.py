"""Tests for lb.strategies.least_loaded: lowest weighted reported queue, KV usage and in-flight."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest

from lb.backend import Backend
from lb.strategies import BUILTIN, LeastLoaded, RequestInfo, build

REQUEST = RequestInfo(method="POST", path="/v1/chat/completions")
NOW_S = 1000.0


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, now_s: float = NOW_S) -> None:
        self.now_s = now_s

    def __call__(self) -> float:
        return self.now_s


def make_backends(n: int) -> list[Backend]:
    return [Backend.from_url(f"http://127.0.0.1:{8001 + i}", name=f"b{i}") for i in range(n)]


def report(
    backend: Backend,
    waiting: float | None = 0.0,
    kv: float | None = 0.0,
    *,
    running: float | None = 0.0,
    age_s: float = 0.1,
) -> None:
    """Give ``backend`` a report taken ``age_s`` before NOW_S."""
    backend.reported_waiting = waiting
    backend.reported_running = running
    backend.reported_kv_usage = kv
    backend.reported_at_s = NOW_S - age_s


def make_strategy(
    backends: list[Backend], clock: FakeClock | None = None, **options: Any
) -> LeastLoaded:
    return LeastLoaded(
        backends, rng=random.Random(1234), clock=clock or FakeClock(), options=options
    )


def picks(strategy: LeastLoaded, backends: list[Backend], n: int = 200) -> Counter[str]:
    return Counter(strategy.pick(backends, REQUEST).name for _ in range(n))


def test_least_loaded_is_a_builtin_strategy() -> None:
    """The registry builds it by name, and the name is the class's."""
    assert BUILTIN["least_loaded"] is LeastLoaded
    strategy = build("least_loaded", make_backends(2), options={"kv_weight": 2})
    assert isinstance(strategy, LeastLoaded)
    assert strategy.kv_weight == 2.0
    assert strategy.needs_body is False


def test_the_backend_with_a_deep_queue_loses() -> None:
    """Equal KV usage and in-flight: the backend with 12 queued never wins over the one with 1."""
    deep, shallow = backends = make_backends(2)
    report(deep, waiting=12, kv=0.4)
    report(shallow, waiting=1, kv=0.4)
    assert picks(make_strategy(backends), backends) == {"b1": 200}


def test_high_kv_usage_loses() -> None:
    """Equal queues: the backend with its KV cache 95% full loses to one at 20%."""
    full, roomy = backends = make_backends(2)
    report(full, waiting=3, kv=0.95)
    report(roomy, waiting=3, kv=0.20)
    assert picks(make_strategy(backends), backends) == {"b1": 200}


def test_the_score_weighs_the_terms_as_configured() -> None:
    """A short queue with a full cache beats a long queue with an empty one only when the queue
    weighs more than the KV term."""
    queued, full = backends = make_backends(2)
    report(queued, waiting=10, kv=0.0)  # waiting_norm 1, kv 0
    report(full, waiting=2, kv=0.9)  # waiting_norm 0.2, kv 0.9
    assert picks(make_strategy(backends), backends) == {"b0": 200}  # 1.0 < 1.1
    assert picks(make_strategy(backends, kv_weight=0.5), backends) == {"b1": 200}  # 0.65 < 1


def test_the_proxys_in_flight_count_spreads_load_between_scrapes() -> None:
    """With identical reports, the backend the proxy already sent more to loses."""
    busy, idle = backends = make_backends(2)
    report(busy, waiting=2, kv=0.3)
    report(idle, waiting=2, kv=0.3)
    busy.in_flight = 4
    assert picks(make_strategy(backends), backends) == {"b1": 200}


def test_recent_failures_count_as_in_flight_load() -> None:
    """A backend that fails fast, reporting an empty queue, does not look idle."""
    failing, ok = backends = make_backends(2)
    report(failing, waiting=0, kv=0.0)
    report(ok, waiting=0, kv=0.0)
    ok.in_flight = 1
    failing.failure_score, failing.failure_stamp_s = 3.0, NOW_S
    assert picks(make_strategy(backends), backends) == {"b1": 200}


def test_a_stale_report_is_not_treated_as_idle() -> None:
    """A backend whose last report (queue 0, KV 0) is older than max_age_s loses to a fresh
    backend with a small queue."""
    stale, small, big = backends = make_backends(3)
    report(stale, waiting=0, kv=0.0, age_s=5.0)
    report(small, waiting=1, kv=0.1)
    report(big, waiting=8, kv=0.5)
    strategy = make_strategy(backends)
    assert picks(strategy, backends) == {"b1": 200}


def test_a_stale_backend_is_as_loaded_as_the_most_loaded_fresh_one() -> None:
    """Stale counts as the worst fresh queue and KV usage, so in-flight counts decide between
    it and the most loaded fresh backend."""
    stale, worst = backends = make_backends(2)
    report(stale, waiting=0, kv=0.0, age_s=5.0)
    report(worst, waiting=6, kv=0.7)
    worst.in_flight = 2
    assert picks(make_strategy(backends), backends) == {"b0": 200}
    stale.in_flight = 3
    assert picks(make_strategy(backends), backends) == {"b1": 200}


def test_a_report_goes_stale_as_the_clock_moves_past_max_age() -> None:
    """The same report wins while fresh and stops winning once older than max_age_s."""
    quiet, busy = backends = make_backends(2)
    report(quiet, waiting=0, kv=0.0, age_s=0.0)
    report(busy, waiting=5, kv=0.5, age_s=0.0)
    clock = FakeClock()
    strategy = make_strategy(backends, clock, max_age_s=2.0)
    assert picks(strategy, backends, 50) == {"b0": 50}
    clock.now_s = NOW_S + 2.5
    busy.reported_at_s = clock.now_s  # busy is still scraped; quiet's scrapes stopped
    busy.in_flight = 1
    # quiet is now estimated at busy's queue and KV, and wins only on in-flight count.
    assert picks(strategy, backends, 50) == {"b0": 50}
    quiet.in_flight = 2
    assert picks(strategy, backends, 50) == {"b1": 50}


def test_a_backend_that_never_reported_is_not_idle() -> None:
    """No report at all (the fields still None) counts like a stale one."""
    _new, fresh = backends = make_backends(2)
    report(fresh, waiting=0, kv=0.2)
    assert picks(make_strategy(backends), backends) == {"b1": 200}


def test_when_every_report_is_stale_the_least_in_flight_wins() -> None:
    """No fresh report at all: reports are ignored and the least in-flight backend wins."""
    a, b, c = backends = make_backends(3)
    report(a, waiting=0, kv=0.0, age_s=9.0)
    report(b, waiting=50, kv=1.0, age_s=9.0)
    a.in_flight, b.in_flight, c.in_flight = 3, 1, 2
    strategy = make_strategy(backends)
    assert picks(strategy, backends) == {"b1": 200}
    assert strategy.explain(b, REQUEST) == "stale reports, least in_flight (1)"


def test_ties_are_broken_at_random() -> None:
    """Identical reports and in-flight counts split picks evenly (seeded)."""
    backends = make_backends(3)
    for b in backends:
        report(b, waiting=2, kv=0.5)
    counts = picks(make_strategy(backends), backends, 3000)
    assert set(counts) == {"b0", "b1", "b2"}
    assert all(900 <= n <= 1100 for n in counts.values())


def test_all_stale_ties_are_broken_at_random() -> None:
    """The in-flight fallback breaks ties at random too."""
    backends = make_backends(2)
    counts = picks(make_strategy(backends), backends, 2000)
    assert 900 <= counts["b0"] <= 1100 and counts["b0"] + counts["b1"] == 2000


def test_a_server_without_a_kv_metric_is_ranked_by_queue() -> None:
    """KV usage None everywhere (TGI) changes no ranking: the shorter queue wins."""
    a, b = backends = make_backends(2)
    report(a, waiting=4, kv=None)
    report(b, waiting=1, kv=None)
    strategy = make_strategy(backends)
    assert picks(strategy, backends) == {"b1": 200}
    assert strategy.explain(b, REQUEST) == "queue 1, running 0"


def test_a_server_without_a_kv_metric_is_judged_by_its_running_batch_when_queues_agree() -> None:
    """TGI reports its queue and its running batch but no KV usage: with equal queues the
    smaller batch wins, where it would otherwise be a coin toss."""
    busy, idle = backends = make_backends(2)
    report(busy, waiting=0, kv=None, running=64)
    report(idle, waiting=0, kv=None, running=0)
    strategy = make_strategy(backends)
    assert picks(strategy, backends) == {"b1": 200}
    assert strategy.explain(idle, REQUEST) == "queue 0, running 0"


def test_a_reported_kv_usage_decides_over_the_running_batch() -> None:
    """Where servers report KV usage (vLLM, SGLang), that is the memory term, not the batch."""
    a, b = backends = make_backends(2)
    report(a, waiting=0, kv=0.2, running=64)
    report(b, waiting=0, kv=0.6, running=4)
    assert picks(make_strategy(backends), backends) == {"b0": 200}


def test_explain_names_the_reported_queue_and_kv_usage() -> None:
    """A fresh pick explains itself with the report it used."""
    a, b = backends = make_backends(2)
    report(a, waiting=0, kv=0.31)
    report(b, waiting=3, kv=0.5)
    strategy = make_strategy(backends)
    chosen = strategy.pick(backends, REQUEST)
    assert chosen is a
    assert strategy.explain(chosen, REQUEST) == "queue 0, kv 0.31"


def test_explain_says_when_a_stale_backend_was_chosen_on_in_flight() -> None:
    """A stale backend chosen among fresh ones is explained by its in-flight count."""
    stale, worst = backends = make_backends(2)
    report(stale, age_s=5.0)
    report(worst, waiting=6, kv=0.7)
    worst.in_flight = 2
    strategy = make_strategy(backends)
    chosen = strategy.pick(backends, REQUEST)
    assert chosen is stale
    assert strategy.explain(chosen, REQUEST) == "stale report, in_flight 0"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"queue_weight": -1}, "option 'queue_weight'"),
        ({"kv_weight": "high"}, "option 'kv_weight'"),
        ({"inflight_weight": float("nan")}, "option 'inflight_weight'"),
        ({"max_age_s": 0}, "option 'max_age_s'"),
        ({"decay_s": True}, "option 'decay_s'"),
        ({"queue_weight": 0, "kv_weight": 0, "inflight_weight": 0}, "cannot all be 0"),
    ],
)
def test_bad_options_are_refused(options: dict[str, Any], message: str) -> None:
    """Each bad option value raises ValueError naming it."""
    with pytest.raises(ValueError, match=message):
        LeastLoaded(make_backends(2), options=options)


def test_unknown_options_are_refused_by_the_registry() -> None:
    """An option the strategy does not know is a config error."""
    with pytest.raises(ValueError, match="unknown option 'queue'"):
        build("least_loaded", make_backends(2), options={"queue": 1})
