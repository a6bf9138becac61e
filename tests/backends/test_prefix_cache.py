"""Tests for backends.prefix_cache: chained block hashes and the LRU of blocks."""

from __future__ import annotations

import random

import pytest

from backends.prefix_cache import PrefixCache, block_hashes


def tokens(tag: str, count: int) -> list[str]:
    """``count`` distinct tokens, different for each ``tag``."""
    return [f"{tag}{i}" for i in range(count)]


def test_a_repeated_prompt_hits_all_its_full_blocks_the_second_time() -> None:
    """A 50-token prompt seen before hits its three full blocks (48 tokens), not the tail."""
    cache = PrefixCache(block_size=16, capacity_blocks=100)
    prompt = tokens("a", 50)
    assert cache.query(prompt) == 0
    assert cache.query(prompt) == 48
    assert len(cache) == 3


def test_a_block_aligned_repeat_recomputes_its_last_block() -> None:
    """As in vLLM, the last prompt token is always computed, so a 48-token repeat hits 32."""
    cache = PrefixCache(block_size=16, capacity_blocks=100)
    prompt = tokens("a", 48)
    cache.query(prompt)
    assert cache.query(prompt) == 32
    assert len(cache) == 3


def test_prompts_sharing_a_system_prompt_share_its_full_blocks() -> None:
    """Two prompts after the same 100-token system prompt share its 6 full blocks (96 tokens)."""
    cache = PrefixCache(block_size=16, capacity_blocks=100)
    system = tokens("sys", 100)
    assert cache.query(system + tokens("alice", 30)) == 0
    assert cache.query(system + tokens("bob", 30)) == 96


def test_a_prompt_with_a_different_prefix_misses() -> None:
    """A prompt whose first block differs hits nothing, even if later tokens are equal."""
    cache = PrefixCache(block_size=4, capacity_blocks=100)
    shared = tokens("s", 20)
    cache.query(["x", *shared])
    assert cache.query(["y", *shared]) == 0


def test_the_hit_stops_at_the_first_uncached_block() -> None:
    """Prompts agreeing on 2.5 blocks share the 2 full ones; the differing block ends the hit."""
    cache = PrefixCache(block_size=4, capacity_blocks=100)
    common = tokens("c", 10)
    cache.query(common + tokens("p", 10))
    assert cache.query(common + tokens("q", 10)) == 8


def test_hashing_is_chained_so_the_same_block_after_another_prefix_is_a_miss() -> None:
    """An identical second block behind different first blocks has a different hash."""
    block = tokens("same", 4)
    first = block_hashes(tokens("p", 4) + block, 4)
    second = block_hashes(tokens("q", 4) + block, 4)
    assert first[1] != second[1]
    cache = PrefixCache(block_size=4, capacity_blocks=100)
    cache.query(tokens("p", 4) + block + ["end"])
    assert second[1] not in cache
    assert cache.query(tokens("q", 4) + block + ["end"]) == 0


def test_block_hashes_cover_full_blocks_only_and_are_prefix_stable() -> None:
    """A prompt's block hashes are those of any longer prompt starting with it, tail excluded."""
    prompt = tokens("t", 38)
    hashes = block_hashes(prompt, 16)
    assert len(hashes) == 2
    assert block_hashes(prompt + tokens("more", 30), 16)[:2] == hashes


def test_eviction_at_capacity_evicts_the_least_recently_used_blocks() -> None:
    """With room for two prompts, touching A and then adding C evicts B, not A."""
    cache = PrefixCache(block_size=4, capacity_blocks=4)
    a, b, c = tokens("a", 9), tokens("b", 9), tokens("c", 9)
    cache.query(a)
    cache.query(b)
    assert cache.query(a) == 8  # a is now the most recently used
    cache.query(c)
    assert len(cache) == 4
    assert all(h in cache for h in block_hashes(a, 4) + block_hashes(c, 4))
    assert not any(h in cache for h in block_hashes(b, 4))
    assert cache.query(b) == 0


def test_the_cache_never_holds_more_than_its_capacity() -> None:
    """Under a random mix of overlapping prompts the cache stays within capacity_blocks."""
    rng = random.Random(7)
    cache = PrefixCache(block_size=4, capacity_blocks=10)
    prefixes = [tokens(f"p{i}", rng.randrange(0, 40)) for i in range(5)]
    for n in range(500):
        prompt = rng.choice(prefixes) + tokens(f"u{n}", rng.randrange(1, 30))
        cached = cache.query(prompt)
        assert 0 <= cached < len(prompt)
        assert cached % 4 == 0
        assert len(cache) <= 10


def test_a_prompt_longer_than_the_cache_keeps_its_head() -> None:
    """A prompt of more blocks than the capacity keeps its first blocks, so a repeat still hits."""
    cache = PrefixCache(block_size=4, capacity_blocks=3)
    prompt = tokens("long", 41)  # 10 full blocks
    cache.query(prompt)
    assert len(cache) == 3
    assert cache.query(prompt) == 12


def test_the_head_of_a_prompt_outlives_its_tail() -> None:
    """A prompt's blocks are touched last to first, so eviction takes its tail first."""
    cache = PrefixCache(block_size=4, capacity_blocks=4)
    a = tokens("a", 17)  # 4 full blocks
    cache.query(a)
    cache.query(tokens("b", 5))  # one new block evicts one of a's
    hashes = block_hashes(a, 4)
    assert hashes[-1] not in cache
    assert all(h in cache for h in hashes[:-1])
    assert cache.query(a) == 12


def test_zero_capacity_disables_caching() -> None:
    """With capacity_blocks=0 nothing is stored and every query misses."""
    cache = PrefixCache(block_size=4, capacity_blocks=0)
    prompt = tokens("a", 20)
    cache.query(prompt)
    assert cache.query(prompt) == 0
    assert len(cache) == 0


def test_resize_evicts_least_recently_used_blocks_down_to_the_new_capacity() -> None:
    """Shrinking keeps the most recently used blocks; clear empties the cache."""
    cache = PrefixCache(block_size=4, capacity_blocks=10)
    a, b = tokens("a", 9), tokens("b", 9)
    cache.query(a)
    cache.query(b)
    cache.resize(2)
    assert cache.capacity_blocks == 2
    assert all(h in cache for h in block_hashes(b, 4))
    assert not any(h in cache for h in block_hashes(a, 4))
    cache.clear()
    assert len(cache) == 0


def test_an_empty_or_short_prompt_caches_nothing() -> None:
    """Prompts shorter than a block neither hit nor store anything."""
    cache = PrefixCache(block_size=16, capacity_blocks=10)
    assert cache.query([]) == 0
    assert cache.query(tokens("a", 15)) == 0
    assert len(cache) == 0


@pytest.mark.parametrize(
    ("block_size", "capacity_blocks", "message"),
    [(0, 10, "block_size"), (16, -1, "capacity_blocks")],
)
def test_bad_sizes_raise_value_error(block_size: int, capacity_blocks: int, message: str) -> None:
    """A block size below 1 or a negative capacity is refused with the knob's name."""
    with pytest.raises(ValueError, match=message):
        PrefixCache(block_size=block_size, capacity_blocks=capacity_blocks)
