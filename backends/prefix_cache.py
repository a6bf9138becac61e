"""Automatic prefix caching of one simulated model server: chained block hashes in an LRU.

The model is vLLM's automatic prefix caching (``vllm/v1/core/kv_cache_manager.py`` and
``kv_cache_utils.py``; design notes at docs.vllm.ai, "Automatic Prefix Caching"), reduced to
what a load balancer can observe:

* A prompt's tokens are cut into blocks of ``block_size`` tokens; only full blocks are cached.
* Block ``i`` is identified by ``hash((hash of block i - 1, tokens of block i))``, with ``None``
  as the parent of block 0, so a block's identity covers the whole prefix before it: the same
  tokens after a different prefix make a different block. Python's ``hash`` is salted per
  process, which does not matter: a cache lives and dies inside one process.
* A query walks the blocks from the start and stops at the first one not cached; the blocks
  before it are hits, the prefill the engine can skip. As in vLLM, the last prompt token is
  always computed (it yields the logits of the first output token), so the walk covers only
  ``(len(tokens) - 1) // block_size`` blocks: a prompt seen before hits all its full blocks,
  except the last one when the prompt ends exactly on a block boundary.
* After the walk every full block is cached, hits included (which refreshes them). The cache
  holds at most ``capacity_blocks`` blocks and evicts the least recently used. A prompt's blocks
  are touched last to first, so its head is its most recently used block and its tail is
  evicted first, as vLLM frees a request's blocks in reverse: a prefix many prompts share
  outlives their tails, and a block rarely outlives its parent (a block without its parent can
  never be hit).

Unlike vLLM, the cache is not the running sequences' KV cache: it is a separate pool of
``capacity_blocks``, and nothing is pinned while a sequence uses it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence

Tokens = Sequence[Hashable]
"""A tokenised prompt: anything sliceable whose items are hashable (token texts or ids)."""

BlockHash = int

DEFAULT_BLOCK_SIZE = 16


def block_hashes(tokens: Tokens, block_size: int) -> list[BlockHash]:
    """The chained hashes of ``tokens``' full blocks, in prompt order (a partial tail has none)."""
    hashes: list[BlockHash] = []
    parent: BlockHash | None = None
    for start in range(0, len(tokens) - block_size + 1, block_size):
        parent = hash((parent, tuple(tokens[start : start + block_size])))
        hashes.append(parent)
    return hashes


class PrefixCache:
    """An LRU of prompt blocks keyed by chained hash, answering "how much of this is cached?".

    Defaults: ``block_size=16`` tokens (vLLM's default on GPUs), ``capacity_blocks=4096``
    (64K tokens). ``capacity_blocks=0`` disables caching: every query is a full miss and
    nothing is stored. Raises ``ValueError`` for a block size below 1 or a negative capacity.
    """

    def __init__(self, block_size: int = DEFAULT_BLOCK_SIZE, capacity_blocks: int = 4096):
        if block_size < 1:
            raise ValueError("block_size must be at least 1")
        self._block_size = block_size
        self._capacity_blocks = 0
        # Block hash -> nothing; the order is the recency order, least recently used first.
        self._blocks: OrderedDict[BlockHash, None] = OrderedDict()
        self.resize(capacity_blocks)

    @property
    def block_size(self) -> int:
        """Tokens per block."""
        return self._block_size

    @property
    def capacity_blocks(self) -> int:
        """The most blocks the cache holds."""
        return self._capacity_blocks

    def __len__(self) -> int:
        """Blocks held now, never more than ``capacity_blocks``."""
        return len(self._blocks)

    def __contains__(self, block_hash: object) -> bool:
        """Whether the block is cached (without refreshing it)."""
        return block_hash in self._blocks

    def query(self, tokens: Tokens) -> int:
        """The number of leading tokens of ``tokens`` already cached, then cache its full blocks.

        The answer is a multiple of ``block_size`` and less than ``len(tokens)`` (0 for an
        empty prompt or a disabled cache).
        """
        if self._capacity_blocks == 0:
            return 0
        hashes = block_hashes(tokens, self._block_size)
        hittable = max(len(tokens) - 1, 0) // self._block_size
        hits = 0
        while hits < hittable and hashes[hits] in self._blocks:
            hits += 1
        blocks = self._blocks
        for block_hash in reversed(hashes):  # the head ends up most recently used
            if block_hash in blocks:
                blocks.move_to_end(block_hash)
            else:
                blocks[block_hash] = None
                if len(blocks) > self._capacity_blocks:
                    blocks.popitem(last=False)
        return hits * self._block_size

    def resize(self, capacity_blocks: int) -> None:
        """Set the capacity, evicting least recently used blocks down to it at once."""
        if capacity_blocks < 0:
            raise ValueError("capacity_blocks must not be negative")
        self._capacity_blocks = capacity_blocks
        while len(self._blocks) > capacity_blocks:
            self._blocks.popitem(last=False)

    def clear(self) -> None:
        """Forget every block."""
        self._blocks.clear()
