"""Dispatch and combine: group a batch's (token, top-k position) pairs by expert, and back.

Shapes: T tokens, K top-k, N = T*K routed rows, E experts, R row width (ModelConfig.expert_row_size).
Dispatch is pure bookkeeping; the rows are sent to whoever computes the
experts (in-process here, expert workers over the network in deployments/).
Nothing here reads a value back to the host: a GPU step runs without a sync
until the experts need one (remote experts do, to build their requests).
"""
from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Sequence

import torch
from torch import Tensor


class Counts(Sequence[int]):
    """Rows per expert_id [E], left on the device that computed them.

    In-process experts use `.tensor` (no host sync); a host reader (remote experts
    building requests, copy choice) gets ints, read back once at its first read.
    """

    def __init__(self, tensor: Tensor):
        self.tensor = tensor  # [E] int64
        self._host: tuple[int, ...] | None = None

    def host(self) -> tuple[int, ...]:
        if self._host is None:
            self._host = tuple(self.tensor.tolist())
        return self._host

    def __len__(self) -> int:
        return self.tensor.shape[0]

    def __getitem__(self, i):
        return self.host()[i]

    def __iter__(self):
        return iter(self.host())

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and tuple(self) == tuple(other)

    def __repr__(self) -> str:
        return f"Counts({list(self)})"


@dataclass(frozen=True)
class DispatchPlan:
    order: Tensor  # [N] flat (token, k) index of each routed row, rows sorted by expert_id
    token_index: Tensor  # [N] token each routed row comes from
    counts: Counts  # [E] rows per expert_id, in expert order
    num_tokens: int


def dispatch(ids: Tensor, num_experts: int) -> DispatchPlan:
    """Sort the flattened [T, K] expert ids so each expert's rows are contiguous."""
    top_k = ids.shape[1] if ids.dim() == 2 else 1
    flat = ids.reshape(-1)  # [N]
    order = torch.argsort(flat, stable=True)  # [N]
    # index_add_ rather than bincount: bincount sizes its output from the largest id (a host sync on CUDA)
    counts = torch.zeros(num_experts, dtype=torch.long, device=ids.device).index_add_(
        0, flat, torch.ones_like(flat))  # [E]
    return DispatchPlan(order, order // top_k, Counts(counts), ids.shape[0])


def gather_rows(x: Tensor, plan: DispatchPlan) -> Tensor:
    return x.index_select(0, plan.token_index)  # [T, R] → [N, R]


def combine(expert_out: Tensor, plan: DispatchPlan, weights: Tensor) -> Tensor:
    """Weighted sum of each token's expert outputs: [N, R] sorted rows → [T, R].

    Each token's K rows are gathered back into (token, k) order and summed in fp32, in that fixed
    order: an index_add_ into [T, R] is an atomicAdd on CUDA, in no fixed order, and in bf16 the
    order changes the result (greedy tokens then differ run to run on near-ties)."""
    n, d = expert_out.shape
    inverse = torch.empty_like(plan.order).scatter_(0, plan.order, torch.arange(n, device=plan.order.device))  # [N]
    w = weights.reshape(plan.num_tokens, n // max(plan.num_tokens, 1), 1).float()  # [T, K, 1]
    rows = expert_out.index_select(0, inverse).view(plan.num_tokens, w.shape[1], d)  # [T, K, R]
    return (rows.float() * w).sum(1).to(expert_out.dtype)  # [T, R]
