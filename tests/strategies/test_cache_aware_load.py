"""Tests for lb.strategies.cache_aware with load reports, and in large pools."""

from __future__ import annotations

import random
import string
from collections import Counter
from typing import Any

import pytest

from lb.backend import Backend
from lb.strategies import CacheAware, RequestInfo

NOW_S = 500.0


def make_backends(n: int) -> list[Backend]:
    return [Backend.from_url(f"http://127.0.0.1:{8001 + i}", name=f"b{i}") for i in range(n)]


def make_strategy(backends: list[Backend], seed: int = 1234, **options: Any) -> CacheAware:
    return CacheAware(backends, rng=random.Random(seed), clock=lambda: NOW_S, options=options)


def report(backend: Backend, waiting: float, *, age_s: float = 0.1) -> None:
    backend.reported_waiting = waiting
    backend.reported_running = 16.0
    backend.reported_kv_usage = 0.5
    backend.reported_at_s = NOW_S - age_s


def random_text(rng: random.Random, n: int) -> str:
    return "".join(rng.choices(string.ascii_letters + " ", k=n))


def chat(text: str | None) -> RequestInfo:
    return RequestInfo(method="POST", path="/v1/chat/completions", prompt=text)


SYSTEM = random_text(random.Random(3), 2000)


def question(rng: random.Random) -> RequestInfo:
    return chat(SYSTEM + random_text(rng, 100))


def test_a_queueing_holder_sends_its_prefix_to_a_backend_without_a_queue() -> None:
    """The holder reports a queue, another reports none: the prompt goes to the free one."""
    backends = make_backends(3)
    strategy = make_strategy(backends)
    rng = random.Random(1)
    holder = strategy.pick(backends, question(rng))
    others = [b for b in backends if b is not holder]
    report(holder, waiting=2)
    report(others[0], waiting=1)
    report(others[1], waiting=0)
    assert strategy.pick(backends, question(rng)) is others[1]
    assert strategy.explain(others[1], chat(None)) == "holder queueing: least loaded"


def test_the_spilled_prefix_then_has_two_holders_that_share_it_by_load() -> None:
    """After a spill both backends hold the prefix, and the less loaded of them takes it."""
    backends = make_backends(4)
    strategy = make_strategy(backends)
    rng = random.Random(2)
    first = strategy.pick(backends, question(rng))
    for b in backends:
        report(b, waiting=0)
    report(first, waiting=3)
    second = strategy.pick(backends, question(rng))
    assert second is not first
    report(first, waiting=0)
    first.in_flight, second.in_flight = 5, 1
    assert strategy.pick(backends, question(rng)) is second
    first.in_flight, second.in_flight = 1, 5
    assert strategy.pick(backends, question(rng)) is first


def test_a_holder_keeps_its_prefix_while_its_queue_is_empty() -> None:
    """More in flight but no queue: affinity holds, as without reports."""
    backends = make_backends(3)
    strategy = make_strategy(backends)
    rng = random.Random(3)
    holder = strategy.pick(backends, question(rng))
    for b in backends:
        report(b, waiting=0)
    holder.in_flight = 12
    assert all(strategy.pick(backends, question(rng)) is holder for _ in range(20))


def test_when_every_backend_queues_the_holder_keeps_its_prefix() -> None:
    """With no candidate free of a queue, spilling would only cost the cache: the holder stays."""
    backends = make_backends(3)
    strategy = make_strategy(backends)
    rng = random.Random(4)
    holder = strategy.pick(backends, question(rng))
    for b in backends:
        report(b, waiting=4)
    assert strategy.pick(backends, question(rng)) is holder


@pytest.mark.parametrize("stale", ["holder", "others"])
def test_stale_reports_neither_queue_nor_free(stale: str) -> None:
    """A stale queue does not push a prompt away, and a stale empty queue does not attract it."""
    backends = make_backends(2)
    strategy = make_strategy(backends, max_age_s=1.0)
    rng = random.Random(5)
    holder = strategy.pick(backends, question(rng))
    other = next(b for b in backends if b is not holder)
    report(holder, waiting=5, age_s=5.0 if stale == "holder" else 0.1)
    report(other, waiting=0, age_s=5.0 if stale == "others" else 0.1)
    assert strategy.pick(backends, question(rng)) is holder


def test_max_age_s_must_be_positive() -> None:
    """max_age_s of 0 is refused, naming the option."""
    with pytest.raises(ValueError, match="max_age_s"):
        make_strategy(make_backends(2), max_age_s=0)


def test_a_large_pool_always_considers_the_prefix_holder() -> None:
    """Among 500 backends, questions after one system prompt keep going to its holder."""
    backends = make_backends(500)
    strategy = make_strategy(backends)
    rng = random.Random(6)
    holder = strategy.pick(backends, question(rng))
    assert all(strategy.pick(backends, question(rng)) is holder for _ in range(100))
    assert strategy.explain(holder, chat(None)).startswith("prefix match 9")


def test_a_large_pool_spreads_new_prefixes_by_the_better_of_two() -> None:
    """Unrelated prompts over 100 backends reach nearly all of them, never the busiest."""
    backends = make_backends(100)
    busiest = backends[10]
    busiest.in_flight = 50
    for b in backends:
        if b is not busiest:
            b.in_flight = 3
    strategy = make_strategy(backends, cache_threshold=0.9)
    rng = random.Random(7)
    counts = Counter(strategy.pick(backends, chat(random_text(rng, 300))) for _ in range(2000))
    assert busiest not in counts
    assert len(counts) > 90


def test_a_large_pool_spills_a_queueing_holder() -> None:
    """In a large pool a holder with a queue gives the prompt to a sampled backend without one."""
    backends = make_backends(64)
    strategy = make_strategy(backends)
    rng = random.Random(8)
    holder = strategy.pick(backends, question(rng))
    for b in backends:
        report(b, waiting=0)
    report(holder, waiting=6)
    assert strategy.pick(backends, question(rng)) is not holder


def test_a_large_pool_with_a_subset_of_candidates_matches_only_among_them() -> None:
    """A holder left out of the candidates (tried already) is not chosen."""
    backends = make_backends(40)
    strategy = make_strategy(backends)
    rng = random.Random(9)
    holder = strategy.pick(backends, question(rng))
    rest = [b for b in backends if b is not holder]
    assert all(strategy.pick(rest, question(rng)) is not holder for _ in range(20))
