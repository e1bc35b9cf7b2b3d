"""Gating: gate logits → top-k expert ids and weights. Pure functions, fp32.

Shapes: T tokens, E experts, K top-k, G expert groups.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Gating:
    """How a family turns gate logits into a choice (defaults: Mixtral/Qwen softmax top-k)."""

    top_k: int
    normalize: bool = True  # renormalise the chosen weights to sum to 1
    # "softmax" | "sigmoid" (DeepSeek-V3) | "topk_softmax" (softmax over the K best logits: gpt-oss,
    # Granite) | "topk_sigmoid" (sigmoid of the K best logits: Llama 4) | "sparsemixer" (Phi-3.5-MoE, top-2)
    # | "sqrtsoftplus" (sqrt(softplus(logit)): DeepSeek-V4)
    scoring: str = "softmax"
    n_group: int = 1  # group-limited routing: experts split into n_group groups ...
    topk_group: int = 1  # ... and only the best topk_group groups may be chosen from
    group_score: str = "max"  # a group's score: "max" (DeepSeek-V2) | "top2_sum" (DeepSeek-V3)
    scale: float = 1.0  # routed_scaling_factor, applied last
    jitter_eps: float = 0.0  # sparsemixer: how far below the best a logit may be and still share the weight


def _group_mask(scores: Tensor, g: Gating) -> Tensor:
    """[T, E] True where the expert's group is among the topk_group best groups."""
    grouped = scores.view(scores.shape[0], g.n_group, -1)  # [T, G, E/G]
    group = grouped.max(-1).values if g.group_score == "max" else grouped.topk(2, dim=-1).values.sum(-1)  # [T, G]
    best = torch.topk(group, g.topk_group, dim=-1).indices  # [T, topk_group]
    keep = torch.zeros_like(group, dtype=torch.bool).scatter_(1, best, True)  # [T, G]
    return keep[:, :, None].expand_as(grouped).reshape(scores.shape)  # [T, E]


def _sparsemixer_pick(scores: Tensor, masked: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """One sparsemixer pick (inference): the best of `masked`, weighted by a softmax over the
    logits within 2*eps (relative) of it."""
    best, idx = masked.max(dim=-1, keepdim=True)  # [T, 1]
    factor = scores.abs().clamp(min=best)
    far = ((best - scores) / factor) > (2 * eps)  # [T, E]
    gates = torch.softmax(masked.masked_fill(far, float("-inf")), dim=-1)
    return gates.gather(-1, idx), idx


def sparsemixer(logits: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Phi-3.5-MoE's top-2 routing (transformers' `sparsemixer`, inference branch)."""
    w1, i1 = _sparsemixer_pick(logits, logits, eps)
    w2, i2 = _sparsemixer_pick(logits, logits.scatter(-1, i1, float("-inf")), eps)
    return torch.cat([w1, w2], dim=-1), torch.cat([i1, i2], dim=-1)  # [T, 2]


def _scores(logits: Tensor, scoring: str) -> Tensor:
    if scoring == "sigmoid":
        return torch.sigmoid(logits)
    if scoring == "sqrtsoftplus":
        return torch.nn.functional.softplus(logits).sqrt()
    return torch.softmax(logits, dim=-1)


def route(logits: Tensor, g: Gating, bias: Tensor | None = None,
          fixed_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """scores → (group limit) → top-k → optional renormalisation → scale.

    Returns (weights [T, K] fp32, ids [T, K] int64). `bias` (DeepSeek-V3's
    e_score_correction_bias, [E]) shifts which experts are chosen but not their
    weights. NaN logits are treated as the lowest score, so a NaN never wins a
    top-k position while a real score is left; ids are always in [0, E) and distinct per
    token (topk picks distinct positions). `fixed_ids` [T, K] (DeepSeek-V4's hash layers: a fixed
    token id -> experts table) are the choice itself; the scores still weigh them.
    """
    logits = logits.float()
    logits = torch.where(torch.isnan(logits), torch.finfo(torch.float32).min, logits)  # [T, E]
    if g.scoring == "sparsemixer":
        weights, ids = sparsemixer(logits, g.jitter_eps)
        return weights * g.scale, ids
    if g.scoring in ("topk_softmax", "topk_sigmoid"):
        best, ids = torch.topk(logits, g.top_k, dim=-1)  # [T, K]
        weights = torch.softmax(best, dim=-1) if g.scoring == "topk_softmax" else torch.sigmoid(best)
        return weights * g.scale, ids
    scores = _scores(logits, g.scoring)  # [T, E]
    if fixed_ids is not None:
        ids = fixed_ids.long()
    else:
        choice = scores if bias is None else scores + bias.float()
        if g.n_group > 1:
            choice = choice.masked_fill(~_group_mask(choice, g), float("-inf"))
        ids = torch.topk(choice, g.top_k, dim=-1).indices  # [T, K]
    weights = scores.gather(1, ids)  # [T, K]
    if g.normalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * g.scale, ids
