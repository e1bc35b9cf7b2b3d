"""Expert compute. Shapes: N rows, D hidden, I expert intermediate, E experts.

`ExpertExecutor` is the seam between the MoE layer and where experts live:
the in-process `LocalExperts` below, or remote expert workers (deployments/).
"""
from __future__ import annotations

import threading
from typing import Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from cluster.model.weights import MLPWeights


def swiglu(x: Tensor, w: MLPWeights) -> Tensor:
    """The gated MLP of every expert kind: a pure function of (weights, rows)."""
    gate_up = F.linear(x, w.gate_up, w.gate_up_bias)  # [N, 2I]
    gate, up = gate_up.chunk(2, dim=-1)  # [N, I] each
    return F.linear(w.activation(gate, up), w.down, w.down_bias)  # [N, D]


class PendingRows(Protocol):
    def result(self) -> Tensor:
        """The outputs [N, D] of the rows submitted, in their order (waits for them if needed)."""


class ExpertExecutor(Protocol):
    def begin_step(self) -> None:
        """A forward pass starts: the one point where a remote executor may switch placement tables."""

    def submit(self, layer: int, rows: Tensor, counts: Sequence[int]) -> PendingRows:
        """Start computing rows [N, D] sorted by expert_id (counts[e] rows for expert e); returns at once
        when the experts are remote, so the caller can do other work before `result()`."""

    def run(self, layer: int, rows: Tensor, counts: Sequence[int]) -> Tensor:
        """submit(...).result(): outputs [N, D], same order."""


class Done:
    """Rows already computed (in-process experts)."""

    def __init__(self, out: Tensor):
        self.out = out

    def result(self) -> Tensor:
        return self.out


class LocalExperts:
    """Experts in this process: one matmul chain per expert that received rows.

    `add` and `remove` replace the whole dict (copy-on-write, under a lock so two
    concurrent changes cannot lose one another): a call in flight keeps the dict it
    started with, so copies can come and go while traffic flows.
    """

    def __init__(self, experts: dict[tuple[int, int], MLPWeights]):
        self.experts = experts
        self._lock = threading.Lock()

    def add(self, experts: dict[tuple[int, int], MLPWeights]) -> None:
        with self._lock:
            self.experts = {**self.experts, **experts}

    def remove(self, experts: list[tuple[int, int]]) -> None:
        gone = set(experts)
        with self._lock:
            self.experts = {k: v for k, v in self.experts.items() if k not in gone}

    def begin_step(self) -> None:
        pass

    def holds(self, layer: int, expert_id: int) -> bool:
        return (layer, expert_id) in self.experts

    def held(self) -> list[tuple[int, int]]:
        return sorted(self.experts)

    def submit(self, layer: int, rows: Tensor, counts: Sequence[int]) -> Done:
        return Done(self.run(layer, rows, counts))

    def run(self, layer: int, rows: Tensor, counts: Sequence[int]) -> Tensor:
        return self.run_subset(layer, rows, range(len(counts)), counts)

    def run_subset(self, layer: int, rows: Tensor, expert_ids: Sequence[int], counts: Sequence[int]) -> Tensor:
        """rows grouped by expert: the first counts[0] rows go to expert_ids[0], and so on.
        Rows arrive in the caller's dtype and are computed in the experts' (they may differ)."""
        experts, out = self.experts, torch.empty_like(rows)
        start = 0
        for expert_id, n in zip(expert_ids, counts):
            if n:
                w = experts[(layer, expert_id)]
                out[start:start + n] = swiglu(rows[start:start + n].to(w.down.dtype), w).to(rows.dtype)
                start += n
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
        token, slot = torch.where(ids == expert_id)
        if len(token):
            y = swiglu(x[token], experts[(layer, expert_id)])
            out[token] += weights[token, slot, None].to(x.dtype) * y
    return out
