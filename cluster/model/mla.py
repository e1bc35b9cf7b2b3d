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
from cluster.model.batch import Batch, SeqChunk
from cluster.model.kv_cache import KVCache
from cluster.model.layers import apply_rotary, rms_norm
from cluster.model.weights import MLAWeights


def rotary_interleaved(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary on interleaved pairs (x0, x1), (x2, x3), ...; the result is laid out
    [rotated evens, rotated odds]. q and k get the same layout, so scores are as DeepSeek defines."""
    half = x.shape[-1] // 2
    c, s = cos[..., :half], sin[..., :half]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


def _queries(x: Tensor, w: MLAWeights, cfg: ModelConfig) -> Tensor:
    if w.q is not None:
        q = F.linear(x, w.q)
    else:
        q = F.linear(rms_norm(F.linear(x, w.q_a), w.q_a_norm, cfg.rms_norm_eps), w.q_b)
    return q.view(x.shape[0], cfg.num_heads, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)  # [T, H, N+P]


def _expand(latent: Tensor, k_rot: Tensor, w: MLAWeights, cfg: ModelConfig) -> tuple[Tensor, Tensor]:
    """latent [B, 1, C, R], k_rot [B, 1, C, P] → keys [B, H, C, N+P], values [B, H, C, V]."""
    b, _, c, _ = latent.shape
    kv = F.linear(latent[:, 0], w.kv_b).view(b, c, cfg.num_heads, -1).transpose(1, 2)  # [B, H, C, N+V]
    k_nope, v = kv.split([cfg.qk_nope_head_dim, cfg.v_head_dim], dim=-1)
    return torch.cat([k_nope, k_rot.expand(-1, cfg.num_heads, -1, -1)], dim=-1), v


def _attend(q: Tensor, chunks: list[SeqChunk], batch: Batch, cache: KVCache, layer: int, w: MLAWeights,
            cfg: ModelConfig) -> Tensor:
    """q [B, H, n, N+P] for chunks of n new tokens each (n = 1 for decodes)."""
    lens = torch.tensor([c.context_len for c in chunks], device=q.device)
    slots = torch.tensor([c.slot for c in chunks], device=q.device)
    latent, k_rot = cache.read(layer, slots, int(lens.max()))  # [B, 1, C, R], [B, 1, C, P]
    k, v = _expand(latent, k_rot, w, cfg)
    n = q.shape[2]
    pos = torch.arange(k.shape[2], device=q.device)
    new = lens[:, None] - n + torch.arange(n, device=q.device)[None, :]  # [B, n] position of each query
    mask = pos[None, None, :] <= new[:, :, None]  # [B, n, C]: causal, and nothing past the context
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])  # [B, H, n, V]


def mla_attention(x: Tensor, w: MLAWeights, cfg: ModelConfig, layer: int, batch: Batch, cache: KVCache,
                  rope: tuple[Tensor, Tensor]) -> Tensor:
    rotate = rotary_interleaved if cfg.rope_interleave else apply_rotary
    q = _queries(x, w, cfg)
    q_nope, q_rot = q.split([cfg.qk_nope_head_dim, cfg.qk_rope_head_dim], dim=-1)
    q = torch.cat([q_nope, rotate(q_rot, *rope)], dim=-1)  # [T, H, N+P]
    latent, k_rot = F.linear(x, w.kv_a).split([cfg.kv_lora_rank, cfg.qk_rope_head_dim], dim=-1)
    latent = rms_norm(latent, w.kv_a_norm, cfg.rms_norm_eps)[:, None, :]  # [T, 1, R]
    k_rot = rotate(k_rot[:, None, :], *rope)  # [T, 1, P]
    cache.write(layer, batch.slots, batch.positions, latent, k_rot)
    out = q.new_empty(x.shape[0], cfg.num_heads, cfg.v_head_dim)  # [T, H, V]
    decodes = [c for c in batch.chunks if c.num_tokens == 1]
    if decodes:
        rows = torch.tensor([c.start for c in decodes], device=x.device)
        out[rows] = _attend(q[rows][:, :, None, :], decodes, batch, cache, layer, w, cfg)[:, :, 0, :]
    for c in batch.chunks:
        if c.num_tokens > 1:
            qs = q[c.start:c.start + c.num_tokens].transpose(0, 1)[None]  # [1, H, n, N+P]
            out[c.start:c.start + c.num_tokens] = _attend(qs, [c], batch, cache, layer, w, cfg)[0].transpose(0, 1)
    return F.linear(out.reshape(x.shape[0], -1), w.o)
