"""What the autoscaler does next: the pure decision, no Ray, no clock, no I/O.

    decide(loads, table, limits, ...) → Decision (a new placement, or why none)

`deployments.rebalancer.Rebalancer` executes a decision (loads copies, switches the
routers, retires); this module only chooses. Shapes: L MoE layers, E experts, W workers.

| reason     | placement | when |
|------------|-----------|------|
| no_load    | None | no traffic in the window |
| cooldown   | None | the last change is younger than `cooldown_s` |
| no_change  | None | the planner keeps the current placement |
| floor      | new  | some expert has fewer than `min_copies` copies (a worker left): restored, at once |
| retire     | new  | only retirements: traffic evened out, extra copies are memory for nothing |
| balanced   | None | max/mean under `hot_threshold` and no extra copy to free |
| small_gain | None | the plan lowers max/mean by less than `min_gain` |
| rebalance  | new  | hot enough and worth it |
| static     | new  | mode static: DeepSeek's EPLB on a recorded profile, once |
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cluster.eplb import rebalance_experts, to_placement
from cluster.placement import Placement, Table
from cluster.rebalance import Worker, imbalance, plan

__all__ = ["Decision", "Limits", "decide", "static", "workers"]


@dataclass(frozen=True)
class Limits:
    """The policy knobs a decision reads (`AutoscalePolicy.limits` builds them)."""
    hot_threshold: float  # act only when the worst layer's max/mean worker load is at least this
    min_gain: float  # skip a change that lowers max/mean by less
    cooldown_s: float  # minimum seconds between two changes
    extra_per_layer: int  # most copies beyond one per expert, per layer
    max_copies: int  # most copies of one expert
    hierarchical: bool = False  # balance across nodes first
    co_activation: bool = False  # co-locate experts chosen together
    slots_per_worker: int | None = None  # most copies one worker holds (None: no limit)
    budget_bytes: int | None = None  # most bytes of copies one worker holds (None: no limit)
    min_copies: int = 1  # copies every expert keeps (the app's expert_copies): retiring stops there


@dataclass(frozen=True)
class Decision:
    reason: str  # see the module table
    placement: Placement | None  # the placement to move to; None: keep the current one
    before: float  # worst layer's max/mean worker load now
    after: float  # ... with `placement` (or as planned, when refused)


def workers(table: Table, limits: Limits) -> list[Worker]:
    """[W] each worker's room for copies; a retired worker has none."""
    return [Worker(node=ref.node_id or "node-0", slots=limits.slots_per_worker, budget_bytes=limits.budget_bytes,
                   retired=ref.retired) for ref in table.workers]


def decide(loads: np.ndarray, *, table: Table, limits: Limits, moe_layers: list[int], expert_bytes: int,
           since_change_s: float, coactivation: np.ndarray | None = None) -> Decision:
    """The next online change. loads [L, E]: tokens per expert over the window, row i for MoE layer
    `moe_layers[i]`; coactivation [L, E, E] (read only with `limits.co_activation`); since_change_s:
    seconds since the last change; expert_bytes: bytes of one copy."""
    current, active = table.placement, table.active()
    short = _fewest(current, active) < min(limits.min_copies, len(active))  # a worker left: restore the floor
    if loads.sum() <= 0 and not short:
        return Decision("no_load", None, 0.0, 0.0)
    before = imbalance(loads, moe_layers, current, active=active)
    if since_change_s < limits.cooldown_s and not short:
        return Decision("cooldown", None, before, before)
    room = workers(table, limits)
    loads = loads if loads.sum() > 0 else np.ones_like(loads)  # no traffic yet: the floor, spread evenly
    new = plan(loads, moe_layers=moe_layers, workers=room, extra_per_layer=limits.extra_per_layer,
               current=current, hierarchical=limits.hierarchical, max_copies=limits.max_copies,
               coactivation=coactivation if limits.co_activation else None, expert_bytes=expert_bytes,
               min_copies=limits.min_copies)
    if not new.changed:
        return Decision("no_change", None, before, new.max_over_mean)  # min_gain 0 must not move nothing
    if short and _fewest(new.placement, active) > _fewest(current, active):
        return Decision("floor", new.placement, before, new.max_over_mean)
    if new.moves == 0 and new.retires > 0 and new.max_over_mean <= max(before, limits.hot_threshold):
        return Decision("retire", new.placement, before, new.max_over_mean)  # traffic evened out: free memory
    if before < limits.hot_threshold:
        return _evened_out(loads, before, table, limits, room, moe_layers, expert_bytes)
    if before - new.max_over_mean < limits.min_gain:
        return Decision("small_gain", None, before, new.max_over_mean)
    return Decision("rebalance", new.placement, before, new.max_over_mean)


def _fewest(placement: Placement, active: list[int]) -> int:
    """Copies on active workers of the expert that has the fewest."""
    live = set(active)
    return min((sum(w in live for w in ws) for ws in placement.copies().values()), default=0)


def _evened_out(loads: np.ndarray, before: float, table: Table, limits: Limits, room: list[Worker],
                moe_layers: list[int], expert_bytes: int) -> Decision:
    """Balanced: if the placement without any extra copy stays under the threshold too, the extra
    copies are memory for nothing: retire them (the planner keeps copies where they are)."""
    if sum(map(len, table.placement.workers)) <= len(table.placement.copies()) * limits.min_copies:
        return Decision("balanced", None, before, before)  # no extra copies to free
    lean = plan(loads, moe_layers=moe_layers, workers=room, extra_per_layer=0, current=table.placement,
                hierarchical=limits.hierarchical, max_copies=limits.max_copies, expert_bytes=expert_bytes,
                min_copies=limits.min_copies)
    if lean.changed and lean.moves == 0 and lean.max_over_mean < limits.hot_threshold:
        return Decision("retire", lean.placement, before, lean.max_over_mean)
    return Decision("balanced", None, before, before)


def static(profile_loads: np.ndarray, profile_layers: list[int], *, table: Table, moe_layers: list[int],
           extra_per_layer: int) -> Decision:
    """Mode static: DeepSeek's EPLB, once, on a recorded profile [L, E], with the online planner's
    copy budget (extra_per_layer), over the active workers. Raises ValueError when the profile's
    layers are not the model's MoE layers."""
    if list(profile_layers) != list(moe_layers):
        raise ValueError(f"profile layers {list(profile_layers)} are not this model's MoE layers "
                         f"{list(moe_layers)}")
    active = table.active()
    maps = rebalance_experts(loads=profile_loads, extra_per_layer=extra_per_layer, num_workers=len(active))
    placed = to_placement(maps, list(moe_layers))
    held: list[tuple] = [()] * table.placement.num_workers
    for i, w in enumerate(active):
        held[w] = placed.workers[i]
    current, new = table.placement, Placement(tuple(held))
    before = imbalance(profile_loads, moe_layers, current, active=active)
    after = imbalance(profile_loads, moe_layers, new, active=active)
    return Decision("static", new, before, after)
