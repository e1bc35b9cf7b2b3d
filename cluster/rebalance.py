"""Hot-expert placement: how many copies each (layer, expert) gets and which worker holds each.

Pure functions, no Ray. Shapes: L MoE layers, E experts, W workers.
Per layer (each layer is a synchronisation point of the decode step):
  1. copies: every expert gets one; extra copies go, one at a time, to the
     expert with the highest load per copy (DeepSeek EPLB's greedy);
  2. packing: copies, heaviest first, go to the least-loaded worker that has
     room and holds no copy of the same expert; a copy first tries the worker
     it is on now, if that keeps the worker under the balanced target (fewer
     weight moves). Hierarchical: balance across nodes first, then workers.
Tokens are assumed split evenly among an expert's copies.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import numpy as np

from cluster.placement import Placement, Slot


@dataclass(frozen=True)
class Worker:
    node: str = "node-0"
    # Most copies of one layer's experts this worker may hold (its slot capacity or memory
    # budget, divided by the MoE layers); None = no limit beyond an even share.
    layer_slots: int | None = None


@dataclass(frozen=True)
class Plan:
    placement: Placement
    moves: int  # copies that must be loaded somewhere new
    max_over_mean: float  # worst layer's most-loaded worker / mean worker load (1.0 = perfect)


def replicate(loads: np.ndarray, extra: int, max_copies: int | None = None) -> np.ndarray:
    """[E] loads → [E] copy counts: extra copies to the highest load per copy, greedily,
    at most `max_copies` per expert (no worker holds two copies of one expert)."""
    copies = np.ones(len(loads), dtype=np.int64)
    max_copies = max_copies or extra + 1
    heap = [(-float(load), 1, e) for e, load in enumerate(loads)]  # ties: fewer copies, then lower id
    heapq.heapify(heap)
    for _ in range(extra):
        if not heap:
            break
        _, _, e = heapq.heappop(heap)
        copies[e] += 1
        if copies[e] < max_copies:
            heapq.heappush(heap, (-float(loads[e]) / copies[e], int(copies[e]), e))
    return copies


def _affine(e: int, load: dict[int, float], count: dict[int, int], held: dict[int, set[int]],
            capacity: dict[int, int], item_load: float, target: float, affinity: np.ndarray) -> int | None:
    """Among bins with room that stay under the target, the one whose experts are most often
    chosen together with `e` (ties: least loaded); None when no bin qualifies."""
    fits = [b for b in load if count[b] < capacity[b] and e not in held[b] and load[b] + item_load <= target]
    if not fits:
        return None
    return max(fits, key=lambda b: (sum(float(affinity[e, x]) for x in held[b]), -load[b]))


def _pack(items: list[tuple[float, int]], bins: list[int], capacity: dict[int, int], sticky: dict[int, list[int]],
          target: float, affinity: np.ndarray | None = None) -> dict[int, list[int]]:
    """items (load, expert) → bin per item. `sticky[expert]`: bins that held it before.
    `affinity[e, e']` (co-activation counts), when given, co-locates experts chosen together."""
    load = {b: 0.0 for b in bins}
    count = {b: 0 for b in bins}
    held: dict[int, set[int]] = {b: set() for b in bins}
    out: dict[int, list[int]] = {}
    heap = [(0.0, b) for b in bins]
    for item_load, e in sorted(items, key=lambda x: -x[0]):
        choice = next((b for b in sticky.get(e, []) if b in load and count[b] < capacity[b] and e not in held[b]
                       and load[b] + item_load <= target), None)
        if choice is None and affinity is not None:
            choice = _affine(e, load, count, held, capacity, item_load, target, affinity)
        if choice is None:
            skipped = []
            while heap:
                lb, b = heapq.heappop(heap)
                if lb != load[b]:
                    continue  # stale entry
                if count[b] < capacity[b] and e not in held[b]:
                    choice = b
                    break
                skipped.append((lb, b))
            for entry in skipped:
                heapq.heappush(heap, entry)
            if choice is None:
                raise ValueError("not enough worker slots for the requested copies")
        load[choice] += item_load
        count[choice] += 1
        held[choice].add(e)
        heapq.heappush(heap, (load[choice], choice))
        out.setdefault(e, []).append(choice)
    return out


def _layer_items(loads: np.ndarray, copies: np.ndarray) -> list[tuple[float, int]]:
    return [(float(loads[e]) / copies[e], e) for e in range(len(loads)) for _ in range(copies[e])]


def _capacities(workers: list[Worker], copies: int) -> dict[int, int]:
    limited = sum(w.layer_slots for w in workers if w.layer_slots is not None)
    free = sum(w.layer_slots is None for w in workers)
    share = math.ceil(max(copies - limited, 0) / free) if free else 0  # even share: memory stays balanced too
    return {i: share if w.layer_slots is None else w.layer_slots for i, w in enumerate(workers)}


def _active(workers: list[Worker]) -> list[int]:
    """Workers that may hold copies (a retired worker has layer_slots=0)."""
    return [i for i, w in enumerate(workers) if w.layer_slots != 0]


def _place_layer(loads, copies, workers: list[Worker], current: dict[int, list[int]], hierarchical: bool,
                 affinity: np.ndarray | None = None):
    items = _layer_items(loads, copies)
    capacity = _capacities(workers, len(items))
    target = loads.sum() / len(_active(workers)) * 1.02
    if not hierarchical:
        return _pack(items, list(range(len(workers))), capacity, current, target, affinity)
    nodes = sorted({w.node for w in workers})
    members = {n: [i for i, w in enumerate(workers) if w.node == n] for n in nodes}
    node_of = {i: nodes.index(w.node) for i, w in enumerate(workers)}
    node_cap = {n: sum(capacity[i] for i in members[name]) for n, name in enumerate(nodes)}
    sticky_nodes = {e: [node_of[w] for w in ws] for e, ws in current.items()}
    # A node may hold several copies of an expert: pack copies (not experts) to nodes.
    by_node = _pack([(load, i) for i, (load, _) in enumerate(items)], list(range(len(nodes))), node_cap,
                    {i: sticky_nodes.get(e, []) for i, (_, e) in enumerate(items)}, target * len(workers) / len(nodes))
    out: dict[int, list[int]] = {}
    for n, name in enumerate(nodes):
        node_items = [items[i] for i, ns in by_node.items() if ns[0] == n]
        local = _pack(node_items, members[name], capacity, current,
                      sum(x for x, _ in node_items) / len(members[name]) * 1.02, affinity)
        for e, ws in local.items():
            out.setdefault(e, []).extend(ws)
    return out


def _fit_extra(workers: list[Worker], num_experts: int, extra: int) -> int:
    """Extra copies per layer that the workers' slot limits leave room for."""
    if any(w.layer_slots is None for w in workers):
        return extra
    room = sum(w.layer_slots for w in workers)
    if room < num_experts:
        raise ValueError(f"the workers hold at most {room} expert copies per layer (slot capacity / memory "
                         f"budget) but each layer has {num_experts} experts")
    return min(extra, room - num_experts)


