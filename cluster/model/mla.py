"""Multi-head latent attention (DeepSeek-V2/V3) over a ragged batch.

Shapes: T rows, B sequences, H heads, C context, R kv_lora_rank, P rope dim,
N no-rope key dim, V value dim. The cache keeps only the compressed latent
[R] and the shared rotary key [P] per token; keys and values are expanded
from the latent (kv_b) when attended.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from cluster.config import ModelConfig
from cluster.model.attention import attend_batch
from cluster.model.batch import Batch
from cluster.model.kv_cache import KVCache
from cluster.model.layers import rms_norm
from cluster.model.rope import apply_rotary, rotary_interleaved
from cluster.model.weights import MLAWeights

# The q_a / kv_a latent norms keep RMSNorm's default eps in DeepSeek's and transformers' code, whatever
# config.json's rms_norm_eps says (GLM-4.7-Flash and GLM-5 set 1e-5 for the other norms).
LATENT_NORM_EPS = 1e-6


def _queries(x: Tensor, w: MLAWeights, cfg: ModelConfig) -> Tensor:
    if w.q is not None:
        q = F.linear(x, w.q)
    else:
        q = F.linear(rms_norm(F.linear(x, w.q_a), w.q_a_norm, LATENT_NORM_EPS), w.q_b)
    return q.view(x.shape[0], cfg.num_heads, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)  # [T, H, N+P]


def _expand(latent: Tensor, k_rot: Tensor, w: MLAWeights, cfg: ModelConfig) -> tuple[Tensor, Tensor]:
    """latent [B, 1, C, R], k_rot [B, 1, C, P] → keys [B, H, C, N+P], values [B, H, C, V]."""
    b, _, c, _ = latent.shape
    latent, k_rot = latent.to(w.kv_b.dtype), k_rot.to(w.kv_b.dtype)
    kv = F.linear(latent[:, 0], w.kv_b).view(b, c, cfg.num_heads, -1).transpose(1, 2)  # [B, H, C, N+V]
    k_nope, v = kv.split([cfg.qk_nope_head_dim, cfg.v_head_dim], dim=-1)
    return torch.cat([k_nope, k_rot.expand(-1, cfg.num_heads, -1, -1)], dim=-1), v


def mla_attention(x: Tensor, w: MLAWeights, cfg: ModelConfig, layer: int, batch: Batch, cache: KVCache,
                  rope: tuple[Tensor, Tensor]) -> Tensor:
    rotate = rotary_interleaved if cfg.rope_interleave else apply_rotary
    q = _queries(x, w, cfg)
    q_nope, q_rot = q.split([cfg.qk_nope_head_dim, cfg.qk_rope_head_dim], dim=-1)
    q = torch.cat([q_nope, rotate(q_rot, *rope)], dim=-1)  # [T, H, N+P]
    latent, k_rot = F.linear(x, w.kv_a).split([cfg.kv_lora_rank, cfg.qk_rope_head_dim], dim=-1)
    latent = rms_norm(latent, w.kv_a_norm, LATENT_NORM_EPS)[:, None, :]  # [T, 1, R]
    k_rot = rotate(k_rot[:, None, :], *rope)  # [T, 1, P]
    cache.write(layer, batch.slot_mapping, latent, k_rot)
    read = lambda slots: _expand(*cache.gather(layer, slots), w, cfg)  # noqa: E731
    out = attend_batch(q, batch, read, cfg.v_head_dim, cfg.attn_scale, cfg.sliding_window(layer))  # [T, H, V]
    return F.linear(out.reshape(x.shape[0], -1), w.o)
