"""Dispatch and combine: group a batch's (token, slot) pairs by expert, and back.

Shapes: T tokens, K top-k, N = T*K routed rows, E experts, D hidden.
Dispatch is pure bookkeeping; the rows are sent to whoever computes the
experts (in-process here, expert workers over the network in deployments/).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class DispatchPlan:
    order: Tensor  # [N] flat (token, k) index of each routed row, rows sorted by expert_id
    token_index: Tensor  # [N] token each routed row comes from
    counts: tuple[int, ...]  # [E] rows per expert_id, in expert order
    num_tokens: int


def dispatch(ids: Tensor, num_experts: int) -> DispatchPlan:
    """Sort the flattened [T, K] expert ids so each expert's rows are contiguous."""
    top_k = ids.shape[1] if ids.dim() == 2 else 1
    flat = ids.reshape(-1)  # [N]
    order = torch.argsort(flat, stable=True)  # [N]
    counts = torch.bincount(flat, minlength=num_experts)  # [E]
    return DispatchPlan(order, order // top_k, tuple(counts.tolist()), ids.shape[0])


def gather_rows(hidden: Tensor, plan: DispatchPlan) -> Tensor:
    return hidden.index_select(0, plan.token_index)  # [N, D]


def combine(expert_out: Tensor, plan: DispatchPlan, weights: Tensor) -> Tensor:
    """Weighted sum of each token's expert outputs: [N, D] sorted rows → [T, D]."""
    w = weights.reshape(-1).index_select(0, plan.order).to(expert_out.dtype)  # [N]
    out = torch.zeros(plan.num_tokens, expert_out.shape[-1], dtype=expert_out.dtype, device=expert_out.device)
    return out.index_add_(0, plan.token_index, expert_out * w[:, None])  # [T, D]
