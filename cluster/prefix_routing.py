"""Which router should take a request, so that prompts sharing a prefix meet the KV cache that holds it.

Each router has its own prefix cache (cluster/model/block_pool.py): a chat whose turns land on
different routers recomputes its conversation every turn. The ingress names a prompt's full
blocks as the routers do (chained hashes of its token ids) and remembers, per prompt, the name of
its last full block and the router that took it: the name of the whole cached prefix. A later
prompt that starts with that prefix (the next turn of a conversation) contains the same name, and
its longest remembered name points at the router most likely to hold the most of it. Only the last
name is kept (one entry per request): a short shared head (a chat template's first tokens, a common
system prompt) then never pulls unrelated conversations onto one router; every router caches such
a head once.

The choice: that router, unless it has `max_imbalance` more requests than the least loaded one (a
hot conversation must not pile onto one router); otherwise, and for prefixes never seen, the least
loaded router, ties broken by the prompt's own name (unrelated prompts spread over idle routers,
and the choice stays deterministic). The table is a bounded LRU; it is advice, never correctness:
any router can serve any request.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from cluster.model.block_pool import BlockHash, block_hashes


@dataclass(frozen=True)
class RouteChoice:
    router: str
    reason: str  # "affinity" | "least_loaded" | "overloaded" (the affine router was too busy)


def prefix_keys(token_ids: list[int], block_size: int) -> list[BlockHash]:
    """The names of the prompt's full blocks, in order: the i-th names the prefix up to block i's end."""
    return block_hashes(token_ids, block_size)


def least_loaded(loads: dict[str, int], spread: BlockHash | None) -> str:
    """The least loaded router; among equals, one picked by `spread` (the first without one)."""
    low = min(loads.values())
    ties = sorted(r for r, n in loads.items() if n == low)
    return ties[int.from_bytes(spread[:8], "little") % len(ties)] if spread else ties[0]


def choose_router(keys: list[BlockHash], loads: dict[str, int], affinity: dict[BlockHash, str],
                  max_imbalance: int) -> RouteChoice:
    """keys: the prompt's block names (prefix_keys); loads: ongoing requests per live router (non-empty);
    affinity: remembered prefix name -> the router that took it."""
    least = least_loaded(loads, keys[-1] if keys else None)
    owner = next((affinity[k] for k in reversed(keys) if k in affinity), None)
    if owner is None or owner not in loads:
        return RouteChoice(least, "least_loaded")
    if loads[owner] - loads[least] > max_imbalance:
        return RouteChoice(least, "overloaded")
    return RouteChoice(owner, "affinity")


class PrefixAffinity:
    """The LRU table choose_router reads; `remember` records where a prompt went."""

    def __init__(self, max_imbalance: int = 16, capacity: int = 100_000):
        self.max_imbalance, self.capacity = max_imbalance, capacity
        self.table: OrderedDict[BlockHash, str] = OrderedDict()

    def choose(self, keys: list[BlockHash], loads: dict[str, int]) -> RouteChoice:
        choice = choose_router(keys, loads, self.table, self.max_imbalance)
        for k in reversed(keys):  # the prefix it matched was used: keep it from the LRU's end
            if k in self.table:
                self.table.move_to_end(k)
                break
        return choice

    def remember(self, keys: list[BlockHash], router: str) -> None:
        """The prompt went to `router`: its whole prefix (up to its last full block) lives there now."""
        if not keys:
            return
        self.table[keys[-1]] = router
        self.table.move_to_end(keys[-1])
        while len(self.table) > self.capacity:
            self.table.popitem(last=False)

    def forget(self, router: str) -> None:
        """The router is gone: what it held is lost with it."""
        for k in [k for k, r in self.table.items() if r == router]:
            del self.table[k]
