"""An approximate multi-tenant radix tree over prompt text, with a size budget and LRU eviction.

One tree is shared by all tenants (backends). Each node holds an edge label ``text`` (never
empty), its children keyed by their label's first character, and ``tenants``: the tenants that
were sent a text passing through the node. Invariant: a tenant present at a node is present at
every ancestor, so walking down a text, the tenants sharing the prefix only thin out. It is the
structure of sglang-router's approximate tree (sgl-project/sglang, ``sgl-router/src/tree.rs``,
later ``src/policies/tree.rs``), over characters, not tokens, so no tokenizer is needed.

Size. ``tenant_chars[t]`` is the text held for tenant ``t`` (the sum of the labels of the nodes
it is present at), as sglang counts it; "smallest tree" compares it. The budget is kept on
``charged_chars``: the same sum over all tenants plus :data:`ENTRY_OVERHEAD_CHARS` for every
(node, tenant) entry. A node's bookkeeping costs hundreds of bytes, so without that charge a
stream of short distinct prompts (a tiny node each) would grow memory far past what a
character budget suggests.

Recency. Every (node, tenant) entry sits in one ``OrderedDict``, least recently used first. An
insert touches its path from the leaf up to the root, so a parent's entry is more recent than
its children's, and the oldest entry is a leaf: :meth:`PrefixTree.evict` pops oldest entries
until the charge is within the target, in O(1) each, with no walk over the tree (sglang walks
every node on a timer instead). The one exception is a split: the new lower node copies its
tenants from the node being split, and those copies are appended as most recent (an
``OrderedDict`` cannot insert in the middle). So that the invariant holds anyway, evicting an
entry also evicts that tenant from the node's whole subtree; the copies' real last access is
their parent's, so that is still least-recently-used order. The only inexactness: a split
counts as an access for the copied entries.

Cost. :meth:`match` and :meth:`insert` are one walk down the text each: O(len(text))
character comparisons done in C by ``str.startswith``, plus per node on the path O(tenants at
the node), and for a partial match inside a label a binary search, O(len(label) *
log(len(label))) in C. An insert creates at most two nodes and touches O(path) entries.
Eviction is O(1) per entry removed, so amortised O(path) per insert.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Container, Hashable
from typing import Generic, TypeVar

T = TypeVar("T", bound=Hashable)

# Budget charge, in characters, for one (node, tenant) entry on top of the node's text. A node
# measures ~550 bytes of Python objects (test_tree_memory_per_cached_char_is_reported), so this
# undercharges tiny nodes, but it bounds the entries, hence the nodes, at budget / 64.
ENTRY_OVERHEAD_CHARS = 64


class Node(Generic[T]):
    """One edge of the tree: its label, its children by first character, its tenants."""

    __slots__ = ("children", "parent", "tenants", "text")

    def __init__(self, text: str, parent: Node[T] | None) -> None:
        self.text = text
        self.parent = parent
        self.children: dict[str, Node[T]] = {}
        # A dict used as an insertion-ordered set: iterating a set of objects hashed by
        # address would make tie-breaking, hence seeded tests, differ from run to run.
        self.tenants: dict[T, None] = {}


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
    """A radix tree of the texts sent to each tenant; see the module docstring.

    ``tenant_chars``, ``charged_chars`` and ``nodes`` (not counting the root) are kept exact
    by :meth:`insert` and :meth:`evict`.
    """

    def __init__(self) -> None:
        self.root: Node[T] = Node("", None)
        self.tenant_chars: dict[T, int] = {}
        self.charged_chars = 0
        self.nodes = 0
        # Every (node, tenant) entry, least recently used first.
        self._lru: OrderedDict[tuple[Node[T], T], None] = OrderedDict()

    def match(self, text: str, allowed: Container[T]) -> tuple[int, list[T]]:
        """Return the longest prefix of ``text`` held by a tenant in ``allowed``, and those tenants.

        The length is in characters; it is 0, with no tenants, when no allowed tenant shares
        even the first character. Recency is not changed.
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
                break  # by the invariant, no allowed tenant further down either
            i += k
            best_len = i
            best = present
            if k < len(label):
                break
            node = child
        return best_len, best

    def match_each(
        self, text: str, allowed: Container[T], limit: int | None = None
    ) -> dict[T, int]:
        """Return, for tenants in ``allowed``, the length of ``text``'s prefix each one holds.

        Tenants holding no prefix at all are left out. The longest matches come first (a
        dict keeps insertion order); with ``limit``, only the ``limit`` longest are kept, and
        the walk stops as soon as it has them. Recency is not changed.

        Cost: one walk down the text, O(len(text)) comparisons in C, then a walk back up the
        path over the nodes' tenants, deepest first, stopping at ``limit``: deep nodes hold
        few tenants (the invariant), so a shallow node shared by a large pool is read only
        while fewer than ``limit`` tenants were found below it.
        """
        path: list[tuple[Node[T], int]] = []
        node = self.root
        i = 0
        n = len(text)
        while i < n:
            child = node.children.get(text[i])
            if child is None:
                break
            label = child.text
            k = len(label) if text.startswith(label, i) else common_prefix_len(label, text, i)
            i += k
            path.append((child, i))
            if k < len(label):
                break
            node = child
        found: dict[T, int] = {}
        for child, depth in reversed(path):
            for tenant in child.tenants:
                if tenant not in found and tenant in allowed:
                    found[tenant] = depth
                    if limit is not None and len(found) >= limit:
                        return found
        return found

    def insert(self, text: str, tenant: T) -> None:
        """Record that ``text`` was sent to ``tenant``, as its most recent use."""
        path: list[Node[T]] = []
        node = self.root
        i = 0
        n = len(text)
        while i < n:
            first = text[i]
            child = node.children.get(first)
            if child is None:
                leaf: Node[T] = Node(text[i:], node)
                node.children[first] = leaf
                self.nodes += 1
                path.append(leaf)
                break
            label = child.text
            if text.startswith(label, i):
                k = len(label)
            else:
                k = common_prefix_len(label, text, i)
                self._split(child, k)
            path.append(child)
            i += k
            node = child
        # Touch from the leaf up, so that each parent ends up more recent than its child.
        lru = self._lru
        added = 0
        for node in reversed(path):
            key = (node, tenant)
            if tenant in node.tenants:
                lru.move_to_end(key)
            else:
                node.tenants[tenant] = None
                lru[key] = None
                added += len(node.text)
                self.charged_chars += ENTRY_OVERHEAD_CHARS
        self.tenant_chars[tenant] = self.tenant_chars.get(tenant, 0) + added
        self.charged_chars += added

    def evict(self, target_chars: int) -> None:
        """Evict least recently used entries until ``charged_chars <= target_chars``."""
        lru = self._lru
        while self.charged_chars > target_chars and lru:
            (node, tenant), _ = lru.popitem(last=False)
            self._drop(node, tenant)

    def _split(self, node: Node[T], k: int) -> None:
        """Cut ``node``'s label after ``k`` characters; the rest moves to a new child.

        The node object keeps the prefix, so its parent link and its entries' places in the
        recency order stay right; the new child copies its tenants (each tenant's character
        count is unchanged, its entry count grows by one).
        """
        label = node.text
        lower: Node[T] = Node(label[k:], node)
        lower.children = node.children
        for child in lower.children.values():
            child.parent = lower
        lower.tenants = dict(node.tenants)
        node.text = label[:k]
        node.children = {label[k]: lower}
        self.nodes += 1
        lru = self._lru
        for tenant in lower.tenants:
            lru[(lower, tenant)] = None
        self.charged_chars += ENTRY_OVERHEAD_CHARS * len(lower.tenants)

    def _drop(self, top: Node[T], tenant: T) -> None:
        """Remove ``tenant`` from ``top`` (already out of the recency order) and its subtree."""
        lru = self._lru
        tenant_chars = self.tenant_chars
        stack = [top]
        while stack:
            node = stack.pop()
            for child in node.children.values():
                if tenant in child.tenants:
                    stack.append(child)
            del node.tenants[tenant]
            if node is not top:
                del lru[(node, tenant)]
            size = len(node.text)
            tenant_chars[tenant] -= size
            self.charged_chars -= size + ENTRY_OVERHEAD_CHARS
            if not node.tenants:
                # No tenant here, so none below (the invariant): unlink the node.
                parent = node.parent
                assert parent is not None  # only the root has none, and it holds no entries
                del parent.children[node.text[0]]
                self.nodes -= 1
