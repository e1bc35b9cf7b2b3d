"""Expert compute. Shapes: N rows, R row width (ModelConfig.expert_row_size: the hidden size, or Nemotron 3
Super's latent size), I expert intermediate, E experts.

`ExpertExecutor` is the seam between the MoE layer and where experts live:
the in-process `LocalExperts` below, or remote expert workers (deployments/).
The model passes counts as a `Counts` (dispatch.py): a Sequence[int] whose values
stay on the device; in-process experts never read them back, remote ones read them
once per layer (they need them on the host to build their requests).
With `overlap` the model pipelines two micro-batches through the layers (transformer.py;
auto: remote experts on a GPU router): in-process experts compute inside `submit`, so
with them there is nothing to overlap.
"""
from __future__ import annotations

import threading
from typing import Callable, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from cluster.model.dispatch import Counts
from cluster.model.grouped import ExpertStack, run_stack, stack_layer
from cluster.model.layers import swiglu
from cluster.model.weights import MLPWeights


class PendingRows(Protocol):
    def result(self) -> Tensor:
        """The outputs [N, R] of the rows submitted, in their order (waits for them if needed)."""


class ExpertExecutor(Protocol):
    def begin_step(self) -> None:
        """A forward pass starts: the one point where a remote executor may switch placement tables."""

    def submit(self, layer: int, rows: Tensor, counts: Sequence[int]) -> PendingRows:
        """Start computing rows [N, R] sorted by expert_id (counts[e] rows for expert e); returns at once
        when the experts are remote, so the caller can do other work before `result()`."""

    def run(self, layer: int, rows: Tensor, counts: Sequence[int]) -> Tensor:
        """submit(...).result(): outputs [N, R], same order."""


class Done:
    """Rows already computed (in-process experts)."""

    def __init__(self, out: Tensor):
        self.out = out

    def result(self) -> Tensor:
        return self.out


