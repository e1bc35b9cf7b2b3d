"""Which router should take a request, so that prompts sharing a prefix meet the KV cache that holds it.

Each router has its own prefix cache (cluster/model/block_pool.py): a chat whose turns land on
different routers recomputes its conversation every turn. The choice: the router that most
recently took a request with the same leading block names (what the ingress can hash itself, from
the prompt's token ids), unless that router is loaded `max_imbalance` requests above the least
loaded one (a hot prefix must not pile onto one router); otherwise, and for prefixes never seen,
the least-loaded router (ties: the lower id, so the choice is deterministic).
The affinity table is a bounded LRU of prefix names; it is advice, never correctness: any router
can serve any request.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from cluster.model.block_pool import BlockHash, block_hashes


@dataclass(frozen=True)
class RouteChoice:
    router: str
    reason: str  # "affinity" | "least_loaded" | "overloaded" (the affine router was too busy)


def prefix_key(token_ids: list[int], block_size: int, num_blocks: int = 1) -> BlockHash | None:
    """The name of the prompt's leading `num_blocks` full blocks (None: shorter than one block)."""
    names = block_hashes(token_ids[:block_size * num_blocks], block_size)
    return names[-1] if names else None


def choose_router(key: BlockHash | None, loads: dict[str, int], affinity: dict[BlockHash, str],
                  max_imbalance: int) -> RouteChoice:
    """loads: ongoing requests per live router (non-empty); affinity: prefix name -> router that had it."""
    least = min(sorted(loads), key=lambda r: loads[r])
    owner = affinity.get(key) if key is not None else None
    if owner is None or owner not in loads:
        return RouteChoice(least, "least_loaded")
    if loads[owner] - loads[least] > max_imbalance:
        return RouteChoice(least, "overloaded")
    return RouteChoice(owner, "affinity")


class PrefixAffinity:
    """The LRU table choose_router reads, updated with every choice."""

    def __init__(self, max_imbalance: int = 4, capacity: int = 100_000):
        self.max_imbalance, self.capacity = max_imbalance, capacity
        self.table: OrderedDict[BlockHash, str] = OrderedDict()

    def choose(self, key: BlockHash | None, loads: dict[str, int]) -> RouteChoice:
        choice = choose_router(key, loads, self.table, self.max_imbalance)
        if key is not None:  # the prefix now lives (also) where this request goes
            self.table[key] = choice.router
            self.table.move_to_end(key)
            if len(self.table) > self.capacity:
                self.table.popitem(last=False)
        return choice