def plan(loads: np.ndarray, moe_layers: list[int], workers: list[Worker], extra_per_layer: int,
         current: Placement | None = None, hierarchical: bool = False, max_copies: int | None = None,
         coactivation: np.ndarray | None = None) -> Plan:
    """loads [L, E] (tokens per expert over the window) → a new placement.
    coactivation [L, E, E] (optional): co-locate experts often chosen for the same token."""
    max_copies = min(max_copies or len(workers), len(workers))
    extra_per_layer = _fit_extra(workers, loads.shape[1], extra_per_layer)
    old = current.copies() if current else {}
    slots: list[list[Slot]] = [[] for _ in workers]
    moves, worst = 0, 0.0
    for li, layer in enumerate(moe_layers):
        copies = replicate(loads[li], extra_per_layer, max_copies)
        now = {e: list(ws) for (lyr, e), ws in old.items() if lyr == layer}
        affinity = None if coactivation is None else coactivation[li] + coactivation[li].T
        assigned = _place_layer(loads[li], copies, workers, now, hierarchical, affinity)
        worker_load = np.zeros(len(workers))
        active = _active(workers)
        for e, ws in assigned.items():
            moves += len(set(ws) - set(now.get(e, [])))
            for w in ws:
                slots[w].append((layer, e))
                worker_load[w] += loads[li][e] / copies[e]
        if worker_load[active].mean() > 0:
            worst = max(worst, float(worker_load[active].max() / worker_load[active].mean()))
    return Plan(Placement(tuple(tuple(sorted(s)) for s in slots)), moves, worst)


def worker_imbalance(loads: np.ndarray, moe_layers: list[int], placement: Placement,
                     num_workers: int, active: list[int] | None = None) -> list[float]:
    """Per layer: max/mean worker load for a placement, tokens split evenly among copies
    (1.0 = perfect; 0.0 for a layer with no load yet), over the `active` workers (default all)."""
    copies = placement.copies()
    active = list(range(num_workers)) if active is None else active
    out = []
    for li, layer in enumerate(moe_layers):
        worker_load = np.zeros(num_workers)
        for e in range(loads.shape[1]):
            ws = copies.get((layer, e), ())
            for w in ws:
                worker_load[w] += loads[li][e] / len(ws)
        mine = worker_load[active]
        out.append(float(mine.max() / mine.mean()) if mine.mean() > 0 else 0.0)
    return out


def imbalance(loads: np.ndarray, moe_layers: list[int], placement: Placement, num_workers: int,
              active: list[int] | None = None) -> float:
    """Worst layer's max/mean worker load for a placement, tokens split evenly among copies."""
    return max(worker_imbalance(loads, moe_layers, placement, num_workers, active), default=0.0)


def hand_back(placement: Placement, worker: int, active: list[int]) -> Placement:
    """`worker` leaves: its copies go away, and each slot it held the last copy of moves to
    the active worker holding the fewest slots (so every expert keeps a copy)."""
    copies = placement.copies()
    slots = [list(s) for s in placement.workers]
    others = [w for w in active if w != worker]
    if not others:
        raise ValueError("the last worker cannot leave")
    for slot in placement.workers[worker]:
        if copies[slot] == (worker,):
            target = min(others, key=lambda w: len(slots[w]))
            slots[target].append(slot)
    slots[worker] = []
    return Placement(tuple(tuple(sorted(s)) for s in slots))
