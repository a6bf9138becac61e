"""Tests for lb.strategies.consistent_hash: a ring of virtual nodes with bounded loads."""

from __future__ import annotations

import math
import random
from collections import Counter
from typing import Any

import pytest

from lb.backend import Backend
from lb.load import Attempt
from lb.pool import Pool, PoolTimeouts
from lb.strategies import ConsistentHash, RequestInfo, build
from lb.strategies.consistent_hash import ring_hash


def make_backends(*weights: int) -> list[Backend]:
    return [
        Backend.from_url(f"http://127.0.0.1:{8001 + i}", weight=weight)
        for i, weight in enumerate(weights)
    ]


def make_strategy(backends: list[Backend], **options: Any) -> ConsistentHash:
    return ConsistentHash(backends, rng=random.Random(1234), options=options)


def prompt(text: str | None) -> RequestInfo:
    return RequestInfo(method="POST", path="/v1/chat/completions", prompt=text)


def owners(strategy: ConsistentHash, keys: list[str]) -> dict[str, str]:
    """The backend name each key (as a prompt) maps to, all backends idle and eligible."""
    candidates = list(strategy.backends)
    return {key: strategy.pick(candidates, prompt(key)).name for key in keys}


KEYS = [f"session-{i}" for i in range(2000)]


def test_same_key_maps_to_the_same_backend_while_loads_are_even() -> None:
    """With nothing in flight, every key goes to one backend, every time."""
    backends = make_backends(1, 1, 1)
    strategy = make_strategy(backends)
    first = owners(strategy, KEYS)
    assert owners(strategy, KEYS) == first
    assert owners(make_strategy(backends), KEYS) == first  # a rebuilt ring agrees


def test_removing_a_backend_moves_only_the_keys_it_owned() -> None:
    """Keys owned by the remaining backends stay put; about 1/n of the keys move."""
    backends = make_backends(1, 1, 1, 1)
    before = owners(make_strategy(backends), KEYS)
    removed = backends[2]
    after = owners(make_strategy([b for b in backends if b is not removed]), KEYS)
    moved = [key for key in KEYS if before[key] != after[key]]
    assert all(before[key] == removed.name for key in moved)
    assert len(moved) == sum(1 for key in KEYS if before[key] == removed.name)
    assert 0.15 * len(KEYS) <= len(moved) <= 0.35 * len(KEYS)


def test_adding_a_backend_moves_keys_only_to_it() -> None:
    """A new backend takes about 1/n of the keys, and only keys move to it."""
    backends = make_backends(1, 1, 1, 1)
    before = owners(make_strategy(backends[:3]), KEYS)
    after = owners(make_strategy(backends), KEYS)
    moved = [key for key in KEYS if before[key] != after[key]]
    assert all(after[key] == backends[3].name for key in moved)
    assert 0.15 * len(KEYS) <= len(moved) <= 0.35 * len(KEYS)


def test_keys_spread_evenly_over_backends() -> None:
    """10,000 keys over 3 backends with 100 virtual nodes: each within 30% of a fair third."""
    backends = make_backends(1, 1, 1)
    strategy = make_strategy(backends, virtual_nodes=100)
    counts = Counter(owners(strategy, [f"user-{i}" for i in range(10_000)]).values())
    assert len(counts) == 3
    assert all(abs(count - 10_000 / 3) <= 0.3 * 10_000 / 3 for count in counts.values())


def test_weights_skew_the_share_of_keys() -> None:
    """A weight-3 backend owns about three quarters of the keys against a weight-1 one."""
    light, heavy = backends = make_backends(1, 3)
    counts = Counter(owners(make_strategy(backends), [f"user-{i}" for i in range(10_000)]).values())
    assert 0.65 <= counts[heavy.name] / 10_000 <= 0.85
    assert counts[light.name] + counts[heavy.name] == 10_000


def test_hot_key_spills_over_once_its_owner_reaches_the_bound() -> None:
    """One key under growing concurrency: no backend ever holds more than ceil(c * avg) + 1."""
    backends = make_backends(1, 1, 1)
    strategy = make_strategy(backends, balance_factor=1.25)
    request = prompt("the same system prompt every time")
    for _ in range(300):
        strategy.pick(backends, request).in_flight += 1
        total = sum(b.in_flight for b in backends)
        assert max(b.in_flight for b in backends) <= math.ceil(1.25 * total / 3) + 1
    assert min(b.in_flight for b in backends) >= 40  # the third backend takes the rest


def test_bound_scales_with_weight_under_a_hot_key() -> None:
    """With weights 1 and 3, a hot key fills each backend to at most its weighted bound."""
    light, heavy = backends = make_backends(1, 3)
    strategy = make_strategy(backends, balance_factor=1.25)
    request = prompt("hot")
    for _ in range(400):
        strategy.pick(backends, request).in_flight += 1
        total = light.in_flight + heavy.in_flight
        assert light.in_flight <= math.ceil(1.25 * total * 1 / 4) + 1
        assert heavy.in_flight <= math.ceil(1.25 * total * 3 / 4) + 1
    assert min(light.in_flight, heavy.in_flight) >= 20  # owner at its bound, the other the rest


def test_owner_under_the_bound_keeps_the_key_despite_some_load() -> None:
    """The owner keeps its key while its load stays below ceil(c * average)."""
    backends = make_backends(1, 1, 1)
    strategy = make_strategy(backends, balance_factor=2)
    request = prompt("sticky")
    owner = strategy.pick(backends, request)
    for backend in backends:
        backend.in_flight = 4
    owner.in_flight = 8  # total 17 with this request, bound ceil(2 * 17 / 3) = 12
    assert strategy.pick(backends, request) is owner
    assert strategy.explain(owner, request) == "hash owner"


def test_overloaded_owner_passes_the_key_clockwise_to_the_same_next_backend() -> None:
    """At its bound the owner is skipped, for one fixed next backend, and explain says so."""
    backends = make_backends(1, 1, 1, 1)
    strategy = make_strategy(backends)
    request = prompt("hot key")
    owner = strategy.pick(backends, request)
    owner.in_flight = 10  # total 11, bound ceil(1.25 * 11 / 4) = 4
    nexts = {strategy.pick(backends, request) for _ in range(20)}
    assert len(nexts) == 1
    assert owner not in nexts
    assert strategy.explain(nexts.pop(), request) == "hash owner overloaded, next"


def test_owner_that_is_not_a_candidate_is_replaced_by_the_next_on_the_ring() -> None:
    """A key whose owner was filtered out goes to the next distinct backend, as removal would."""
    backends = make_backends(1, 1, 1, 1)
    strategy = make_strategy(backends)
    for key in KEYS[:200]:
        request = prompt(key)
        owner = strategy.pick(backends, request)
        others = [b for b in backends if b is not owner]
        chosen = strategy.pick(others, request)
        assert chosen in others
        assert strategy.explain(chosen, request) == "hash owner unavailable, next"
        without_owner = make_strategy(others)
        assert without_owner.pick(others, request) is chosen


def test_request_without_its_key_goes_to_the_least_loaded() -> None:
    """No prompt for a prompt key: the least-loaded candidate, and explain says so."""
    a, b, c = backends = make_backends(1, 1, 1)
    a.in_flight, b.in_flight, c.in_flight = 3, 1, 2
    strategy = make_strategy(backends)
    request = prompt(None)
    assert strategy.pick(backends, request) is b
    assert strategy.explain(b, request) == "no key: least loaded"


def test_header_key_does_not_need_the_body_and_sticks_by_header_value() -> None:
    """Keyed by a header, requests with one session id go to one backend whatever the prompt."""
    backends = make_backends(1, 1, 1)
    strategy = make_strategy(backends, key={"header": "X-Session-ID"})
    assert strategy.needs_body is False
    chosen = {
        strategy.pick(
            backends,
            RequestInfo(
                method="POST",
                path="/v1/completions",
                headers=[(b"x-session-id", b"abc123")],
                prompt=f"prompt {i}",
            ),
        )
        for i in range(50)
    }
    assert len(chosen) == 1


def test_header_key_without_the_header_goes_to_the_least_loaded() -> None:
    """A request lacking the configured header is placed by load, not by its prompt."""
    a, b = backends = make_backends(1, 1)
    a.in_flight = 5
    strategy = make_strategy(backends, key={"header": "x-session-id"})
    assert strategy.pick(backends, prompt("some prompt")) is b


def test_user_key_sticks_by_user_and_needs_the_body() -> None:
    """Keyed by user, one user's requests land together whatever their prompts."""
    backends = make_backends(1, 1, 1)
    strategy = make_strategy(backends, key="user")
    assert strategy.needs_body is True
    picks = {
        strategy.pick(backends, RequestInfo(method="POST", path="/", user="alice", prompt=str(i)))
        for i in range(50)
    }
    assert len(picks) == 1


def test_prompt_key_hashes_only_the_first_prefix_tokens_times_four_chars() -> None:
    """With prefix_tokens 2, prompts agreeing on their first 8 characters share a backend."""
    backends = make_backends(1, 1, 1, 1, 1)
    strategy = make_strategy(backends, prefix_tokens=2)
    picks = {strategy.pick(backends, prompt(f"abcdefgh{i}")) for i in range(50)}
    assert len(picks) == 1
    spread = {strategy.pick(backends, prompt(f"{i:08d}")) for i in range(50)}
    assert len(spread) > 1


def test_prompt_with_a_lone_surrogate_is_hashed() -> None:
    """A JSON escape such as \\ud800 decodes to a lone surrogate; it is hashed, not an error."""
    backends = make_backends(1, 1)
    strategy = make_strategy(backends)
    assert strategy.pick(backends, prompt("\ud800 hi")) in backends


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"key": "model"}, "option 'key'"),
        ({"key": {"header": ""}}, "option 'key'"),
        ({"key": {"header": "x", "other": 1}}, "option 'key'"),
        ({"virtual_nodes": 0}, "option 'virtual_nodes'"),
        ({"prefix_tokens": 1.5}, "option 'prefix_tokens'"),
        ({"balance_factor": 0.9}, "option 'balance_factor'"),
        ({"balance_factor": True}, "option 'balance_factor'"),
    ],
)
def test_invalid_options_are_rejected_naming_the_option(
    options: dict[str, Any], message: str
) -> None:
    """Each malformed option is a ValueError naming it."""
    with pytest.raises(ValueError, match=message):
        make_strategy(make_backends(1, 1), **options)


def test_registry_builds_it_and_rejects_unknown_options() -> None:
    """``consistent_hash`` is a built-in name with its options checked."""
    backends = make_backends(1, 1)
    assert isinstance(build("consistent_hash", backends, options={"key": "user"}), ConsistentHash)
    with pytest.raises(ValueError, match="unknown option 'decay_s'"):
        build("consistent_hash", backends, options={"decay_s": 1})


def reference_pick(
    strategy: ConsistentHash,
    candidates: list[Backend],
    key: str,
    pool: Pool | None = None,
) -> Backend | None:
    """The bounded-loads rule written out plainly: the first candidate clockwise from the key
    under ceil(c * (sum(in_flight) + 1) * w / W); ``None`` when none is. The sums are over the
    candidates, or over ``pool`` (its in-flight total and eligible weight) when given."""
    if pool is None:
        total = sum(b.in_flight for b in candidates) + 1
        weights = sum(b.effective_weight for b in candidates)
    else:
        total = sum(b.in_flight for b in pool.backends) + 1
        weights = sum(b.effective_weight for b in pool.eligible)
    ring = sorted(
        (ring_hash(f"{b.name}#{i}".encode()), order, b)
        for order, b in enumerate(strategy.backends)
        for i in range(strategy.virtual_nodes * b.weight)
    )
    start = next((i for i, (p, _, _) in enumerate(ring) if p >= ring_hash(key.encode())), 0)
    for step in range(len(ring)):
        backend = ring[(start + step) % len(ring)][2]
        bound = math.ceil(
            strategy.balance_factor * total * backend.effective_weight / weights - 1e-9
        )
        if backend in candidates and backend.in_flight < bound:
            return backend
    return None


