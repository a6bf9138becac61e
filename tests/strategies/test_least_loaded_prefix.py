"""Tests for lb.strategies.least_loaded with ``prefix_weight``: load scores against prefix match."""

from __future__ import annotations

import random
import string
from collections import Counter
from typing import Any

import pytest

from lb.backend import Backend
from lb.strategies import LeastLoaded, RequestInfo, build

NOW_S = 1000.0


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, now_s: float = NOW_S) -> None:
        self.now_s = now_s

    def __call__(self) -> float:
        return self.now_s


def make_backends(n: int) -> list[Backend]:
    return [Backend.from_url(f"http://127.0.0.1:{8001 + i}", name=f"b{i}") for i in range(n)]


def report(backend: Backend, waiting: float = 0.0, kv: float = 0.0, *, age_s: float = 0.1) -> None:
    """Give ``backend`` a report taken ``age_s`` before NOW_S."""
    backend.reported_waiting = waiting
    backend.reported_running = 0.0
    backend.reported_kv_usage = kv
    backend.reported_at_s = NOW_S - age_s


def make_strategy(backends: list[Backend], seed: int = 1234, **options: Any) -> LeastLoaded:
    options.setdefault("prefix_weight", 1.0)
    return LeastLoaded(backends, rng=random.Random(seed), clock=FakeClock(), options=options)


def random_text(rng: random.Random, n: int) -> str:
    return "".join(rng.choices(string.ascii_letters + " ", k=n))


def chat(text: str | None) -> RequestInfo:
    return RequestInfo(method="POST", path="/v1/chat/completions", prompt=text)


RNG = random.Random(7)
SYSTEM = random_text(RNG, 2000)


def question(rng: random.Random) -> RequestInfo:
    return chat(SYSTEM + random_text(rng, 100))


def test_with_a_prefix_weight_the_strategy_reads_the_body() -> None:
    """A prefix weight makes the strategy ask for the body; without one it does not."""
    backends = make_backends(2)
    assert build("least_loaded", backends, options={"prefix_weight": 1}).needs_body is True
    assert build("least_loaded", backends).needs_body is False
    assert LeastLoaded(backends).prompts is None


def test_equally_loaded_backends_keep_a_prompt_where_its_prefix_was_sent() -> None:
    """With equal reports, forty questions after one system prompt all go to one backend."""
    backends = make_backends(3)
    for b in backends:
        report(b, waiting=0, kv=0.2)
    strategy = make_strategy(backends)
    rng = random.Random(1)
    chosen = {strategy.pick(backends, question(rng)) for _ in range(40)}
    assert len(chosen) == 1


def test_a_prefix_outweighs_a_little_more_load() -> None:
    """The holder with more in flight and KV, but no queue, keeps its prefix."""
    holder, idle = backends = make_backends(2)
    strategy = make_strategy(backends)
    report(holder, waiting=0, kv=0.3)
    report(idle, waiting=0, kv=0.3)
    rng = random.Random(2)
    assert strategy.pick([holder], question(rng)) is holder
    report(holder, waiting=0, kv=0.5)
    holder.in_flight = 6
    idle.in_flight = 2
    assert strategy.pick(backends, question(rng)) is holder
    assert strategy.explain(holder, chat(None)).startswith("queue 0, kv 0.50, prefix 9")


def test_a_prefix_held_by_a_queueing_backend_loses_to_an_idle_one() -> None:
    """Once the holder queues, the queue term outweighs the prefix and the idle backend wins."""
    holder, idle = backends = make_backends(2)
    strategy = make_strategy(backends)
    report(holder)
    report(idle)
    rng = random.Random(3)
    assert strategy.pick([holder], question(rng)) is holder
    report(holder, waiting=4, kv=0.5)
    holder.in_flight = 20
    report(idle, waiting=0, kv=0.1)
    idle.in_flight = 3
    assert strategy.pick(backends, question(rng)) is idle
    assert strategy.explain(idle, chat(None)) == "queue 0, kv 0.10, prefix 0%"


def test_a_larger_prefix_weight_keeps_the_prefix_through_a_queue() -> None:
    """With prefix_weight 3 a match of the whole prompt outweighs even the deepest queue."""
    holder, idle = backends = make_backends(2)
    strategy = make_strategy(backends, prefix_weight=3.0)
    report(holder)
    report(idle)
    rng = random.Random(4)
    strategy.pick([holder], question(rng))
    report(holder, waiting=4, kv=0.5)
    holder.in_flight = 20
    report(idle, waiting=0, kv=0.1)
    assert strategy.pick(backends, question(rng)) is holder


