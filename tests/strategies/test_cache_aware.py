"""Tests for lb.strategies.cache_aware and its tree: prefix affinity with a load override."""

from __future__ import annotations

import gc
import random
import string
import tracemalloc
from collections import Counter
from typing import Any

import pytest

from lb.backend import Backend
from lb.strategies import CacheAware, RequestInfo, build
from lb.strategies.prefix_tree import ENTRY_OVERHEAD_CHARS, PrefixTree


def make_backends(n: int) -> list[Backend]:
    return [Backend.from_url(f"http://127.0.0.1:{8001 + i}") for i in range(n)]


def make_strategy(backends: list[Backend], **options: Any) -> CacheAware:
    return CacheAware(backends, rng=random.Random(1234), options=options)


def prompt(text: str | None) -> RequestInfo:
    return RequestInfo(method="POST", path="/v1/chat/completions", prompt=text)


def random_text(rng: random.Random, n: int) -> str:
    return "".join(rng.choices(string.ascii_letters + " ", k=n))


RNG = random.Random(42)
SYSTEM = random_text(RNG, 2000)


def test_prompts_sharing_a_long_prefix_stick_to_one_backend() -> None:
    """Fifty questions after one 2,000-character system prompt all go to one backend."""
    backends = make_backends(3)
    strategy = make_strategy(backends)
    rng = random.Random(1)
    picks = [strategy.pick(backends, prompt(SYSTEM + random_text(rng, 100))) for _ in range(50)]
    assert len(set(picks)) == 1
    assert strategy.explain(picks[-1], prompt(None)).startswith("prefix match 9")


def test_different_prefixes_spread_by_smallest_tree() -> None:
    """Thirty unrelated prompts of equal length spread ten to each of three backends."""
    backends = make_backends(3)
    strategy = make_strategy(backends)
    rng = random.Random(2)
    counts = Counter(strategy.pick(backends, prompt(random_text(rng, 500))) for _ in range(30))
    assert sorted(counts.values()) == [10, 10, 10]


def test_prompt_sharing_only_a_short_prefix_does_not_stick() -> None:
    """A prompt matching 10% of a cached one goes, loads being equal, to the smallest tree."""
    backends = make_backends(3)
    strategy = make_strategy(backends)
    rng = random.Random(3)
    shared = random_text(rng, 100)
    first = strategy.pick(backends, prompt(shared + random_text(rng, 900)))
    second = prompt(shared + random_text(rng, 900))
    chosen = strategy.pick(backends, second)
    assert chosen is not first
    assert strategy.explain(chosen, second) == "no match: least loaded"


def test_hot_prefix_does_not_flood_its_owner() -> None:
    """With in-flight piling up, the owner stops at the imbalance threshold; load spreads."""
    backends = make_backends(3)
    strategy = make_strategy(backends)  # balance_abs_threshold 32, balance_rel_threshold 1.1
    request = prompt(SYSTEM)
    owner = strategy.pick(backends, request)
    owner.in_flight += 1
    reasons: Counter[str] = Counter()
    for _ in range(300):
        chosen = strategy.pick(backends, request)
        reasons[strategy.explain(chosen, request)] += 1
        chosen.in_flight += 1
        loads = [b.in_flight for b in backends]
        assert max(loads) - min(loads) <= 33
    assert reasons["imbalanced: least loaded"] >= 1
    assert min(b.in_flight for b in backends) >= 80


def test_imbalance_needs_both_the_absolute_and_the_relative_gap() -> None:
    """A 40-request gap between 400 and 440 is not imbalanced (440 <= 1.1 * 400): affinity holds."""
    backends = make_backends(2)
    strategy = make_strategy(backends)
    request = prompt(SYSTEM)
    owner = strategy.pick(backends, request)
    other = next(b for b in backends if b is not owner)
    owner.in_flight, other.in_flight = 440, 400
    assert strategy.pick(backends, request) is owner
    owner.in_flight, other.in_flight = 40, 0
    assert strategy.pick(backends, request) is other
    assert strategy.explain(other, request) == "imbalanced: least loaded"


