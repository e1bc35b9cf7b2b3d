"""The MoE decoder: backbone (embeddings, attention, norms, LM head) plus MoE blocks.

Shapes: T rows of the ragged batch, B sequences, D hidden, V vocab.
The model knows nothing of Ray: where experts run is the ExpertExecutor's business.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from cluster.config import ModelConfig
from cluster.model.attention import attention
from cluster.model.mla import mla_attention
from cluster.model.batch import Batch
from cluster.model.experts import ExpertExecutor, swiglu
from cluster.model.kv_cache import KVCache
from cluster.model.layers import Rotary, rms_norm
from cluster.model.moe import Routing, moe_block
from cluster.model.weights import BackboneWeights


class MoETransformer:
    def __init__(self, cfg: ModelConfig, weights: BackboneWeights, experts: ExpertExecutor,
                 max_len: int, device: str = "cpu"):
        self.cfg, self.weights, self.experts = cfg, weights, experts
        self.rotary = Rotary(cfg.head_dim, cfg.rope_theta, max_len, device)

    @torch.inference_mode()
    def forward(self, batch: Batch, cache: KVCache, rows: Tensor | None = None) -> tuple[Tensor, list[Routing]]:
        """Run the batch's new tokens; return the logits of `rows` (default: each chunk's last token,
        [B, V]) and the routing."""
        cfg, eps = self.cfg, self.cfg.rms_norm_eps
        self.experts.begin_step()
        x = self.weights.embed[batch.token_ids]  # [T, D]
        routing, rope = [], self.rotary.at(batch.positions)
        attend = mla_attention if cfg.attention == "mla" else attention
        for layer, w in enumerate(self.weights.layers):
            x = x + attend(rms_norm(x, w.attn_norm, eps), w.attn, cfg, layer, batch, cache, rope)
            h = rms_norm(x, w.mlp_norm, eps)
            if w.router is None:
                x = x + swiglu(h, w.dense)
                continue
            out, r = moe_block(h, w, layer, cfg.gating, self.experts)
            x = x + out
            routing.append(r)
        last = rms_norm(x[batch.last_rows if rows is None else rows], self.weights.final_norm, eps)  # [B, D]
        return F.linear(last, self.weights.lm_head).float(), routing  # [B, V]
