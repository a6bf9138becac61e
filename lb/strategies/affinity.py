"""What the prefix-aware strategies share: a bounded prompt tree, and sampling in large pools.

:class:`PromptTree` is a :class:`~lb.strategies.prefix_tree.PrefixTree` of backends with the
budgets ``cache_aware`` documents, read from the options of ``least_loaded`` (with a
``prefix_weight``): ``max_prompt_chars`` (8192: only that much of a prompt is matched and
recorded) and ``max_tree_chars`` (2,000,000: the tree's charge, characters plus 64 per entry,
evicted least recently used first whenever an insert goes over it).

Large pools. Scanning every candidate costs ~100 ns each on CPython, so above
:data:`FULL_SCAN_MAX_CANDIDATES` (16, as ``least_connections``) candidates these strategies look
at a bounded set instead: two candidates drawn at random (the power of two choices:
Mitzenmacher, "The Power of Two Choices in Randomized Load Balancing", IEEE TPDS 2001; Envoy's
``least_request``) plus the backends holding the longest prefixes of the prompt, at most
:data:`MAX_HOLDERS` (16). Prefix holders are always among those considered, so affinity works
at any size; load is compared among the few, which keeps the busiest backend a few requests
above the average rather than exactly at it (the gap grows as ``log log n``).
"""

from __future__ import annotations

import random
from collections.abc import Container, Mapping, Sequence
from typing import Any

from lb.backend import Backend
from lb.strategies.prefix_tree import PrefixTree

FULL_SCAN_MAX_CANDIDATES = 16
MAX_HOLDERS = 16
DEFAULT_MAX_TREE_CHARS = 2_000_000
DEFAULT_MAX_PROMPT_CHARS = 8192


def int_option(strategy: str, options: Mapping[str, Any], name: str, default: int) -> int:
    """Option ``name`` as an integer (``default`` when absent), or ``ValueError`` naming it."""
    value = options.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(
            f"option {name!r} for strategy {strategy!r} must be an integer, got {value!r}"
        )
    return value


class PromptTree:
    """The prompts sent to each backend, within the ``max_prompt_chars`` and ``max_tree_chars``
    budgets of ``options``; a bad budget raises ``ValueError`` naming the option."""

    def __init__(self, strategy: str, options: Mapping[str, Any]) -> None:
        self.max_tree_chars = int_option(
            strategy, options, "max_tree_chars", DEFAULT_MAX_TREE_CHARS
        )
        self.max_prompt_chars = int_option(
            strategy, options, "max_prompt_chars", DEFAULT_MAX_PROMPT_CHARS
        )
        if self.max_prompt_chars < 1:
            raise ValueError(f"option 'max_prompt_chars' for strategy {strategy!r} must be >= 1")
        if self.max_tree_chars < self.max_prompt_chars:
            raise ValueError(
                f"option 'max_tree_chars' for strategy {strategy!r} must be at least "
                f"max_prompt_chars ({self.max_prompt_chars})"
            )
        self.tree: PrefixTree[Backend] = PrefixTree()

    def record(self, prompt: str, backend: Backend) -> None:
        """Record ``prompt`` (already cut to ``max_prompt_chars``) as sent to ``backend``."""
        tree = self.tree
        tree.insert(prompt, backend)
        if tree.charged_chars > self.max_tree_chars:
            tree.evict(self.max_tree_chars)


class Membership:
    """``in`` over a pick's candidates in O(1), without building a set on every pick.

    The pool hands strategies either its eligible tuple (rebuilt only when eligibility
    changes) or a view with an O(1) ``in``; the set of a tuple is built once per tuple.
    """

    def __init__(self) -> None:
        self._of: tuple[Backend, ...] | None = None
        self._set: frozenset[Backend] = frozenset()

    def of(self, candidates: Sequence[Backend]) -> Container[Backend]:
        if len(candidates) <= 4:
            return candidates  # a short scan beats a hash
        if not isinstance(candidates, tuple | list):
            return candidates  # a view that answers `in` itself (lb.pool.CandidateView)
        if candidates is not self._of:
            self._of = candidates if isinstance(candidates, tuple) else None
            self._set = frozenset(candidates)
        return self._set


def two_at_random(rng: random.Random, candidates: Sequence[Backend]) -> list[Backend]:
    """Two distinct candidates drawn uniformly (``len(candidates) >= 2``)."""
    n = len(candidates)
    i = int(rng.random() * n)
    j = int(rng.random() * (n - 1))
    if j >= i:
        j += 1
    return [candidates[i], candidates[j]]


def considered(
    rng: random.Random, candidates: Sequence[Backend], holders: Sequence[Backend]
) -> list[Backend]:
    """The candidates a large-pool pick compares: ``holders`` then two drawn at random."""
    chosen = list(holders)
    for backend in two_at_random(rng, candidates):
        if backend not in chosen:
            chosen.append(backend)
    return chosen