def test_eviction_keeps_the_tree_within_budget_and_keeps_recent_prompts() -> None:
    """Inserting 25x the budget: never over it, the latest prompts still match, the first not."""
    backends = make_backends(3)
    strategy = make_strategy(backends, max_tree_chars=50_000, max_prompt_chars=1000)
    rng = random.Random(4)
    prompts = [random_text(rng, 1000) for _ in range(1200)]
    for text in prompts:
        strategy.pick(backends, prompt(text))
        assert strategy.tree.charged_chars <= 50_000
        assert sum(strategy.tree.tenant_chars.values()) <= 50_000
    for text in prompts[-30:]:
        assert strategy.tree.match(text, backends)[0] == len(text)
    assert all(strategy.tree.match(text, backends)[0] < 10 for text in prompts[:30])


def test_candidates_without_the_best_match_fall_back_to_the_least_loaded() -> None:
    """The backend holding the prefix is not a candidate: another is chosen by load."""
    a, b, c = backends = make_backends(3)
    strategy = make_strategy(backends)
    request = prompt(SYSTEM)
    assert strategy.pick([a], request) is a
    chosen = strategy.pick([b, c], request)
    assert chosen in (b, c)
    assert strategy.explain(chosen, request) == "no match: least loaded"


def test_a_prompt_no_cache_helps_goes_to_the_least_loaded_not_the_smallest_tree() -> None:
    """Without a useful match, load decides before tree size: a busy empty cache loses."""
    a, b = backends = make_backends(2)
    strategy = make_strategy(backends)
    strategy.pick([a], prompt(SYSTEM))  # a holds a large tree, b none
    a.in_flight, b.in_flight = 0, 3
    rng = random.Random(9)
    assert strategy.pick(backends, prompt(random_text(rng, 500))) is a


def test_candidates_subset_picks_the_best_match_among_them() -> None:
    """Of the candidates, the one holding the prefix wins even if a non-candidate holds it too."""
    a, b, c = backends = make_backends(3)
    strategy = make_strategy(backends)
    request = prompt(SYSTEM)
    strategy.pick([a], request)
    strategy.pick([b], request)
    assert strategy.pick([b, c], request) is b
    assert strategy.explain(b, request) == "prefix match 100%"


def test_request_without_a_prompt_goes_to_the_least_loaded() -> None:
    """No prompt: the candidate with the fewest requests in flight."""
    a, b, c = backends = make_backends(3)
    a.in_flight, b.in_flight, c.in_flight = 2, 0, 1
    strategy = make_strategy(backends)
    assert strategy.pick(backends, prompt(None)) is b
    assert strategy.explain(b, prompt(None)) == "no prompt: least loaded"
    assert strategy.tree.nodes == 0


def test_long_prompts_are_truncated_and_still_match() -> None:
    """Only max_prompt_chars are kept, and the match share is of the truncated prompt."""
    backends = make_backends(2)
    strategy = make_strategy(backends, max_prompt_chars=1000)
    rng = random.Random(5)
    head = random_text(rng, 1000)
    first = strategy.pick(backends, prompt(head + random_text(rng, 20_000)))
    assert sum(strategy.tree.tenant_chars.values()) == 1000
    again = prompt(head + random_text(rng, 20_000))
    assert strategy.pick(backends, again) is first
    assert strategy.explain(first, again) == "prefix match 100%"


def test_needs_body_is_set() -> None:
    """The strategy reads the prompt, so the proxy must read the body first."""
    assert make_strategy(make_backends(1)).needs_body is True


def test_tree_split_keeps_character_counts_and_match_lengths() -> None:
    """Splitting a node leaves each tenant's character count as the text it was sent."""
    tree: PrefixTree[str] = PrefixTree()
    tree.insert("hello world", "a")
    tree.insert("hello there", "b")
    tree.insert("help", "a")
    assert tree.tenant_chars == {"a": len("hello world") + 1, "b": len("hello there")}
    assert tree.match("hello world!", {"a", "b"}) == (11, ["a"])
    assert tree.match("hello th", {"a", "b"}) == (8, ["b"])
    assert tree.match("hello", {"a", "b"}) == (5, ["a", "b"])
    assert tree.match("xyz", {"a", "b"}) == (0, [])
    entries = 7  # "hel": a, b; "lo ": a, b; "world": a; "there": b; "p": a
    assert tree.charged_chars == 23 + entries * ENTRY_OVERHEAD_CHARS
    assert tree.nodes == 5


