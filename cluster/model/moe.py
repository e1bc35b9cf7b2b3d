"""The MoE block as four named steps: route → dispatch → expert compute → combine.

Shapes: T tokens, K top-k, N = T*K rows, D hidden, E experts.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from cluster.model.dispatch import combine, dispatch, gather_rows
from cluster.model.experts import ExpertExecutor, swiglu
from cluster.model.gating import Gating, route
from cluster.model.weights import LayerWeights


@dataclass(frozen=True)
class Routing:
    """What the router chose for one layer: kept for routing you can see."""

    layer: int
    ids: Tensor  # [T, K]
    weights: Tensor  # [T, K]


def moe_block(x: Tensor, w: LayerWeights, layer: int, gating: Gating, experts: ExpertExecutor,
              gate_fp32: bool = False) -> tuple[Tensor, Routing]:
    logits = F.linear(x.float() if gate_fp32 else x, w.gate, w.gate_logits_bias)  # [T, E]
    weights, ids = route(logits, gating, w.gate_bias)  # [T, K]
    plan = dispatch(ids, w.gate.shape[0])
    rows = experts.run(layer, gather_rows(x, plan), plan.counts)  # [N, D]
    out = combine(rows, plan, weights)  # [T, D]
    if w.shared is not None:
        shared = swiglu(x, w.shared)  # [T, D]
        if w.shared_expert_gate is not None:
            shared = torch.sigmoid(F.linear(x, w.shared_expert_gate)) * shared
        out = out + shared
    return out, Routing(layer, ids, weights)
