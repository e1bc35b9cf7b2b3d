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
from cluster.model.weights import IndexerWeights, MLAWeights

# The q_a / kv_a latent norms keep RMSNorm's default eps in DeepSeek's and transformers' code, whatever
# config.json's rms_norm_eps says (GLM-4.7-Flash and GLM-5 set 1e-5 for the other norms).
LATENT_NORM_EPS = 1e-6
INDEXER_NORM_EPS = 1e-6  # the indexer's key LayerNorm, fixed in DeepSeek's and transformers' code

ABSORB_DECODE = True  # False: decode expands kv_b over the context as prefill does (the reference the tests use)


def _queries(x: Tensor, w: MLAWeights, cfg: ModelConfig) -> tuple[Tensor, Tensor | None]:
    """Queries [T, H, N+P] and the normed q latent [T, q_lora] they came from (None without q_lora)."""
    if w.q is not None:
        q, latent = F.linear(x, w.q), None
    else:
        latent = rms_norm(F.linear(x, w.q_a), w.q_a_norm, LATENT_NORM_EPS)
        q = F.linear(latent, w.q_b)
    return q.view(x.shape[0], cfg.num_heads, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim), latent


def _expand(latent: Tensor, k_rot: Tensor, w: MLAWeights, cfg: ModelConfig) -> tuple[Tensor, Tensor]:
    """latent [B, 1, C, R], k_rot [B, 1, C, P] → keys [B, H, C, N+P], values [B, H, C, V]."""
    b, _, c, _ = latent.shape
    latent, k_rot = latent.to(w.kv_b.dtype), k_rot.to(w.kv_b.dtype)
    kv = F.linear(latent[:, 0], w.kv_b).view(b, c, cfg.num_heads, -1).transpose(1, 2)  # [B, H, C, N+V]
    k_nope, v = kv.split([cfg.qk_nope_head_dim, cfg.v_head_dim], dim=-1)
    k_rot = k_rot[..., :cfg.qk_rope_head_dim]  # with sparse attention the indexer's key follows
    return torch.cat([k_nope, k_rot.expand(-1, cfg.num_heads, -1, -1)], dim=-1), v


def index_queries_keys(x: Tensor, q_latent: Tensor, w: IndexerWeights, cfg: ModelConfig,
                       rope: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """The indexer's queries [T, Hi, Di] and keys [T, Di], rotary on their first P features."""
    p = cfg.qk_rope_head_dim
    q = F.linear(q_latent, w.q).view(x.shape[0], cfg.index_n_heads, cfg.index_head_dim)
    k = F.layer_norm(F.linear(x, w.k), (cfg.index_head_dim,), w.k_norm, w.k_norm_bias, INDEXER_NORM_EPS)
    if cfg.index_rope_interleave:
        rotate = lambda t: torch.cat([rotary_interleaved(t[..., :p], *rope), t[..., p:]], dim=-1)  # noqa: E731
    else:
        rotate = lambda t: apply_rotary(t, *rope)  # noqa: E731  (rotates the first P features, the rest pass)
    return rotate(q), rotate(k[:, None, :])[:, 0]


def select_topk(index_q: Tensor, x: Tensor, index_k: Tensor, mask: Tensor, w: IndexerWeights,
                cfg: ModelConfig) -> Tensor:
    """index_q [B, n, Hi, Di], x [B, n, D], index_k [B, C, Di], mask [B, n, C] (visible keys) → mask of the
    index_topk visible keys each query scores highest: Σ_h weight_h · relu(q_h · k / √Di)."""
    scores = torch.relu(torch.einsum("bnhd,bcd->bnhc", index_q.float(), index_k.float()) * cfg.index_head_dim ** -0.5)
    weights = F.linear(x.float(), w.head_weights) * cfg.index_n_heads ** -0.5  # [B, n, Hi]
    index = torch.einsum("bnh,bnhc->bnc", weights, scores).masked_fill(~mask, float("-inf"))
    if index.shape[-1] <= cfg.index_topk:
        return mask
    top = index.topk(cfg.index_topk, dim=-1).indices
    return torch.zeros_like(mask).scatter_(-1, top, True) & mask


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
    q, q_latent = _queries(x, w, cfg)
    q_nope, q_rot = q.split([cfg.qk_nope_head_dim, cfg.qk_rope_head_dim], dim=-1)
    q = torch.cat([q_nope, rotate(q_rot, *rope)], dim=-1)  # [T, H, N+P]
    latent, k_rot = F.linear(x, w.kv_a).split([cfg.kv_lora_rank, cfg.qk_rope_head_dim], dim=-1)
    latent = rms_norm(latent, w.kv_a_norm, LATENT_NORM_EPS)[:, None, :]  # [T, 1, R]
    k_rot = rotate(k_rot[:, None, :], *rope)  # [T, 1, P]
    select = None
    if w.indexer is not None:
        index_q, index_k = index_queries_keys(x, q_latent, w.indexer, cfg, rope)
        k_rot = torch.cat([k_rot, index_k[:, None, :]], dim=-1)  # the cache's row: [rotary key | indexer key]
        select = lambda rows, slots, mask: select_topk(  # noqa: E731
            index_q[rows], x[rows], cache.gather(layer, slots)[1][:, 0, :, cfg.qk_rope_head_dim:], mask,
            w.indexer, cfg)
    cache.write(layer, batch.slot_mapping, latent, k_rot)
    read = lambda slots: _expand(*cache.gather(layer, slots), w, cfg)  # noqa: E731
    window, d = cfg.sliding_window(layer), batch.decode
    absorb = ABSORB_DECODE and d is not None and select is None  # DSA's selection: the expanded path
    if absorb:
        decoded = _absorbed_decode(q[d.rows], *cache.gather(layer, d.context_slots), d.lens, w, cfg, window)
        batch = replace(batch, decode=None)  # attend_batch: the prefill chunks only
    out = attend_batch(q, batch, read, cfg.v_head_dim, cfg.attn_scale, window, select=select)  # [T, H, V]
    if absorb:
        out[d.rows] = decoded.to(out.dtype)
    return F.linear(out.reshape(x.shape[0], -1), w.o)