def test_tree_eviction_removes_least_recently_used_leaves_first() -> None:
    """Evicting down to one prompt's charge keeps the most recently used prompt whole."""
    tree: PrefixTree[str] = PrefixTree()
    tree.insert("aaaa-old", "a")
    tree.insert("bbbb", "b")
    tree.insert("aaaa-new", "a")
    tree.evict(8 + 2 * ENTRY_OVERHEAD_CHARS)
    assert tree.match("aaaa-new", {"a", "b"}) == (8, ["a"])
    assert tree.match("aaaa-old", {"a", "b"})[0] == 5
    assert tree.match("bbbb", {"a", "b"}) == (0, [])
    assert tree.tenant_chars == {"a": 8, "b": 0}
    assert tree.charged_chars == 8 + 2 * ENTRY_OVERHEAD_CHARS
    assert tree.nodes == 2


def test_tree_eviction_of_a_split_node_takes_its_copied_subtree() -> None:
    """Evicting a tenant from a node also evicts it below, so no orphaned entry is left."""
    tree: PrefixTree[str] = PrefixTree()
    tree.insert("abcdef", "a")
    tree.insert("abcxyz", "b")  # splits "abcdef": "abc" {a, b} -> "def" {a} (a copy), "xyz" {b}
    tree.insert("zzz", "b")
    tree.evict(tree.charged_chars - 1)  # the oldest entry: ("abc", a), with ("def", a) below
    assert tree.tenant_chars == {"a": 0, "b": 9}
    assert tree.match("abcdef", {"a"}) == (0, [])
    assert tree.match("abcxyz", {"b"}) == (6, ["b"])
    assert tree.nodes == 3
    assert tree.charged_chars == 9 + 3 * ENTRY_OVERHEAD_CHARS


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"balance_abs_threshold": -1}, "balance_abs_threshold"),
        ({"balance_rel_threshold": 0.5}, "balance_rel_threshold"),
        ({"cache_threshold": 1.5}, "cache_threshold"),
        ({"cache_threshold": "high"}, "cache_threshold"),
        ({"max_prompt_chars": 0}, "max_prompt_chars"),
        ({"max_tree_chars": 100, "max_prompt_chars": 1000}, "max_tree_chars"),
        ({"max_tree_chars": 1e6}, "max_tree_chars"),
    ],
)
def test_invalid_options_are_rejected_naming_the_option(
    options: dict[str, Any], message: str
) -> None:
    """Each malformed option is a ValueError naming it."""
    with pytest.raises(ValueError, match=message):
        make_strategy(make_backends(1), **options)


def test_registry_builds_it_and_rejects_unknown_options() -> None:
    """``cache_aware`` is a built-in name with its options checked."""
    backends = make_backends(2)
    assert isinstance(build("cache_aware", backends, options={"cache_threshold": 0.8}), CacheAware)
    with pytest.raises(ValueError, match="unknown option 'key'"):
        build("cache_aware", backends, options={"key": "user"})


def test_tree_memory_per_cached_char_is_reported() -> None:
    """Measure (and print, not assert tightly) the bytes the tree holds per cached character."""
    rng = random.Random(6)
    systems = [random_text(rng, 1000) for _ in range(20)]
    prompts = [rng.choice(systems) + random_text(rng, 1000) for _ in range(500)]
    short = [f"{i:08d}" for i in range(20_000)]
    backends = make_backends(4)

    def measure(texts: list[str]) -> tuple[int, int, int]:
        """Bytes allocated by the tree, characters stored in node labels, and node count."""
        strategy = make_strategy(backends, max_tree_chars=100_000_000)
        gc.collect()
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            for text in texts:
                strategy.pick(backends, prompt(text))
            used = tracemalloc.get_traced_memory()[0] - base
        finally:
            tracemalloc.stop()
        stack = list(strategy.tree.root.children.values())
        stored = 0
        while stack:
            node = stack.pop()
            stored += len(node.text)
            stack.extend(node.children.values())
        return used, stored, strategy.tree.nodes

    used, stored, nodes = measure(prompts)
    print(f"\n~2k-char prompts: {used / stored:.2f} bytes per stored char ({nodes} nodes)")
    assert used / stored < 3
    used, stored, nodes = measure(short)
    print(f"8-char prompts: {used / nodes:.0f} bytes per node, {used / stored:.0f} per char")
    assert used / nodes < 1500