@pytest.mark.parametrize("size", [20, 100])
def test_picks_match_the_bounded_loads_rule_over_a_busy_pool(size: int) -> None:
    """Over random loads, weights and candidate subsets, each pick is the rule's answer: with
    sums over the candidates up to 32 of them, over the pool's running totals beyond."""
    rng = random.Random(99)
    backends = make_backends(*[1 + i % 3 for i in range(size)])
    strategy = make_strategy(backends, virtual_nodes=10)
    pool = Pool("p", backends, strategy, {}, PoolTimeouts())
    for i in range(300):
        for backend in backends:
            backend.in_flight = rng.choice([0, 0, 1, 2, 3, 5, 8, 13])
        pool.load.in_flight = sum(b.in_flight for b in backends)  # as Attempt keeps it
        tried = rng.sample(backends, rng.randint(0, 3))
        candidates = pool.candidates(tried)  # the tuple, or a view leaving the tried out
        key = f"tenant-{rng.randint(0, 40)}"
        expected = reference_pick(
            strategy, list(candidates), key, pool if len(candidates) > 32 else None
        )
        chosen = strategy.pick(candidates, prompt(key))
        if expected is not None:
            assert chosen is expected, i
        assert chosen not in tried


def test_idle_owner_takes_its_key_in_a_busy_pool() -> None:
    """An owner with nothing in flight is under any bound, however busy the others are."""
    backends = make_backends(*[1] * 50)
    strategy = make_strategy(backends)
    request = prompt("owner idle")
    owner = strategy.pick(backends, request)
    for backend in backends:
        backend.in_flight = 0 if backend is owner else 40
    assert strategy.pick(tuple(backends), request) is owner
    assert strategy.explain(owner, request) == "hash owner"


def test_a_large_pools_running_totals_follow_attempts_and_weights() -> None:
    """The totals a large pool's bound reads are kept by the attempts themselves and by the
    pool: they equal the sums they stand for after attempts start and end and weights change."""
    backends = make_backends(*[1 + i % 2 for i in range(40)])
    pool = Pool("p", backends, make_strategy(backends), {}, PoolTimeouts())
    attempts = [Attempt(backends[i % 7]) for i in range(25)]
    assert pool.load.in_flight == sum(b.in_flight for b in backends) == 25
    for attempt in attempts[:10]:
        attempt.finish()
    attempts[10].finish(failed=True)
    attempts[10].finish()  # a second finish counts nothing
    assert pool.load.in_flight == sum(b.in_flight for b in backends) == 14
    assert pool.load.eligible_weight == sum(b.weight for b in backends)
    backends[3].drained = True
    pool.refresh()
    assert pool.load.eligible_weight == sum(b.weight for b in backends) - backends[3].weight


def test_a_hot_key_in_a_large_pool_spreads_once_its_owner_is_over_the_bound() -> None:
    """With 100 backends, requests for one key held in flight fill its owner up to the bound
    (the pool's total load), then go on around the ring, never past the bound."""
    backends = make_backends(*([1] * 100))
    strategy = make_strategy(backends, balance_factor=1.25)
    pool = Pool("p", backends, strategy, {}, PoolTimeouts())
    for b in backends:  # a busy pool: 2 in flight everywhere
        for _ in range(2):
            Attempt(b)
    held = []
    for _ in range(30):
        chosen = strategy.pick(pool.candidates(()), prompt("hot tenant"))
        held.append(Attempt(chosen))
        bound = math.ceil(1.25 * (pool.load.in_flight) / 100 - 1e-9)
        assert chosen.in_flight <= bound
    per_backend = Counter(a.backend.name for a in held)
    assert len(per_backend) > 1
    assert max(per_backend.values()) < 30
