"""An approximate multi-tenant radix tree over prompt text, with a size budget and LRU eviction.

One tree is shared by all tenants (backends). Each node holds an edge label ``text`` (never
empty), its children keyed by their label's first character, and ``tenants``: the tenants that
were sent a prompt passing through the node, each with the logical time of its last such
prompt. Invariant: a tenant present at a node is present at every ancestor, so walking down a
prompt, the set of tenants that share the prefix only shrinks. It is the structure of
sglang-router's approximate tree (sgl-project/sglang, ``sgl-router/src/policies/tree.rs``),
written over characters, not tokens, so no tokenizer is needed.

Cost of :meth:`PrefixTree.match` and :meth:`PrefixTree.insert`: one walk down the text,
O(len(text)) character comparisons done in C by ``str.startswith``, plus, per node on the
path, O(tenants at the node); a partial match inside a node adds a binary search,
O(len(label) * log(len(label))) in C. At most two nodes are created per insert (a split and a
new leaf).

Size. ``tenant_chars[t]`` is the text held for tenant ``t`` (the sum of the labels of the nodes
it is present at), as sglang counts it; it is what "smallest tree" compares. The budget is kept
on ``charged_chars``, the same sum plus :data:`ENTRY_OVERHEAD_CHARS` for every (node, tenant)
entry: the bookkeeping of a node costs hundreds of bytes, so without that charge a stream of
short, distinct prompts (one tiny node each) could grow memory, and the eviction walk, far past
what the character budget suggests. :meth:`PrefixTree.evict` removes least recently used leaf
entries (a tenant at a node where none of the node's children has it) until the charge is at
most the target; a node that loses its last tenant is unlinked.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Container, Hashable
from typing import Generic, TypeVar

T = TypeVar("T", bound=Hashable)

# Budget charge, in characters, for one (node, tenant) entry on top of the node's text. A node
# measures ~400-600 bytes of Python objects (see tests/strategies/test_cache_aware.py), so this
# undercharges tiny nodes; it bounds the node count at budget / 64 rather than at the budget.
ENTRY_OVERHEAD_CHARS = 64


class Node(Generic[T]):
    """One edge of the tree: its label, children by first character, tenants with last access."""

    __slots__ = ("children", "parent", "tenants", "text")

    def __init__(self, text: str, parent: Node[T] | None) -> None:
        self.text = text
        self.parent = parent
        self.children: dict[str, Node[T]] = {}
        self.tenants: dict[T, int] = {}


def common_prefix_len(label: str, text: str, start: int) -> int:
    """Length of the longest common prefix of ``label`` and ``text[start:]``."""
    lo, hi = 0, min(len(label), len(text) - start)
    # Invariant: label[:lo] matches. Binary search with startswith keeps the compares in C.
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if text.startswith(label[:mid], start):
            lo = mid
        else:
            hi = mid - 1
    return lo


class PrefixTree(Generic[T]):
    """A radix tree of texts sent to tenants; see the module docstring.

    ``tenant_chars`` and ``charged_chars`` are kept exact by :meth:`insert` and :meth:`evict`.
    Access times are the integers the caller passes (a logical clock): larger is more recent.
    """

    def __init__(self) -> None:
        self.root: Node[T] = Node("", None)
        self.tenant_chars: dict[T, int] = {}
        self.charged_chars = 0
        self.nodes = 0  # not counting the root

    def match(self, text: str, allowed: Container[T]) -> tuple[int, list[T]]:
        """Return the longest prefix of ``text`` held by a tenant in ``allowed``, and those tenants.

        The length is in characters (0 and an empty list when no allowed tenant shares even the
        first character). Access times are not changed.
        """
        node = self.root
        i = 0
        n = len(text)
        best_len = 0
        best: list[T] = []
        while i < n:
            child = node.children.get(text[i])
            if child is None:
                break
            label = child.text
            k = len(label) if text.startswith(label, i) else common_prefix_len(label, text, i)
            present = [tenant for tenant in child.tenants if tenant in allowed]
            if not present:
                # By the invariant no descendant holds an allowed tenant either.
                break
            i += k
            best_len = i
            best = present
            if k < len(label):
                break
            node = child
        return best_len, best

    def insert(self, text: str, tenant: T, now: int) -> None:
        """Record that ``text`` was sent to ``tenant`` at logical time ``now``."""
        tenant_chars = self.tenant_chars
        added = tenant_chars.get(tenant, 0)
        entries = 0
        node = self.root
        i = 0
        n = len(text)
        while i < n:
            first = text[i]
            child = node.children.get(first)
            if child is None:
                leaf: Node[T] = Node(text[i:], node)
                leaf.tenants[tenant] = now
                node.children[first] = leaf
                self.nodes += 1
                added += n - i
                entries += 1
                break
            label = child.text
            if text.startswith(label, i):
                k = len(label)
            else:
                # Split: node -> mid (label[:k]) -> child (label[k:]). Every tenant of child is
                # now at both, so each gains one entry; their character counts are unchanged.
                k = common_prefix_len(label, text, i)
                mid: Node[T] = Node(label[:k], node)
                mid.tenants = dict(child.tenants)
                mid.children[label[k]] = child
                child.text = label[k:]
                child.parent = mid
                node.children[first] = mid
                self.nodes += 1
                self.charged_chars += ENTRY_OVERHEAD_CHARS * len(mid.tenants)
                child = mid
            if tenant not in child.tenants:
                added += k
                entries += 1
            child.tenants[tenant] = now
            i += k
            node = child
        self.charged_chars += added - tenant_chars.get(tenant, 0) + entries * ENTRY_OVERHEAD_CHARS
        tenant_chars[tenant] = added

    def evict(self, target_chars: int) -> None:
        """Remove least recently used leaf entries until ``charged_chars <= target_chars``.

        One walk over every node to find the leaf entries, then a heap: O(entries + evicted *
        log(entries)), where an entry is a (node, tenant) pair. Callers run it rarely (when over budget, down to a lower mark).
        """
        if self.charged_chars <= target_chars:
            return
        seq = itertools.count()  # tie-breaker, so the heap never compares nodes
        heap: list[tuple[int, int, Node[T], T]] = []
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            children = node.children.values()
            stack.extend(children)
            below: set[T] = set()
            for child in children:
                below.update(child.tenants)
            for tenant, last in node.tenants.items():
                if tenant not in below:
                    heap.append((last, next(seq), node, tenant))
        heapq.heapify(heap)
        tenant_chars = self.tenant_chars
        while self.charged_chars > target_chars and heap:
            _, _, node, tenant = heapq.heappop(heap)
            del node.tenants[tenant]
            size = len(node.text)
            tenant_chars[tenant] -= size
            self.charged_chars -= size + ENTRY_OVERHEAD_CHARS
            parent = node.parent
            assert parent is not None  # only the root has no parent, and it is never a leaf
            if not node.tenants:
                # No tenant left here, so none below (the invariant): unlink the node.
                del parent.children[node.text[0]]
                self.nodes -= 1
            if parent is not self.root and not self._held_below(parent, tenant):
                # The parent just became a leaf for this tenant. Its access time is at least
                # that of any entry below it, so LRU order is kept.
                heapq.heappush(heap, (parent.tenants[tenant], next(seq), parent, tenant))

    @staticmethod
    def _held_below(node: Node[T], tenant: T) -> bool:
        """Whether any child of ``node`` holds ``tenant``."""
        for child in node.children.values():
            if tenant in child.tenants:
                return True
        return False
