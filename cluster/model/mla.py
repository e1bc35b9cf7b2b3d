"""Multi-head latent attention (DeepSeek-V2/V3) over a ragged batch.

Shapes: T rows, B sequences, H heads, C context, R kv_lora_rank, P rope dim,
N no-rope key dim, V value dim. The cache keeps only the compressed latent
[R] and the shared rotary key [P] per token. Prefill chunks expand keys and
values from the latent (kv_b) when attended. Decode absorbs kv_b instead (as
DeepSeek's and vLLM's MLA do): the no-rope query is mapped into the latent space
(q_nope · W_uk), attends the cached [latent, k_rot] as one shared key head
(multi-query), and the latent output is mapped to values (· W_uv). Nothing of
size [B, H, C, N+V] is built: at DeepSeek-V3 sizes, B=64 and C=4096 that is
16 GiB per layer and step.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor

from cluster.config import ModelConfig
from cluster.model.attention import attend_batch, visible
from cluster.model.batch import Batch
from cluster.model.kv_cache import KVCache
from cluster.model.layers import rms_norm
from cluster.model.rope import apply_rotary, rotary_interleaved
from cluster.model.weights import MLAWeights

ABSORB_DECODE = True  # False: decode expands kv_b over the context as prefill does (the reference the tests use)


def _queries(x: Tensor, w: MLAWeights, cfg: ModelConfig) -> Tensor:
    if w.q is not None:
        q = F.linear(x, w.q)
    else:
        q = F.linear(rms_norm(F.linear(x, w.q_a), w.q_a_norm, cfg.rms_norm_eps), w.q_b)
    return q.view(x.shape[0], cfg.num_heads, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)  # [T, H, N+P]


def _expand(latent: Tensor, k_rot: Tensor, w: MLAWeights, cfg: ModelConfig) -> tuple[Tensor, Tensor]:
    """latent [B, 1, C, R], k_rot [B, 1, C, P] → keys [B, H, C, N+P], values [B, H, C, V]."""
    b, _, c, _ = latent.shape
    latent, k_rot = latent.to(w.kv_b.dtype), k_rot.to(w.kv_b.dtype)
    kv = F.linear(latent[:, 0], w.kv_b).view(b, c, cfg.num_heads, -1).transpose(1, 2)  # [B, H, C, N+V]
    k_nope, v = kv.split([cfg.qk_nope_head_dim, cfg.v_head_dim], dim=-1)
    return torch.cat([k_nope, k_rot.expand(-1, cfg.num_heads, -1, -1)], dim=-1), v


def _absorbed_decode(q: Tensor, latent: Tensor, k_rot: Tensor, lens: Tensor, w: MLAWeights, cfg: ModelConfig,
                     window: int | None) -> Tensor:
    """q [B, H, N+P] (rope applied), latent [B, 1, C, R], k_rot [B, 1, C, P] → [B, H, V]."""
    h, n = cfg.num_heads, cfg.qk_nope_head_dim
    w_kv = w.kv_b.view(h, n + cfg.v_head_dim, cfg.kv_lora_rank)  # [H, N+V, R]
    w_uk, w_uv = w_kv[:, :n], w_kv[:, n:]  # [H, N, R], [H, V, R]
    q_nope, q_rot = q.to(w.kv_b.dtype).split([n, cfg.qk_rope_head_dim], dim=-1)
    q_latent = torch.einsum("bhn,hnr->bhr", q_nope, w_uk)  # [B, H, R]
    qs = torch.cat([q_latent, q_rot], dim=-1)[:, :, None, :]  # [B, H, 1, R+P]
    keys = torch.cat([latent, k_rot], dim=-1).to(qs.dtype)  # [B, 1, C, R+P]: one key head for all
    mask = visible(lens, keys.shape[2], 1, window)[:, None]  # [B, 1, 1, C]
    out = F.scaled_dot_product_attention(qs, keys, latent.to(qs.dtype), attn_mask=mask, scale=cfg.attn_scale,
                                         enable_gqa=True)  # [B, H, 1, R]
    return torch.einsum("bhr,hvr->bhv", out[:, :, 0], w_uv)  # [B, H, V]


def mla_attention(x: Tensor, w: MLAWeights, cfg: ModelConfig, layer: int, batch: Batch, cache: KVCache,
                  rope: tuple[Tensor, Tensor]) -> Tensor:
    rotate = rotary_interleaved if cfg.rope_interleave else apply_rotary
    q = _queries(x, w, cfg)
    q_nope, q_rot = q.split([cfg.qk_nope_head_dim, cfg.qk_rope_head_dim], dim=-1)
    q = torch.cat([q_nope, rotate(q_rot, *rope)], dim=-1)  # [T, H, N+P]
    latent, k_rot = F.linear(x, w.kv_a).split([cfg.kv_lora_rank, cfg.qk_rope_head_dim], dim=-1)
    latent = rms_norm(latent, w.kv_a_norm, cfg.rms_norm_eps)[:, None, :]  # [T, 1, R]
    k_rot = rotate(k_rot[:, None, :], *rope)  # [T, 1, P]
    cache.write(layer, batch.slot_mapping, latent, k_rot)
    read = lambda slots: _expand(*cache.gather(layer, slots), w, cfg)  # noqa: E731
    window, d = cfg.sliding_window(layer), batch.decode
    if ABSORB_DECODE and d is not None:
        decoded = _absorbed_decode(q[d.rows], *cache.gather(layer, d.context_slots), d.lens, w, cfg, window)
        batch = replace(batch, decode=None)  # attend_batch: the prefill chunks only
    out = attend_batch(q, batch, read, cfg.v_head_dim, cfg.attn_scale, window)  # [T, H, V]
    if ABSORB_DECODE and d is not None:
        out[d.rows] = decoded.to(out.dtype)
    return F.linear(out.reshape(x.shape[0], -1), w.o)
