"""Tier-weighted copy choice: which copy of an expert serves which of a layer's rows when copies
sit on workers of different speed. Pure, no transport; the tiered sibling of `cluster.copy_choice`.

Each worker has a cost per row (the fast tier's T, the host tier's ~10 T) and a queue (rows it
already has this step). Row by row, an expert's rows go to the live copy that would finish them
first: (queue + rows given + 1) × cost. So rows of an expert with a fast copy go to the fast copy
first, and spill to a host copy only when the fast worker's queue makes the host copy the earlier
one. Ties go to the cheaper worker, then to a copy on the router's node, then to the lower index.
An expert's rows on one worker stay one contiguous group (one call).
"""
from __future__ import annotations

from typing import Mapping, Sequence

from cluster.copy_choice import Group, NoLiveCopy


def choose_tiered(layer: int, counts: Sequence[int], copies: Mapping[tuple[int, int], tuple[int, ...]], *,
                  cost: Sequence[float], down: set[int], same_node: frozenset[int] = frozenset(),
                  queue: Mapping[int, int] | None = None) -> dict[int, list[Group]]:
    """worker -> [(expert_id, first row, rows)] for one layer's rows (sorted by expert id).

    `cost[w]`: time per row on worker w (relative units); `queue[w]`: rows worker w holds already.
    Raises NoLiveCopy when an expert with rows has no copy outside `down`."""
    given: dict[int, int] = dict(queue or {})  # rows each worker holds, queue + this layer so far
    groups: dict[int, list[Group]] = {}
    start = 0
    for expert_id, n in enumerate(counts):
        if not n:
            continue
        holders = copies.get((layer, expert_id), ())
        live = [w for w in holders if w not in down]
        if not live:
            raise NoLiveCopy(layer, expert_id, holders)
        rank = lambda w: ((given.get(w, 0) + 1) * cost[w], cost[w], w not in same_node, w)  # noqa: E731
        share: dict[int, int] = {}
        if len(live) == 1:  # one copy: all its rows, no row-by-row weighing
            share[live[0]], given[live[0]] = n, given.get(live[0], 0) + n
        for _ in range(n if len(live) > 1 else 0):
            w = min(live, key=rank)
            given[w] = given.get(w, 0) + 1
            share[w] = share.get(w, 0) + 1
        for w in sorted(share, key=lambda x: (cost[x], x)):  # fast copy's rows first
            groups.setdefault(w, []).append((expert_id, start, share[w]))
            start += share[w]
    return groups