def test_a_hot_prefix_spreads_once_its_replica_saturates_and_then_sticks_to_both() -> None:
    """When the holder queues the prefix gains a second holder; later picks share the two."""
    backends = make_backends(4)
    strategy = make_strategy(backends)
    for b in backends:
        report(b)
    rng = random.Random(5)
    first = strategy.pick(backends, question(rng))
    report(first, waiting=3, kv=0.6)
    first.in_flight = 19
    second = strategy.pick(backends, question(rng))
    assert second is not first
    # The queue drains; both now hold the prefix, and the less loaded of the two takes it.
    report(first, waiting=0, kv=0.4)
    report(second, waiting=0, kv=0.4)
    first.in_flight = 8
    second.in_flight = 2
    assert strategy.pick(backends, question(rng)) is second
    first.in_flight, second.in_flight = 2, 8
    assert strategy.pick(backends, question(rng)) is first
    others = set(backends) - {first, second}
    assert all(strategy.pick(backends, question(rng)) not in others for _ in range(20))


def test_a_stale_holder_is_not_idle() -> None:
    """A holder whose report is stale scores as the most loaded fresh backend, not as idle."""
    holder, busy_fresh, idle = backends = make_backends(3)
    strategy = make_strategy(backends, prefix_weight=0.5)
    for b in backends:
        report(b)
    rng = random.Random(6)
    strategy.pick([holder], question(rng))
    report(holder, waiting=0, kv=0.0, age_s=30.0)
    report(busy_fresh, waiting=5, kv=0.9)
    report(idle, waiting=0, kv=0.1)
    # Stale: queue 1 (as the most queued) + kv 0.9: the half-weighted prefix cannot save it.
    assert strategy.pick(backends, question(rng)) is idle


def test_with_every_report_stale_the_prefix_competes_with_in_flight_load() -> None:
    """No fresh report: in-flight load (normalised) against the prefix decides."""
    holder, other = backends = make_backends(2)
    strategy = make_strategy(backends)
    rng = random.Random(8)
    strategy.pick([holder], question(rng))
    holder.in_flight, other.in_flight = 3, 2
    assert strategy.pick(backends, question(rng)) is holder
    assert "stale reports" in strategy.explain(holder, chat(None))
    assert strategy.pick(backends, chat(random_text(rng, 500))) is other


def test_prompts_without_a_shared_prefix_are_placed_by_load() -> None:
    """Unrelated prompts with equal reports spread over every backend."""
    backends = make_backends(3)
    for b in backends:
        report(b)
    strategy = make_strategy(backends)
    rng = random.Random(9)
    counts = Counter(strategy.pick(backends, chat(random_text(rng, 300))) for _ in range(300))
    assert set(counts) == set(backends)
    assert min(counts.values()) > 30  # a one-character match tips a tie, nothing more


def test_a_request_without_a_prompt_is_placed_by_load_alone() -> None:
    """No prompt: nothing recorded, and the least loaded wins."""
    busy, free = backends = make_backends(2)
    report(busy, waiting=3)
    report(free, waiting=0)
    strategy = make_strategy(backends)
    assert strategy.pick(backends, chat(None)) is free
    assert strategy.explain(free, chat(None)) == "queue 0, kv 0.00, prefix 0%"
    assert strategy.prompts is not None and strategy.prompts.tree.nodes == 0


def test_the_tree_stays_within_its_budget() -> None:
    """However many distinct prompts pass, the tree's charge stays within max_tree_chars."""
    backends = make_backends(3)
    for b in backends:
        report(b)
    strategy = make_strategy(backends, max_tree_chars=20_000, max_prompt_chars=1000)
    rng = random.Random(10)
    for _ in range(300):
        strategy.pick(backends, chat(random_text(rng, 1500)))
    assert strategy.prompts is not None
    assert strategy.prompts.tree.charged_chars <= 20_000


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"prefix_weight": -1}, "prefix_weight"),
        ({"prefix_weight": "high"}, "prefix_weight"),
        ({"prefix_weight": 1, "max_prompt_chars": 0}, "max_prompt_chars"),
        ({"prefix_weight": 1, "max_tree_chars": 10}, "max_tree_chars"),
        ({"max_tree_chars": 1.5}, "max_tree_chars"),
    ],
)
def test_bad_prefix_options_are_refused(options: dict[str, Any], message: str) -> None:
    """Each bad option raises ValueError naming it."""
    with pytest.raises(ValueError, match=message):
        LeastLoaded(make_backends(2), options=options)


def test_a_large_pool_still_finds_the_prefix_holder() -> None:
    """Among 200 equally loaded backends the holder of a prefix keeps getting its prompts."""
    backends = make_backends(200)
    for b in backends:
        report(b, waiting=0, kv=0.2)
    strategy = make_strategy(backends)
    rng = random.Random(11)
    first = strategy.pick(backends, question(rng))
    assert all(strategy.pick(backends, question(rng)) is first for _ in range(50))


def test_a_large_pool_spreads_unrelated_prompts_by_load() -> None:
    """Without a prefix, a pick in a large pool is the better of two: never the busiest."""
    backends = make_backends(100)
    for b in backends:
        report(b, waiting=0, kv=0.1)
    busiest = backends[37]
    report(busiest, waiting=9, kv=0.9)
    busiest.in_flight = 30
    strategy = make_strategy(backends, prefix_weight=0.0)
    counts = Counter(strategy.pick(backends, chat(None)) for _ in range(3000))
    assert busiest not in counts
    assert len(counts) > 90
