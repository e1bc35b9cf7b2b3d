"""Hot-expert placement: how many copies each (layer, expert) gets and which worker holds each.

Pure functions, no Ray. Shapes: L MoE layers, E experts, W workers.
Per layer (each layer is a synchronisation point of the decode step):
  1. copies: every expert gets one; extra copies go, one at a time, to the expert with
     the highest load per copy (DeepSeek EPLB's greedy), as many as the workers' room
     allows (`cluster.capacity`: slots, memory budget) and no more than actually lower
     the layer's max/mean worker load: when traffic evens out, extra copies are retired;
  2. packing (`cluster.packing`): copies, heaviest first, go to the least-loaded worker
     with room that holds no copy of the same expert; a copy first tries the worker it
     is on now, if that keeps the worker under the balanced target (fewer weight moves).
     Hierarchical: balance across nodes first, then workers inside each node;
  3. a layer whose current placement is valid and no worse keeps it unchanged.
The planner fails only when not even one copy per expert fits (the error names the limit).
Tokens are assumed split evenly among an expert's copies.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from cluster.capacity import LayerRoom, Worker
from cluster.packing import Packing, copy_counts, copy_order, fits, items
from cluster.placement import Expert, Placement

__all__ = ["Plan", "Worker", "hand_back", "imbalance", "plan", "replicate", "worker_imbalance"]

TARGET_SLACK = 1.02  # a copy stays on / joins a preferred worker while it stays under mean × this
EXTRA_GAIN = 1e-3  # extra copies are kept only when they lower a layer's max/mean by more than this
SEARCH_STEPS = 3  # packings tried per layer besides the one with every extra copy that fits


@dataclass(frozen=True)
class Plan:
    placement: Placement
    moves: int  # copies that must be loaded somewhere new
    max_over_mean: float  # worst layer's most-loaded worker / mean worker load (1.0 = perfect)
    retires: int = 0  # copies the current placement holds and this one does not
    worker_bytes: tuple[int, ...] = ()  # [W] bytes of expert copies each worker holds (copies × expert_bytes)

    @property
    def changed(self) -> bool:
        """False when the plan is the current placement: nothing to load, nothing to retire."""
        return self.moves > 0 or self.retires > 0


def replicate(loads: np.ndarray, extra: int, max_copies: int | None = None) -> np.ndarray:
    """[E] loads → [E] copy counts: extra copies to the highest load per copy, greedily,
    at most `max_copies` per expert (no worker holds two copies of one expert)."""
    order = copy_order(np.asarray(loads, dtype=float), extra, max_copies or extra + 1)
    return copy_counts(len(loads), order, extra)


@dataclass(frozen=True)
class _Layer:
    """What packing one layer needs. loads [E]; nodes[w]: node name of worker w."""
    loads: np.ndarray
    active: list[int]
    nodes: tuple[str, ...]
    sticky: dict[int, list[int]]
    hierarchical: bool
    affinity: np.ndarray | None

    def ratio(self, where: dict[int, list[int]]) -> float:
        """max/mean worker load over the active workers (0.0 for a layer with no load)."""
        ws = [w for w_list in where.values() for w in w_list]
        share = [self.loads[e] / len(w_list) for e, w_list in where.items() for _ in w_list]
        load = np.bincount(ws, weights=share, minlength=len(self.nodes)) if ws else np.zeros(len(self.nodes))
        mine = load[self.active]
        return float(mine.max() / mine.mean()) if mine.mean() > 0 else 0.0

    def bound(self, copies: np.ndarray) -> float:
        """A lower bound of `ratio` for these copy counts: the heaviest copy or the mean."""
        mean = self.loads.sum() / len(self.active)
        return float(max((self.loads / copies).max(), mean) / mean) if mean > 0 else 0.0


def _pack(layer: _Layer, copies: np.ndarray, caps: np.ndarray) -> dict[int, list[int]]:
    """Copies → workers. Hierarchical: copies to nodes (≤ one per worker of the node), then to
    the node's workers; what a node cannot take goes to any worker (never fails when `fits`)."""
    per_copy = layer.loads / copies
    target = layer.loads.sum() / len(layer.active) * TARGET_SLACK
    pk = Packing(caps, per_copy)
    todo = items(copies, per_copy)
    if layer.hierarchical:
        names = sorted({layer.nodes[w] for w in layer.active})
        members = [[w for w in layer.active if layer.nodes[w] == n and caps[w] > 0] for n in names]
        by_node = Packing([caps[m].sum() for m in members], per_copy, limit=[len(m) for m in members],
                          scale=[max(len(m), 1) for m in members])
        index = {n: i for i, n in enumerate(names)}
        node_sticky = {e: [index[layer.nodes[w]] for w in ws if layer.nodes[w] in index]
                       for e, ws in layer.sticky.items()}
        todo = by_node.place(todo, range(len(names)), node_sticky, target)
        per_node: list[list[int]] = [[] for _ in names]
        for e in dict.fromkeys(items(copies, per_copy)):  # experts, heaviest copy first
            for n in by_node.where.get(e, ()):
                per_node[n].append(e)
        for mine, m in zip(per_node, members):
            node_target = float(per_copy[mine].sum()) / max(len(m), 1) * TARGET_SLACK
            todo += pk.place(mine, m, layer.sticky, node_target, layer.affinity)
        todo = sorted(todo, key=lambda e: (-per_copy[e], e))
    left = pk.place(todo, layer.active, layer.sticky, target, None if layer.hierarchical else layer.affinity)
    if left:
        raise RuntimeError(f"planner bug: {len(left)} copies found no worker although the copy counts fit")
    return pk.where


