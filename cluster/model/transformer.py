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
from cluster.model.batch import Batch
from cluster.model.experts import ExpertExecutor, swiglu
from cluster.model.kv_cache import KVCache
from cluster.model.layers import norm
from cluster.model.mla import mla_attention
from cluster.model.moe import Routing, moe_block
from cluster.model.rope import Rotary
from cluster.model.weights import BackboneWeights


class MoETransformer:
    def __init__(self, cfg: ModelConfig, weights: BackboneWeights, experts: ExpertExecutor,
                 max_len: int, device: str = "cpu"):
        self.cfg, self.weights, self.experts = cfg, weights, experts
        self.rotary = Rotary(cfg.rope, max_len, device)

    def _norm(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return norm(x, weight, bias, self.cfg.rms_norm_eps, self.cfg.norm)

    @torch.inference_mode()
    def forward(self, batch: Batch, cache: KVCache, rows: Tensor | None = None) -> tuple[Tensor, list[Routing]]:
        """Run the batch's new tokens; return the logits of `rows` (default: each chunk's last token,
        [B, V]) and the routing."""
        cfg, scale = self.cfg, self.cfg.residual_multiplier
        self.experts.begin_step()
        x = self.weights.embed[batch.token_ids]  # [T, D]
        if cfg.embedding_multiplier != 1.0:
            x = x * cfg.embedding_multiplier
        routing, rope = [], self.rotary.at(batch.positions, batch.chunks)
        attend = mla_attention if cfg.attention == "mla" else attention
        for layer, w in enumerate(self.weights.layers):
            h = attend(self._norm(x, w.attn_norm, w.attn_norm_bias), w.attn, cfg, layer, batch, cache, rope)
            x = x + (h * scale if scale != 1.0 else h)
            h = self._norm(x, w.mlp_norm, w.mlp_norm_bias)
            if w.gate is None:
                h = swiglu(h, w.dense)
            else:
                h, r = moe_block(h, w, layer, cfg.gating, self.experts, cfg.gate_fp32)
                routing.append(r)
            x = x + (h * scale if scale != 1.0 else h)
        last = self._norm(x[batch.last_rows if rows is None else rows], self.weights.final_norm,
                          self.weights.final_norm_bias)  # [B, D]
        logits = F.linear(last, self.weights.lm_head, self.weights.lm_head_bias).float()  # [B, V]
        return (logits / cfg.logits_scaling if cfg.logits_scaling != 1.0 else logits), routing
