"""Static expert-parallel load balancing in the manner of DeepSeek's EPLB. Pure, no Ray.

Planned once from a load profile (`cluster.profile`), unlike the online planner
(`cluster.rebalance.plan`), which replans from live loads, keeps copies where they are
and trims extra copies that do not help. Both take the same copy budget:
`extra_per_layer` copies beyond one per expert, in every layer.

Glossary. A *logical* expert is an expert of the model (`expert_id` of one layer); a
*physical* expert is one of its copies, held in a slot. Slots are numbered worker by
worker, the same in every layer: worker w holds slots `offsets[w] .. offsets[w+1]-1`
(each worker gets P // W or P // W + 1 of the P = E + extra_per_layer slots).

| map                   | shape        | entry                                          |
|-----------------------|--------------|------------------------------------------------|
| physical_to_logical   | [L, P]       | expert_id in slot p                            |
| logical_to_physical   | [L, E, X]    | the slots holding the expert, -1 past its count |
| logical_count         | [L, E]       | copies of the expert (X = its largest value)   |
| slot_worker           | [P]          | worker holding slot p                          |

Example: loads [[90, 10, 10, 10]], extra_per_layer=2, num_workers=3 → expert 0 gets 3
copies (30 each), slots [0, 1 | 2, 3 | 4, 5] hold experts [[0, 1], [0, 2], [0, 3]]:
every worker carries 40 tokens.

Per layer:
  1. hierarchical (num_nodes > 1): the experts form `num_groups` contiguous groups
     (DeepSeek-V3: 8 groups of 32); groups go to nodes, the same number per node,
     heaviest first to the lightest node;
  2. per node (or for all workers): extra copies go, one at a time, to the expert with
     the highest load per copy, the node's slots all filled;
  3. copies go onto the node's workers, heaviest first to the least-loaded worker with
     a free slot; never two copies of one expert on one worker.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cluster.packing import Packing, copy_counts, copy_order, items
from cluster.placement import Placement


@dataclass(frozen=True)
class EplbMaps:
    physical_to_logical: np.ndarray  # [L, P] expert_id held in each slot
    logical_to_physical: np.ndarray  # [L, E, X] slots holding each expert, -1 padded
    logical_count: np.ndarray  # [L, E] copies of each expert
    slot_worker: np.ndarray  # [P] worker holding each slot (same for every layer)
    worker_slots: np.ndarray  # [W] slots per worker: P // W or P // W + 1


def _shares(total: int, parts: int) -> list[int]:
    return [total // parts + (i < total % parts) for i in range(parts)]


def _check(num_experts: int, extra: int, num_workers: int, num_nodes: int, num_groups: int) -> None:
    if num_workers < 1 or num_nodes < 1 or extra < 0:
        raise ValueError("num_workers and num_nodes must be ≥ 1 and extra_per_layer ≥ 0")
    if num_workers % num_nodes:
        raise ValueError(f"num_workers ({num_workers}) must be a multiple of num_nodes ({num_nodes})")
    if num_experts % num_groups or num_groups % num_nodes:
        raise ValueError(f"num_groups ({num_groups}) must divide the {num_experts} experts and be a multiple "
                         f"of num_nodes ({num_nodes})")
    per_node = num_workers // num_nodes
    if max(_shares(num_experts + extra, num_nodes)) > num_experts // num_nodes * per_node:
        raise ValueError(f"extra_per_layer ({extra}) leaves more slots on a node than copies it can hold "
                         f"without two copies of one expert on one worker")


def _node_layer(loads: np.ndarray, slots: list[int]) -> list[list[int]]:
    """One node's experts (loads [e]) into its workers' `slots`: the experts on each worker."""
    order = copy_order(loads, sum(slots) - len(loads), sum(s > 0 for s in slots))
    copies = copy_counts(len(loads), order, len(order))
    pk = Packing(slots, loads / copies)
    if pk.place(items(copies, loads / copies), range(len(slots))):
        raise RuntimeError("EPLB packing left copies without a slot")  # cannot happen: the counts fit
    on = [[] for _ in slots]
    for e, ws in sorted(pk.where.items()):
        for w in ws:
            on[w].append(e)
    return on


def _layer(loads: np.ndarray, slots: list[int], num_nodes: int, num_groups: int) -> list[list[int]]:
    """One layer: the experts on each worker (workers node by node)."""
    size, per_node = len(loads) // num_groups, len(slots) // num_nodes
    group_loads = loads.reshape(num_groups, size).sum(axis=1)
    groups = Packing([num_groups // num_nodes] * num_nodes, group_loads)
    groups.place(items(np.ones(num_groups, dtype=np.int64), group_loads), range(num_nodes))
    on: list[list[int]] = []
    for n in range(num_nodes):
        mine = np.array(sorted(e for g, ns in groups.where.items() if ns == [n]
                               for e in range(g * size, (g + 1) * size)))
        local = _node_layer(loads[mine], slots[n * per_node:(n + 1) * per_node])
        on += [[int(mine[e]) for e in worker] for worker in local]
    return on


def rebalance_experts(*, loads: np.ndarray, extra_per_layer: int, num_workers: int, num_nodes: int = 1,
                      num_groups: int | None = None) -> EplbMaps:
    """Static EPLB: copies and slots for every layer from an expert-load profile.

    loads [L, E]: tokens per expert (a profile); extra_per_layer: copies beyond one per expert
    in each layer (P = E + extra_per_layer slots per layer); num_workers: W; num_nodes: nodes
    of W / num_nodes workers each (> 1: hierarchical, groups to nodes first); num_groups:
    expert groups (default num_nodes; must divide E and be a multiple of num_nodes).
    Returns EplbMaps (shapes in the module docstring).
    """
    loads = np.asarray(loads, dtype=float)
    num_layers, num_experts = loads.shape
    num_groups = num_groups or num_nodes
    _check(num_experts, extra_per_layer, num_workers, num_nodes, num_groups)
    per_node = num_workers // num_nodes
    slots = [s for node in _shares(num_experts + extra_per_layer, num_nodes) for s in _shares(node, per_node)]
    slot_worker = np.repeat(np.arange(num_workers), slots)  # [P]
    phy2log = np.stack([np.concatenate([np.array(w, dtype=np.int64) for w in _layer(row, slots, num_nodes,
                                                                                     num_groups)])
                        for row in loads])  # [L, P]
    count = np.stack([np.bincount(row, minlength=num_experts) for row in phy2log])  # [L, E]
    log2phy = np.full((num_layers, num_experts, int(count.max())), -1, dtype=np.int64)
    for layer, row in enumerate(phy2log):
        rank = np.zeros(num_experts, dtype=np.int64)
        for p, e in enumerate(row):
            log2phy[layer, e, rank[e]] = p
            rank[e] += 1
    return EplbMaps(phy2log, log2phy, count, slot_worker, np.array(slots, dtype=np.int64))


def to_placement(maps: EplbMaps, moe_layers: list[int]) -> Placement:
    """The maps as our placement table: worker w holds (moe_layers[i], expert) for each of its slots."""
    workers: list[list[tuple[int, int]]] = [[] for _ in maps.worker_slots]
    for i, row in enumerate(maps.physical_to_logical):
        for p, e in enumerate(row):
            workers[maps.slot_worker[p]].append((moe_layers[i], int(e)))
    return Placement(tuple(tuple(sorted(w)) for w in workers))