def _plan_layer(layer: _Layer, room: LayerRoom, index: int, extra: int, max_copies: int,
                min_copies: int) -> tuple[dict[int, list[int]], int]:
    """One layer's copies and their workers. Every expert gets `min_copies` (fewer only when the room
    holds no more); extra copies are added in greedy order; of the counts tried (all that fit, the
    fewest the load bound allows, then a few bisection steps between), the fewest whose plain packing
    (flat, no preferences) is within EXTRA_GAIN of the best one win; then the layer's own packing
    places them. The count does not depend on where copies are now, so replanning the same loads
    keeps the same copies. Returns the copies' workers and the copies every expert got (the floor)."""
    n_exp, free = len(layer.loads), replace(layer, sticky={}, hierarchical=False, affinity=None)
    most = min(max_copies, int((room.caps(index) > 0).sum()))
    base = next((b for b in range(min(min_copies, most), 1, -1)
                 if fits(np.full(n_exp, b), room.caps(index, n_exp * b))), 1)
    order = copy_order(layer.loads, extra, most, base)
    counts = lambda m: copy_counts(n_exp, order, m, base)  # noqa: E731
    feasible = lambda m: fits(counts(m), room.caps(index, n_exp * base + m))  # noqa: E731
    hi = next(m for m in range(len(order), -1, -1) if feasible(m))
    tried = {hi: _pack(free, counts(hi), room.caps(index, n_exp * base + hi))}
    ratio = {hi: free.ratio(tried[hi])}
    lo = _first(0, hi, lambda m: free.bound(counts(m)) <= ratio[hi] + EXTRA_GAIN)  # fewer cannot do as well
    probe = lo  # the bound is often tight (a few hot experts): try it first, then bisect
    for _ in range(SEARCH_STEPS):
        if lo >= hi:
            break
        if feasible(probe):
            tried[probe] = _pack(free, counts(probe), room.caps(index, n_exp * base + probe))
            ratio[probe] = free.ratio(tried[probe])
        good = probe in ratio and ratio[probe] <= min(ratio.values()) + EXTRA_GAIN
        lo, hi = (lo, probe) if good else (probe + 1, hi)
        probe = (lo + hi) // 2
    m = min(m for m in ratio if ratio[m] <= min(ratio.values()) + EXTRA_GAIN)
    plain = not layer.sticky and not layer.hierarchical and layer.affinity is None
    return (tried[m] if plain else _pack(layer, counts(m), room.caps(index, n_exp * base + m))), base


def _first(lo: int, hi: int, ok) -> int:
    """Smallest m in [lo, hi] with ok(m), for ok monotone (False … True); hi when none."""
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if ok(mid) else (mid + 1, hi)
    return hi


def _by_layer(current: Placement | None, num_workers: int | None = None) -> dict[int, dict[int, list[int]]]:
    """layer → expert → workers holding a copy (only workers < num_workers, when given)."""
    out: dict[int, dict[int, list[int]]] = {}
    for (layer, e), ws in (current.copies() if current else {}).items():
        ws = [w for w in ws if num_workers is None or w < num_workers]
        if ws:
            out.setdefault(layer, {})[e] = ws
    return out


def _counts(where: dict[int, list[int]], num_workers: int) -> np.ndarray:
    return np.bincount([w for ws in where.values() for w in ws], minlength=num_workers).astype(np.int64)


def _keeps(layer: _Layer, now: dict[int, list[int]], new: dict[int, list[int]], caps: np.ndarray,
           max_copies: int, extra: int, base: int) -> bool:
    """Keep the layer's current placement: it is valid (every expert with at least `base` copies, the
    floor the new one was planned with; no two copies on one worker; within room and limits) and the
    new one neither holds fewer copies nor balances better by more than EXTRA_GAIN."""
    n_exp = len(layer.loads)
    if sorted(now) != list(range(n_exp)) or any(len(set(ws)) != len(ws) or not base <= len(ws) <= max_copies
                                                for ws in now.values()):
        return False
    counts = _counts(now, len(caps))
    if (counts > caps).any() or counts.sum() - n_exp * base > extra or counts.sum() > _counts(new, len(caps)).sum():
        return False
    return layer.ratio(now) <= layer.ratio(new) + EXTRA_GAIN


