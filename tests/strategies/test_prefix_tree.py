"""Tests for lb.strategies.prefix_tree: per-tenant match lengths (match_each)."""

from __future__ import annotations

from lb.strategies.prefix_tree import PrefixTree


def tree_of(**texts: str) -> PrefixTree[str]:
    tree: PrefixTree[str] = PrefixTree()
    for tenant, text in texts.items():
        tree.insert(text, tenant)
    return tree


def test_match_each_gives_every_holder_its_own_match_length_longest_first() -> None:
    """Each tenant gets the length of the prefix it holds; the longest come first."""
    tree = tree_of(a="system prompt: hello", b="system prompt: bye", c="other")
    found = tree.match_each("system prompt: hello there", {"a", "b", "c"})
    assert found == {"a": 20, "b": 15}
    assert list(found) == ["a", "b"]


def test_match_each_agrees_with_match_on_the_longest() -> None:
    """The first entries of match_each are match's holders, at match's length."""
    tree = tree_of(a="abcdef", b="abcxyz", c="abcdeq")
    length, holders = tree.match("abcdefgh", {"a", "b", "c"})
    found = tree.match_each("abcdefgh", {"a", "b", "c"})
    assert [t for t, n in found.items() if n == length] == holders
    assert found == {"a": 6, "c": 5, "b": 3}


def test_match_each_leaves_out_tenants_not_allowed() -> None:
    """A tenant outside ``allowed`` is not reported, however long its match."""
    tree = tree_of(a="shared prefix one", b="shared prefix two")
    assert tree.match_each("shared prefix one!", {"b"}) == {"b": 14}
    assert tree.match_each("shared prefix one!", set()) == {}


def test_match_each_stops_at_the_limit_keeping_the_longest() -> None:
    """With a limit, only that many tenants are returned, the deepest ones."""
    tree: PrefixTree[int] = PrefixTree()
    for tenant in range(50):
        tree.insert("common head " + ("x" * tenant), tenant)
    found = tree.match_each("common head " + "x" * 60, set(range(50)), limit=3)
    assert list(found) == [49, 48, 47]
    assert found[49] == len("common head ") + 49


def test_match_each_of_an_unknown_text_is_empty() -> None:
    """A text no tenant shares even a first character with matches nobody."""
    tree = tree_of(a="hello")
    assert tree.match_each("zebra", {"a"}) == {}
    assert tree.match_each("", {"a"}) == {}
