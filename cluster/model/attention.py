"""Attention over a ragged batch with the slot KV cache.

Shapes: T rows, B sequences, H heads, H_kv kv heads, hd head_dim, C context.
Decoding sequences (one new token) are attended together, padded to the
longest context with a mask; each prefill attends on its own, causally.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from cluster.config import ModelConfig
from cluster.model.batch import Batch, SeqChunk
from cluster.model.kv_cache import KVCache
from cluster.model.layers import apply_rotary, rms_norm
from cluster.model.weights import AttentionWeights


def _project(x: Tensor, w: AttentionWeights, cfg: ModelConfig) -> tuple[Tensor, Tensor, Tensor]:
    q, k, v = F.linear(x, w.q, w.q_bias), F.linear(x, w.k, w.k_bias), F.linear(x, w.v, w.v_bias)
    if cfg.qk_norm == "full":
        q, k = rms_norm(q, w.q_norm, cfg.rms_norm_eps), rms_norm(k, w.k_norm, cfg.rms_norm_eps)
    if cfg.clip_qkv is not None:
        q, k, v = (t.clamp(-cfg.clip_qkv, cfg.clip_qkv) for t in (q, k, v))
    t = x.shape[0]
    q = q.view(t, cfg.num_heads, cfg.head_dim)  # [T, H, hd]
    k = k.view(t, cfg.num_kv_heads, cfg.head_dim)  # [T, H_kv, hd]
    v = v.view(t, cfg.num_kv_heads, cfg.head_dim)
    if cfg.qk_norm == "head":
        q, k = rms_norm(q, w.q_norm, cfg.rms_norm_eps), rms_norm(k, w.k_norm, cfg.rms_norm_eps)
    return q, k, v


def _decode(q: Tensor, batch: Batch, chunks: list[SeqChunk], cache: KVCache, layer: int) -> Tensor:
    rows = torch.tensor([c.start for c in chunks], device=q.device)
    lens = torch.tensor([c.context_len for c in chunks], device=q.device)
    k, v = cache.read(layer, batch.slots[rows], int(lens.max()))  # [B, H_kv, C, hd]
    mask = torch.arange(k.shape[2], device=q.device)[None, :] < lens[:, None]  # [B, C]
    out = F.scaled_dot_product_attention(
        q[rows][:, :, None, :], k, v,  # [B, H, 1, hd], [B, H_kv, C, hd]
        attn_mask=mask[:, None, None, :], enable_gqa=True)
    return rows, out[:, :, 0, :]  # [B, H, hd]


def _prefill(q: Tensor, chunk: SeqChunk, cache: KVCache, layer: int) -> Tensor:
    slot = torch.tensor([chunk.slot], device=q.device)
    k, v = cache.read(layer, slot, chunk.context_len)  # [1, H_kv, C, hd]
    qs = q[chunk.start:chunk.start + chunk.num_tokens].transpose(0, 1)[None]  # [1, H, n, hd]
    past = chunk.context_len - chunk.num_tokens
    mask = None
    if past:  # new tokens see the whole cached prefix, then causally among themselves
        i = torch.arange(chunk.num_tokens, device=q.device)[:, None] + past
        mask = torch.arange(chunk.context_len, device=q.device)[None, :] <= i
    out = F.scaled_dot_product_attention(qs, k, v, attn_mask=mask,
                                         is_causal=not past, enable_gqa=True)
    return out[0].transpose(0, 1)  # [n, H, hd]


def attention(x: Tensor, w: AttentionWeights, cfg: ModelConfig, layer: int, batch: Batch,
              cache: KVCache, rope: tuple[Tensor, Tensor]) -> Tensor:
    q, k, v = _project(x, w, cfg)
    q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
    cache.write(layer, batch.slots, batch.positions, k, v)
    out = torch.empty_like(q)  # [T, H, hd]
    decodes = [c for c in batch.chunks if c.num_tokens == 1]
    if decodes:
        rows, o = _decode(q, batch, decodes, cache, layer)
        out[rows] = o
    for chunk in batch.chunks:
        if chunk.num_tokens > 1:
            out[chunk.start:chunk.start + chunk.num_tokens] = _prefill(q, chunk, cache, layer)
    return F.linear(out.reshape(x.shape[0], -1), w.o)
