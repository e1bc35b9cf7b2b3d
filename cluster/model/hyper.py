"""Hyper-connections (DeepSeek-V4's manifold-constrained mHC): the residual is n = hc_mult streams.

Shapes: T rows, n streams, D hidden.
Around each block (attention, MoE) the streams give, through one learned projection of their
RMS-normed concatenation: `pre` [T, n] (collapse the streams into the block's input), `post` [T, n]
(spread its output back) and `comb` [T, n, n] (mix the streams, made doubly stochastic by
Sinkhorn-Knopp). streams' = post ⊗ out + combᵀ · streams. Before the final norm a head collapses them.
The model is the MoE decoder with that residual (HyperConnectedTransformer); route → dispatch →
expert compute → combine is unchanged, and hash-routed layers choose by the rows' token ids.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from cluster.config import ModelConfig
from cluster.model.batch import Batch
from cluster.model.dsv4_attention import v4_attention
from cluster.model.kv_cache import KVCache
from cluster.model.moe import Routing, moe_begin
from cluster.model.parallel import ParallelDenseTransformer
from cluster.model.rope import Rotary
from cluster.model.transformer import MoETransformer
from cluster.model.weights import HyperWeights, LayerWeights


def _normed(streams: Tensor, eps: float) -> Tensor:
    flat = streams.reshape(streams.shape[0], -1).float()  # [T, n * D]
    return flat * torch.rsqrt(flat.square().mean(-1, keepdim=True) + eps)


def hyper_weights(streams: Tensor, w: HyperWeights, cfg: ModelConfig) -> tuple[Tensor, Tensor, Tensor]:
    """streams [T, n, D] → (post [T, n], comb [T, n, n], the block's input [T, D]), fp32 weights."""
    n, eps = cfg.hc_mult, cfg.hc_eps
    mixes = F.linear(_normed(streams, cfg.rms_norm_eps), w.fn.float())
    pre_w, post_w, comb_w = mixes.split([n, n, n * n], dim=-1)
    pre_b, post_b, comb_b = w.base.float().split([n, n, n * n])
    s_pre, s_post, s_comb = w.scale.float().unbind(0)
    pre = torch.sigmoid(pre_w * s_pre + pre_b) + eps
    post = 2 * torch.sigmoid(post_w * s_post + post_b)
    comb = torch.softmax(comb_w.view(-1, n, n) * s_comb + comb_b.view(n, n), dim=-1) + eps
    comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    for _ in range(cfg.hc_sinkhorn_iters - 1):  # Sinkhorn-Knopp: rows, then columns, sum to 1
        comb = comb / (comb.sum(dim=-1, keepdim=True) + eps)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    return post, comb, (pre[..., None] * streams).sum(dim=1).to(streams.dtype)


def hyper_residual(streams: Tensor, out: Tensor, post: Tensor, comb: Tensor) -> Tensor:
    """The block's output [T, D] spread over the streams plus the streams mixed: [T, n, D]."""
    dtype = streams.dtype
    return post.to(dtype)[..., None] * out[:, None, :] + comb.to(dtype).transpose(-1, -2) @ streams


def hyper_head(streams: Tensor, w: HyperWeights, cfg: ModelConfig) -> Tensor:
    """The final collapse [T, n, D] → [T, D] (w.fn [n, n * D], w.scale [1])."""
    mixes = F.linear(_normed(streams, cfg.rms_norm_eps), w.fn.float())
    pre = torch.sigmoid(mixes * w.scale.float() + w.base.float()) + cfg.hc_eps
    return (pre[..., None] * streams).sum(dim=1).to(streams.dtype)


class HyperConnectedTransformer(MoETransformer):
    """DeepSeek-V4's decoder. One micro-batch (no overlap): the streams are four times the rows."""

    def __init__(self, cfg: ModelConfig, weights, experts, max_len: int, device: str = "cpu",
                 overlap: bool | None = None, paged_attention=None, delta_rule=None):
        # V4's attention (window + compressed KV, one sequence at a time) is its own: no paged backend, and it
        # has no linear layers (delta_rule unused).
        super().__init__(cfg, weights, experts, max_len, device, overlap=False)
        self.ropes = (self.rotary, Rotary(cfg.compress_rope or cfg.rope, max_len, device))

    @torch.inference_mode()
    def forward(self, batch: Batch, cache: KVCache, rows: Tensor | None = None) -> tuple[Tensor, list[Routing]]:
        cfg = self.cfg
        self.experts.begin_step()
        x = self.weights.embed[batch.token_ids]  # [T, D]
        streams = x[:, None, :].expand(-1, cfg.hc_mult, -1).contiguous()  # [T, n, D]
        routing = []
        for layer, w in enumerate(self.weights.layers):
            streams = self._attention_block(streams, layer, w, batch, cache)
            post, comb, h = hyper_weights(streams, w.mlp_hc, cfg)
            h = self._norm(h, w.mlp_norm, w.mlp_norm_bias)
            out, chosen = moe_begin(h, w, layer, cfg.gating, self.experts, cfg.gate_fp32,
                                    token_ids=batch.token_ids).finish()
            routing.append(chosen)
            streams = hyper_residual(streams, out, post, comb)
        x = hyper_head(streams[batch.last_rows if rows is None else rows], self.weights.hc_head, cfg)
        last = self._norm(x, self.weights.final_norm, self.weights.final_norm_bias)  # [B, D]
        return F.linear(last, self.weights.lm_head).float(), routing

    def _attention_block(self, streams: Tensor, layer: int, w: LayerWeights, batch: Batch, cache: KVCache) -> Tensor:
        post, comb, h = hyper_weights(streams, w.attn_hc, self.cfg)
        h = v4_attention(self._norm(h, w.attn_norm, w.attn_norm_bias), w.attn, self.cfg, layer, batch, cache,
                         self.ropes)
        return hyper_residual(streams, h, post, comb)


def model_class(cfg: ModelConfig) -> type[MoETransformer]:
    """The decoder for `cfg`: hyper-connected (DeepSeek-V4), a dense MLP beside the experts (Gemma 4), or
    the plain residual."""
    if cfg.hc_mult:
        return HyperConnectedTransformer
    return ParallelDenseTransformer if cfg.parallel_dense else MoETransformer
