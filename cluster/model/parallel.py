"""Gemma 4's decoder layer: a dense MLP and the routed experts side by side, each with its own norms.

Shapes: T rows, D hidden.

    x = x + post_attn_norm(attention(attn_norm(x)))
    dense = dense_out_norm(mlp(mlp_norm(x)))                       the router process's own MLP
    moe = moe_out_norm(experts(moe_in_norm(x)))                    route → dispatch → experts → combine,
                                                                   the gate scoring rms(x) * scale / sqrt(D)
    x = (x + post_mlp_norm(dense + moe)) * layer_scalar

Sliding and full layers differ in head size and rope, so each layer looks up its own rotary table.
The dense MLP runs while the experts' rows are away (as a shared expert does), so the two-micro-batch
overlap (overlap.py) applies unchanged.
"""
from __future__ import annotations

import torch

from cluster.model.deltanet import TORCH_RULE, DeltaRule
from cluster.model.kv_cache import KVCache
from cluster.model.layers import rms_norm, swiglu
from cluster.model.moe import moe_begin
from cluster.model.overlap import MicroBatch
from cluster.model.rope import Rotary
from cluster.model.transformer import MoETransformer
from cluster.model.weights import LayerWeights


class ParallelDenseTransformer(MoETransformer):
    def __init__(self, cfg, weights, experts, max_len: int, device: str = "cpu", overlap: bool | None = None,
                 paged_attention=None, delta_rule: DeltaRule = TORCH_RULE):
        super().__init__(cfg, weights, experts, max_len, device, overlap, paged_attention, delta_rule)
        self.rotaries = {cfg.rope: self.rotary}  # one table per distinct rope (Gemma 4: sliding, full)
        self.rotaries.update({rope: Rotary(rope, max_len, device) for rope in set(cfg.layer_ropes) - {cfg.rope}})
        # transformers casts the embedding scale sqrt(hidden) to the weights' dtype first (bf16: 53.07 -> 53.0)
        self.embedding_multiplier = torch.tensor(cfg.embedding_multiplier).to(weights.embed.dtype).item()

    def _layer(self, part: MicroBatch, layer: int, w: LayerWeights, cache: KVCache) -> None:
        cfg, p = self.cfg, w.parallel
        self._finish_moe(part)
        rope = self.rotaries[cfg.rope_of(layer)].at(part.batch.positions, part.batch.chunks)
        h = self._attend(self._norm(part.x, w.attn_norm, None), w.attn, cfg, layer, part.batch, cache, rope)
        part.x = part.x + self._norm(h, p.post_attn_norm, None)
        scored = rms_norm(part.x, None, cfg.rms_norm_eps) * p.router_scale * cfg.hidden_size ** -0.5  # [T, D]
        part.in_flight = moe_begin(self._norm(part.x, p.moe_in_norm, None), w, layer, cfg.gating, self.experts,
                                   cfg.gate_fp32, gate_input=scored)

    def _finish_moe(self, part: MicroBatch) -> None:
        flight = part.in_flight
        if flight is None:
            return
        part.in_flight = None
        w, p = flight.w, flight.w.parallel
        dense = self._norm(swiglu(self._norm(part.x, w.mlp_norm, None), w.dense), p.dense_out_norm, None)
        routed, routing = flight.finish()  # [T, D]
        part.routing.append(routing)
        out = self._norm(dense + self._norm(routed, p.moe_out_norm, None), p.post_mlp_norm, None)
        part.x = (part.x + out) * p.layer_scalar