class LocalExperts:
    """Experts in this process, stacked per layer (cluster/model/grouped.py): one grouped matmul per
    projection where torch has one for the device and dtype, else one matmul chain per expert.

    `add` and `remove` restack the layers they touch and replace the whole state (copy-on-write,
    under a lock so two concurrent changes cannot lose one another): a call in flight keeps the
    stacks it started with, so copies can come and go while traffic flows. `experts` maps
    (layer, expert_id) to views into the stacks: the weights are held once.
    """

    def __init__(self, experts: dict[tuple[int, int], MLPWeights]):
        self._lock = threading.Lock()
        self._state: tuple[dict[tuple[int, int], MLPWeights], dict[int, ExpertStack]] = ({}, {})
        self.version = 0  # counts restacks: CUDA graphs captured at an older one read freed stacks
        self._restack(experts, {layer for layer, _ in experts})

    @classmethod
    def stacked_by_layer(cls, pairs: Sequence[tuple[int, int]],
                         load: Callable[[list[tuple[int, int]]], dict[tuple[int, int], MLPWeights]]) -> "LocalExperts":
        """`load` one layer's (layer, expert_id) pairs at a time, stacking each before the next is read:
        loading peaks at the stacks plus one layer, not twice all experts (a GPU sized for them fits)."""
        held = cls({})
        for layer in sorted({layer for layer, _ in pairs}):
            held.add(load([p for p in pairs if p[0] == layer]))
        return held

    @property
    def experts(self) -> dict[tuple[int, int], MLPWeights]:
        return self._state[0]

    def _restack(self, experts: dict[tuple[int, int], MLPWeights], layers: set[int]) -> None:
        stacks = dict(self._state[1])
        for layer in layers:
            held = {e: w for (lay, e), w in experts.items() if lay == layer}
            stacks.pop(layer, None)
            if held:
                stacks[layer] = stack_layer(held)
        views = {(layer, e): st.weights(s) for layer, st in stacks.items() for s, e in enumerate(st.expert_ids)}
        self._state = (views, stacks)
        self.version += 1

    def add(self, experts: dict[tuple[int, int], MLPWeights]) -> None:
        with self._lock:
            self._restack({**self.experts, **experts}, {layer for layer, _ in experts})

    def remove(self, experts: list[tuple[int, int]]) -> None:
        gone = set(experts)
        with self._lock:
            self._restack({k: v for k, v in self.experts.items() if k not in gone}, {layer for layer, _ in gone})

    def begin_step(self) -> None:
        pass

    def holds(self, layer: int, expert_id: int) -> bool:
        return (layer, expert_id) in self.experts

    def held(self) -> list[tuple[int, int]]:
        return sorted(self.experts)

    @property
    def stacks(self) -> dict[int, ExpertStack]:
        """The layers' stacks; a new dict whenever `add` or `remove` restacks (copy-on-write)."""
        return self._state[1]

    @property
    def grouped(self) -> bool:
        """Every layer runs as grouped matmuls: no step of this executor reads counts on the host."""
        return self.loop_reason is None

    @property
    def loop_reason(self) -> str | None:
        """Why some layer runs the per-expert loop (cluster/model/grouped.py), or None."""
        return next((st.loop_reason for st in self._state[1].values() if st.loop_reason is not None), None)

    def submit(self, layer: int, rows: Tensor, counts: Sequence[int]) -> Done:
        return Done(self.run(layer, rows, counts))

    def run(self, layer: int, rows: Tensor, counts: Sequence[int]) -> Tensor:
        stack = self._state[1].get(layer)
        if stack is not None and stack.expert_ids == tuple(range(len(counts))):  # the whole layer: stack index = id
            return run_stack(rows, stack, counts.tensor if isinstance(counts, Counts) else counts)
        return self.run_subset(layer, rows, range(len(counts)), counts)

    def run_subset(self, layer: int, rows: Tensor, expert_ids: Sequence[int], counts: Sequence[int]) -> Tensor:
        """rows grouped by expert: the first counts[0] rows go to expert_ids[0], and so on.
        Rows arrive in the caller's dtype and are computed in the experts' (they may differ)."""
        stack = self._state[1].get(layer)
        groups, start = [], 0  # (stack index, first row, rows) of each expert with rows
        for expert_id, n in zip(expert_ids, counts):
            if n:
                if stack is None or expert_id not in stack.index:
                    raise KeyError((layer, expert_id))
                groups.append((stack.index[expert_id], start, n))
                start += n
        if not groups:
            return torch.empty_like(rows)
        per_index = [0] * len(stack.expert_ids)
        for s, _, n in groups:
            per_index[s] += n
        ordered = sorted(groups, key=lambda g: g[0])  # stable: an expert's rows keep their order
        if ordered == groups:
            return run_stack(rows, stack, per_index)
        perm = torch.cat([torch.arange(s0, s0 + n, device=rows.device) for _, s0, n in ordered])  # [N]
        out = torch.empty_like(rows)
        out[perm] = run_stack(rows.index_select(0, perm), stack, per_index)
        return out


def reference_moe(x: Tensor, gate: Tensor, experts: dict[tuple[int, int], MLPWeights], layer: int,
                  top_k: int, normalize: bool) -> Tensor:
    """The slow, obviously-correct MoE: loop over experts, mask the tokens that chose each.

    Kept in the tree as the reference every fast or distributed path is tested against.
    """
    probs = torch.softmax(F.linear(x, gate).float(), dim=-1)  # [T, E]
    weights, ids = torch.topk(probs, top_k, dim=-1)  # [T, K]
    if normalize:
        weights = weights / weights.sum(-1, keepdim=True)
    out = torch.zeros_like(x)
    for expert_id in range(gate.shape[0]):
        token, k = torch.where(ids == expert_id)  # k: the top-k position
        if len(token):
            y = swiglu(x[token], experts[(layer, expert_id)])
            out[token] += weights[token, k, None].to(x.dtype) * y
    return out
