"""Gating: router logits → top-k expert ids and weights. Pure functions, fp32.

Shapes: T tokens, E experts, K top-k.
"""
from __future__ import annotations

import torch
from torch import Tensor


def route(logits: Tensor, top_k: int, normalize: bool) -> tuple[Tensor, Tensor]:
    """softmax → top-k → optional renormalisation; returns (weights [T, K] fp32, ids [T, K] int64).

    NaN logits are treated as the lowest score, so a NaN never wins a slot
    while a real score is left; a row of all NaN gets uniform weights. Ids are
    always in [0, E) and distinct per token (topk picks distinct positions).
    """
    logits = logits.float()
    logits = torch.where(torch.isnan(logits), torch.finfo(torch.float32).min, logits)  # [T, E]
    probs = torch.softmax(logits, dim=-1)  # [T, E]
    weights, ids = torch.topk(probs, top_k, dim=-1)  # [T, K]
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids
