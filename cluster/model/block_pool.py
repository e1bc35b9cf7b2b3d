"""The KV cache's blocks: which are free, who holds them, which hold a reusable prefix.

Automatic prefix caching (vLLM's design): a full block is named by a hash of its
parent block's hash, its tokens and whatever else changes its keys and values
(model, cache dtype), so equal names mean equal contents and one block can be
shared read-only by every sequence whose tokens start the same way. Blocks are
reference-counted; a block nobody holds goes back to the free queue but keeps its
name, so a later prompt can still take it, until a fresh allocation needs it and
evicts it: least recently released first, a sequence's tail before its head.
Blocks without a name are handed out before any named one is evicted.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

BlockHash = bytes


def block_hashes(tokens: list[int], block_size: int, extra: bytes = b"", parent: BlockHash | None = None,
                 start: int = 0) -> list[BlockHash]:
    """Chained names of the full blocks of `tokens` (a partial last block has none). `start` and
    `parent` continue a chain: hash blocks from token `start` on, after the block named `parent`.
    blake2b, not hash(): the names must agree between processes (routers, the ingress)."""
    out = []
    for i in range(start, len(tokens) - block_size + 1, block_size):
        h = hashlib.blake2b(parent or b"", digest_size=16)
        h.update(extra)
        h.update(array("q", tokens[i:i + block_size]).tobytes())
        parent = h.digest()
        out.append(parent)
    return out


class BlockPool:
    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # front: handed out first
        self._refs: dict[int, int] = {}
        self._name: dict[int, BlockHash] = {}
        self._block: dict[BlockHash, int] = {}
        self.num_evictions = 0  # named blocks given to new contents

    @property
    def num_free(self) -> int:
        """Blocks an allocation can take (free ones and cached ones nobody holds)."""
        return len(self._free)

    @property
    def num_cached(self) -> int:
        """Blocks holding a named (reusable) prefix, held or not."""
        return len(self._name)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"KV cache: {n} blocks asked for, {len(self._free)} free")
        out = []
        for _ in range(n):
            b, _ = self._free.popitem(last=False)
            if b in self._name:
                del self._block[self._name.pop(b)]
                self.num_evictions += 1
            self._refs[b] = 1
            out.append(b)
        return out

    def release(self, blocks: list[int]) -> None:
        """Drop one hold on each block; the last hold returns it to the queue (tail first, so a
        shared head outlives the tails that branch from it)."""
        for b in reversed(blocks):
            self._refs[b] -= 1
            if self._refs[b] == 0:
                del self._refs[b]
                self._free[b] = None
                if b not in self._name:  # nothing to keep: hand it out before any cached block
                    self._free.move_to_end(b, last=False)

    # -- prefix caching ---------------------------------------------------------------------
    def cached(self, names: list[BlockHash]) -> list[int]:
        """The blocks holding the longest cached run of `names` (from the first); takes nothing."""
        out = []
        for name in names:
            b = self._block.get(name)
            if b is None:
                break
            out.append(b)
        return out

    def num_idle(self, blocks: list[int]) -> int:
        """How many of `blocks` sit in the free queue (taking them lowers num_free)."""
        return sum(b in self._free for b in blocks)

    def take(self, blocks: list[int]) -> None:
        """One more hold on each of `blocks` (cached ones, as `cached` returned)."""
        for b in blocks:
            if b in self._free:
                del self._free[b]
            self._refs[b] = self._refs.get(b, 0) + 1

    def name(self, block: int, name: BlockHash) -> None:
        """`block` now holds the full block called `name`; a name already cached elsewhere (two
        sequences computed the same block at once) keeps its first block."""
        if name not in self._block and block not in self._name:
            self._name[block], self._block[name] = name, block
