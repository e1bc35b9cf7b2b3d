"""The MoE block as four named steps: route → dispatch → expert compute → combine.

Shapes: T tokens, K top-k, N = T*K rows, D hidden, E experts.
`moe_begin` runs up to sending the rows to the experts and returns at once when
they are remote; `MoEInFlight.finish` computes the shared expert meanwhile, then
waits and combines. Between the two the caller may run other work: the other
micro-batch's attention (overlap.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from cluster.model.dispatch import DispatchPlan, combine, dispatch, gather_rows
from cluster.model.experts import ExpertExecutor, PendingRows
from cluster.model.gating import Gating, route
from cluster.model.layers import swiglu
from cluster.model.weights import LayerWeights


@dataclass(frozen=True)
class Routing:
    """What the router chose for one layer: kept for routing you can see."""

    layer: int
    ids: Tensor  # [T, K]
    weights: Tensor  # [T, K]


@dataclass(frozen=True)
class MoEInFlight:
    """A MoE block whose routed rows are with the experts."""

    x: Tensor  # [T, D] the block's input (for the shared expert)
    w: LayerWeights
    plan: DispatchPlan
    routing: Routing
    pending: PendingRows
    inputs_scaled: bool = False  # the weights already scaled the rows sent (Llama 4): sum the outputs as they are

    def finish(self) -> tuple[Tensor, Routing]:
        w = self.w
        shared = None
        if w.shared is not None:  # before waiting: it overlaps the routed experts when they are remote
            shared = swiglu(self.x, w.shared)  # [T, D]
            if w.shared_expert_gate is not None:
                shared = torch.sigmoid(F.linear(self.x, w.shared_expert_gate)) * shared
        weights = torch.ones_like(self.routing.weights) if self.inputs_scaled else self.routing.weights
        out = combine(self.pending.result(), self.plan, weights)  # [T, R]
        if w.latent_out is not None:
            out = F.linear(out, w.latent_out)  # [T, D]
        return (out if shared is None else out + shared), self.routing


def moe_begin(x: Tensor, w: LayerWeights, layer: int, gating: Gating, experts: ExpertExecutor,
              gate_fp32: bool = False, scale_inputs: bool = False, token_ids: Tensor | None = None,
              gate_input: Tensor | None = None) -> MoEInFlight:
    """scale_inputs (Llama 4): each routed row is multiplied by its weight before the expert, not after.
    token_ids [T]: the rows' tokens, which pick the experts on a hash-routed layer (w.hash_table).
    gate_input [T, D]: what the gate scores when it is not the experts' input x (Gemma 4)."""
    g = x if gate_input is None else gate_input
    logits = F.linear(g.float() if gate_fp32 else g, w.gate, w.gate_logits_bias)  # [T, E]
    fixed = w.hash_table[token_ids] if w.hash_table is not None else None  # [T, K]
    weights, ids = route(logits, gating, w.gate_bias, fixed)  # [T, K]
    if w.expert_scale is not None:  # Gemma 4: after the renormalisation, as transformers applies it
        weights = weights * w.expert_scale.float()[ids]
    plan = dispatch(ids, w.gate.shape[0])
    # projected per token, then gathered: K times fewer rows through the projection than after the gather
    narrow = x if w.latent_in is None else F.linear(x, w.latent_in)  # [T, R]
    rows = gather_rows(narrow, plan)  # [N, R]
    if scale_inputs:
        rows = rows * weights.reshape(-1).index_select(0, plan.order)[:, None].to(rows.dtype)
    pending = experts.submit(layer, rows, plan.counts)  # [N, R] once done
    return MoEInFlight(x, w, plan, Routing(layer, ids, weights), pending, scale_inputs)


def moe_block(x: Tensor, w: LayerWeights, layer: int, gating: Gating, experts: ExpertExecutor,
              gate_fp32: bool = False) -> tuple[Tensor, Routing]:
    return moe_begin(x, w, layer, gating, experts, gate_fp32).finish()
