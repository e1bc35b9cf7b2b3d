"""Room for expert copies on each worker: slots, memory budget, per-layer limit. Pure, no Ray.

Shapes: L MoE layers, E experts per layer, W workers.
A worker's room, all MoE layers together, is the least of its limits:

| limit          | copies it allows                         |
|----------------|------------------------------------------|
| `slots`        | `slots`                                  |
| `budget_bytes` | `budget_bytes // expert_bytes`           |
| `layer_slots`  | `layer_slots × L` (and per layer: `layer_slots`) |

A worker with no limit has unlimited room; a `retired` worker, or one with a limit
of 0, holds nothing and does not count. Layers are planned one at a time: before a
layer is planned, every layer not yet planned keeps its share of the copies it
must have (`floor` per expert: the planner's min_copies, as far as the room holds
them), so the room a layer may use never starves a later one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

UNLIMITED = 1 << 40  # stands for "no limit" in integer arithmetic


@dataclass(frozen=True)
class Worker:
    node: str = "node-0"
    # Most copies of one layer's experts this worker may hold; None = no per-layer limit.
    layer_slots: int | None = None
    # Most copies this worker may hold, all layers together (its slot capacity); None = no limit.
    slots: int | None = None
    # Most bytes of expert copies at the serving dtype (plan's `expert_bytes` per copy); None = no limit.
    budget_bytes: int | None = None
    # A pool worker that left: no room at all, whatever its limits.
    retired: bool = False


def _limits(worker: Worker, num_layers: int, expert_bytes: int) -> dict[str, int]:
    out = {}
    if worker.slots is not None:
        out["slots"] = worker.slots
    if worker.budget_bytes is not None:
        if expert_bytes <= 0:
            raise ValueError("a worker has budget_bytes but expert_bytes (bytes of one copy) is not given")
        out["budget_bytes"] = worker.budget_bytes // expert_bytes
    if worker.layer_slots is not None:
        out["layer_slots"] = worker.layer_slots * num_layers
    return out


def _spread(total: int, per_layer: int, filled: np.ndarray) -> np.ndarray:
    """`total` copies over the layers, at most `per_layer` each, as evenly as possible, the odd ones
    to the layers least filled so far. Returns [L]."""
    share = np.full(len(filled), total // len(filled), dtype=np.int64)
    share[np.argsort(filled, kind="stable")[: total % len(filled)]] += 1
    return np.minimum(share, per_layer)


class LayerRoom:
    """Hands each worker's room to the layers, one layer at a time (`caps`, then `commit`)."""

    def __init__(self, workers: list[Worker], *, num_layers: int, num_experts: int, expert_bytes: int = 0,
                 held: np.ndarray | None = None, min_copies: int = 1):
        """held [W, L] (optional): copies each worker holds now per layer; when they fit the limits and
        give every layer its floor, each layer keeps that room (so the current placement stays
        possible), else an even share. min_copies: copies of every expert wanted (see `floor`)."""
        limits = [_limits(w, num_layers, expert_bytes) for w in workers]
        self.room = np.array([min(x.values()) if x else UNLIMITED for x in limits], dtype=np.int64)  # [W]
        self.per_layer = np.array([UNLIMITED if w.layer_slots is None else w.layer_slots for w in workers],
                                  dtype=np.int64)  # [W]
        self.limited = self.room < UNLIMITED  # [W]
        self.active = [w for w in range(len(workers))
                       if not workers[w].retired and self.room[w] > 0 and self.per_layer[w] > 0]
        self.retired = np.ones(len(workers), dtype=bool)  # [W] holds nothing, does not count
        self.retired[self.active] = False
        _check(limits, self.room, self.limited, num_layers, num_experts, self.active)
        self.floor = self._floor(min_copies, num_layers, num_experts)
        self.base = self._even(num_layers, num_experts) if held is None or not self._holds(held, num_experts) else \
            np.where(self.limited[:, None], held, 0)  # [W, L] copies kept for each layer
        self.left = self.room.copy()  # [W] room not yet used by planned layers
        self.pending = self.base.sum(axis=1)  # [W] room kept for the layers not planned yet

    def _floor(self, min_copies: int, num_layers: int, num_experts: int) -> int:
        """Copies of every expert that every layer can have at once: min_copies, fewer when the active
        workers are fewer or their room, all layers together, holds fewer."""
        floor = max(1, min(min_copies, len(self.active)))
        if self.limited[self.active].all():
            room = int(np.minimum(self.room, self.per_layer * num_layers)[self.active].sum())
            floor = max(1, min(floor, room // (num_layers * num_experts)))
        return floor

    def _even(self, num_layers: int, num_experts: int) -> np.ndarray:
        """[W, L] the copies every layer must have (`floor` per expert), spread over the limited workers
        in proportion to their room and evenly over the layers; none when some worker has no limit."""
        base = np.zeros((len(self.room), num_layers), dtype=np.int64)
        limited = [w for w in self.active if self.limited[w]]
        if len(limited) < len(self.active):
            return base
        room = np.minimum(self.room[limited], self.per_layer[limited] * num_layers)
        need = num_layers * num_experts * self.floor
        share = room * need // room.sum()
        for i in np.argsort(share - room, kind="stable")[: need - int(share.sum())]:
            share[i] += 1  # the rest, one each, to the workers with the most room left
        filled = np.zeros(num_layers, dtype=np.int64)
        for w, total in zip(limited, share):
            base[w] = _spread(int(total), int(self.per_layer[w]), filled)
            filled += base[w]
        return base

    def _holds(self, held: np.ndarray, num_experts: int) -> bool:
        """Do these per-layer counts fit every limit, with room for every expert in every layer?"""
        return bool((held.sum(axis=1) <= self.room).all() and (held <= self.per_layer[:, None]).all()
                    and not held[self.retired].any() and (held.sum(axis=0) >= num_experts * self.floor).all())

    def caps(self, layer: int, copies: int | None = None) -> np.ndarray:
        """[W] most copies of layer `layer` (an index into the loads) each worker may take.
        Workers with no limit get an even share of the layer's `copies` (memory stays balanced);
        with `copies=None`, they get no limit."""
        cap = np.minimum(self.per_layer, self.left - (self.pending - self.base[:, layer]))
        cap[~self.limited] = UNLIMITED
        if copies is not None and (~self.limited[self.active]).any():
            free = [w for w in self.active if not self.limited[w]]
            rest = copies - int(cap[[w for w in self.active if self.limited[w]]].sum())
            share = max(math.ceil(max(rest, 0) / len(free)), math.ceil(copies / len(self.active)))
            cap[free] = share
        cap[self.retired] = 0
        return cap

    def commit(self, layer: int, counts: np.ndarray) -> None:
        """Layer `layer` is planned with counts[w] copies on worker w."""
        self.left -= np.where(self.limited, counts, 0)
        self.pending -= self.base[:, layer]


def _check(limits: list[dict[str, int]], room: np.ndarray, limited: np.ndarray, num_layers: int,
           num_experts: int, active: list[int]) -> None:
    """Raise, naming the limit, when not even one copy per expert fits."""
    if not active:
        raise ValueError("no worker may hold expert copies (no workers, or each is retired or has a limit of 0)")
    if not limited[active].all():
        return
    total = int(room[active].sum())
    if total >= num_layers * num_experts:
        return
    names = sorted({min(limits[w], key=limits[w].get) for w in active})
    if names == ["layer_slots"]:
        raise ValueError(f"the workers hold at most {total // num_layers} expert copies per layer (layer_slots) "
                         f"but each layer has {num_experts} experts")
    low, high = int(room[active].min()), int(room[active].max())
    each = f"{low}" if low == high else f"{low}-{high}"
    raise ValueError(f"the workers hold at most {total} expert copies ({' / '.join(names)}: {each} per worker) "
                     f"but {num_layers} MoE layer(s) x {num_experts} experts need {num_layers * num_experts}; "
                     f"raise the limit or add workers")