def plan(loads: np.ndarray, *, moe_layers: list[int], workers: list[Worker], extra_per_layer: int,
         current: Placement | None = None, hierarchical: bool = False, max_copies: int | None = None,
         coactivation: np.ndarray | None = None, expert_bytes: int = 0, min_copies: int = 1) -> Plan:
    """A new placement for the expert loads.

    loads [L, E]: tokens per expert over the window, row i for MoE layer `moe_layers[i]`.
    workers [W]: each worker's node and limits (`Worker.slots`, `.budget_bytes`, `.layer_slots`;
    `.retired`, or a limit of 0, leaves it out). extra_per_layer: most copies beyond one per expert, per layer
    (fewer when the room or `max_copies` leave no place, or when more would not lower
    max/mean). current: the placement in use (copies stay where they are when that keeps
    balance; a layer no better off keeps its current copies). max_copies: most copies of one
    expert (default and cap: the active workers). coactivation [L, E, E]: co-locate experts often
    chosen for the same token. expert_bytes: bytes of one copy (for `budget_bytes`, `worker_bytes`).
    min_copies: copies every expert keeps (the app's `expert_copies`: a worker may die without failing
    a request), capped by the active workers and the room; extra copies come beyond them.
    Returns a Plan; `plan.changed` is False when it is the current placement.
    Raises ValueError, naming the limit, when not even one copy per expert fits.
    """
    loads = np.asarray(loads, dtype=float)
    old, nodes = _by_layer(current), tuple(w.node for w in workers)
    known = _by_layer(current, len(workers))  # copies on workers that still exist
    held = np.stack([_counts(known.get(layer, {}), len(workers)) for layer in moe_layers], axis=1)  # [W, L]
    room = LayerRoom(workers, num_layers=loads.shape[0], num_experts=loads.shape[1], expert_bytes=expert_bytes,
                     held=held, min_copies=min_copies)
    max_copies = min(max(max_copies or len(workers), min_copies), len(room.active))  # the floor wins
    chosen: dict[int, dict[int, list[int]]] = {}
    need = loads.max(axis=1) / np.maximum(loads.sum(axis=1), 1e-300)  # skewed layers pick room first
    for li in np.argsort(-need, kind="stable"):
        now = known.get(moe_layers[li], {})
        affinity = None if coactivation is None else coactivation[li] + coactivation[li].T
        layer = _Layer(loads[li], room.active, nodes, now, hierarchical, affinity)
        where, base = _plan_layer(layer, room, li, extra_per_layer, max_copies, min_copies)
        if _keeps(layer, now, where, room.caps(li), max_copies, extra_per_layer, base):
            where = now
        room.commit(li, _counts(where, len(workers)))
        chosen[int(li)] = where
    return _result(loads, moe_layers, chosen, old, room.active, len(workers), expert_bytes)


def _result(loads, moe_layers, chosen, old, active, num_workers, expert_bytes) -> Plan:
    held: list[list[Expert]] = [[] for _ in range(num_workers)]
    moves = retires = 0
    worst = 0.0
    for li, where in sorted(chosen.items()):
        layer, before = moe_layers[li], old.get(moe_layers[li], {})
        for e, ws in where.items():
            moves += len(set(ws) - set(before.get(e, ())))
            for w in ws:
                held[w].append((layer, e))
        retires += sum(len(set(ws) - set(where.get(e, ()))) for e, ws in before.items())
        worst = max(worst, _Layer(loads[li], active, ("",) * num_workers, {}, False, None).ratio(where))
    return Plan(Placement(tuple(tuple(sorted(h)) for h in held)), moves, worst, retires,
                tuple(len(h) * expert_bytes for h in held))


def worker_imbalance(loads: np.ndarray, moe_layers: list[int], placement: Placement, *,
                     active: list[int] | None = None) -> list[float]:
    """Per layer: max/mean worker load for a placement, tokens split evenly among copies
    (1.0 = perfect; 0.0 for a layer with no load yet), over the `active` workers (default all)."""
    copies = _by_layer(placement)
    active = list(range(placement.num_workers)) if active is None else active
    nodes = ("",) * placement.num_workers
    return [_Layer(np.asarray(loads[li], dtype=float), active, nodes, {}, False, None).ratio(copies.get(layer, {}))
            for li, layer in enumerate(moe_layers)]


def imbalance(loads: np.ndarray, moe_layers: list[int], placement: Placement, *,
              active: list[int] | None = None) -> float:
    """Worst layer's max/mean worker load for a placement, tokens split evenly among copies."""
    return max(worker_imbalance(loads, moe_layers, placement, active=active), default=0.0)


def hand_back(placement: Placement, worker: int, active: list[int]) -> Placement:
    """`worker` leaves: its copies go away, and each expert it held the last copy of gets a
    copy on the active worker holding the fewest copies (so every expert keeps a copy)."""
    copies = placement.copies()
    held = [list(h) for h in placement.workers]
    others = [w for w in active if w != worker]
    if not others:
        raise ValueError("the last worker cannot leave")
    for expert in placement.workers[worker]:
        if copies[expert] == (worker,):
            target = min(others, key=lambda w: len(held[w]))
            held[target].append(expert)
    held[worker] = []
    return Placement(tuple(tuple(sorted(h)) for h in held))
