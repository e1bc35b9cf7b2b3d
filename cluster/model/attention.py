"""Attention over a ragged batch with the paged KV cache.

Shapes: T rows, B sequences, H heads, H_kv kv heads, hd head_dim, C context, n new tokens.
Decoding sequences (one new token) are attended together, padded to the
longest context with a mask; each prefill attends on its own, causally.
Sliding windows (a query sees only the last `window` positions, itself included,
as transformers' sliding_window_overlay) and attention sinks (gpt-oss: a learned
per-head logit in the softmax that carries no value) are per layer.
Grouped-query attention with a mask folds each kv head's query heads into rows of
that kv head, so K/V are never repeated per query head.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from cluster.config import ModelConfig
from cluster.model.batch import Batch
from cluster.model.kv_cache import KVCache
from cluster.model.layers import rms_norm
from cluster.model.rope import apply_rotary, rotary_interleaved
from cluster.model.weights import AttentionWeights

Reader = Callable[[Tensor], tuple[Tensor, Tensor]]  # slots [B, C] → k [B, H_kv, C, dk], v [B, H_kv, C, dv]
# Sparse attention: (query rows [B, n], context slots [B, C], visible [B, n, C]) → the keys each query keeps.
Selector = Callable[[Tensor, Tensor, Tensor], Tensor]

FOLD_GQA = True  # False: each query head attends on its own (K/V repeated per head), the reference the tests use


def _project(x: Tensor, w: AttentionWeights, cfg: ModelConfig, layer: int) -> tuple[Tensor, Tensor, Tensor]:
    q, k = F.linear(x, w.q, w.q_bias), F.linear(x, w.k, w.k_bias)
    v = k if cfg.value_is_key(layer) else F.linear(x, w.v, w.v_bias)  # Gemma 4's attention_k_eq_v: no v_proj
    if cfg.qk_norm == "full":
        q, k = rms_norm(q, w.q_norm, cfg.rms_norm_eps), rms_norm(k, w.k_norm, cfg.rms_norm_eps)
    if cfg.clip_qkv is not None:
        q, k, v = (t.clamp(-cfg.clip_qkv, cfg.clip_qkv) for t in (q, k, v))
    t, hd, hk = x.shape[0], cfg.head_dim_of(layer), cfg.kv_heads_of(layer)
    q = q.view(t, cfg.num_heads, hd)  # [T, H, hd]
    k = k.view(t, hk, hd)  # [T, H_kv, hd]
    v = v.view(t, hk, hd)
    if cfg.qk_norm == "head" or (cfg.qk_norm == "l2" and cfg.rotates(layer)):
        # "l2" normalises after rotary in transformers: the same, since a rotation keeps each head's norm
        q, k = rms_norm(q, w.q_norm, cfg.rms_norm_eps), rms_norm(k, w.k_norm, cfg.rms_norm_eps)
    if cfg.v_norm:
        v = rms_norm(v, None, cfg.rms_norm_eps)
    return q, k, v


def visible(lens: Tensor, width: int, n: int, window: int | None, chunk: int | None = None) -> Tensor:
    """[B, n, C] True where query i (at position lens - n + i) may see key position c: causal, within
    the window, and in the query's own chunk of `chunk` positions (Llama 4's chunked attention)."""
    pos = torch.arange(width, device=lens.device)
    q_pos = lens[:, None] - n + torch.arange(n, device=lens.device)[None, :]  # [B, n]
    mask = pos[None, None, :] <= q_pos[:, :, None]
    if window is not None:
        mask &= pos[None, None, :] > q_pos[:, :, None] - window
    if chunk is not None:
        mask &= (pos[None, None, :] // chunk) == (q_pos[:, :, None] // chunk)
    return mask


def _with_sinks(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float | None, sink: Tensor) -> Tensor:
    """q [B, H, n, dk]; mask [B, 1, n, C]; sink [H, n] or [H, 1]: each row's sink logit."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # [B, H, C, d] (folded: as is)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q @ k.transpose(-1, -2)).float() * scale  # [B, H, n, C]
    scores = scores.masked_fill(~mask, float("-inf"))
    sink = sink.float()[None, :, :, None].expand(*scores.shape[:-1], 1)  # [B, H, n, 1]
    probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    return probs.to(v.dtype) @ v  # [B, H, n, dv]


def _per_head(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float | None,
              sinks: Tensor | None) -> Tensor:
    if sinks is not None:
        return _with_sinks(q, k, v, mask[:, None], scale, sinks[:, None])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask[:, None],
                                          is_causal=mask is None, scale=scale, enable_gqa=True)


def _folded(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float | None, sinks: Tensor | None) -> Tensor:
    """Grouped-query attention as multi-head attention over the kv heads: the G query heads of a kv head
    become G·n query rows of it, so K/V are read once per kv head and never repeated (SDPA's
    enable_gqa with a mask takes the math path on CUDA, which repeats them; the sink path did too)."""
    (b, h, n, d), hk = q.shape, k.shape[1]
    groups = h // hk
    q = q.reshape(b, hk, groups * n, d)  # rows (g, i)
    if n == 1:
        mask = mask[:, None]  # [B, 1, 1, C]: the same for every row
    else:
        mask = mask[:, None, None].expand(b, 1, groups, n, mask.shape[-1]).reshape(b, 1, groups * n, -1)
    if sinks is not None:
        sink = sinks.view(hk, groups, 1).expand(hk, groups, n).reshape(hk, groups * n)
        out = _with_sinks(q, k, v, mask, scale, sink)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out.reshape(b, h, n, -1)  # [B, H_kv, G·n, dv] → [B, H, n, dv]


def _attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float | None,
            sinks: Tensor | None) -> Tensor:
    """q [B, H, n, dk], k [B, H_kv, C, dk], v [B, H_kv, C, dv]; mask [B, n, C] (None: causal, no past)."""
    k, v = k.to(q.dtype), v.to(q.dtype)  # the cache may be kept in another dtype
    if FOLD_GQA and mask is not None and q.shape[1] != k.shape[1]:
        return _folded(q, k, v, mask, scale, sinks)
    return _per_head(q, k, v, mask, scale, sinks)


def attend_batch(q: Tensor, batch: Batch, read: Reader, v_dim: int, scale: float | None = None,
                 window: int | None = None, sinks: Tensor | None = None, chunk: int | None = None,
                 select: Selector | None = None, out: Tensor | None = None) -> Tensor:
    """q [T, H, dk] → [T, H, dv], each row attending to its own sequence's cached context
    (only to the keys `select` keeps, when given); written into `out` when given."""
    out = q.new_empty(q.shape[0], q.shape[1], v_dim) if out is None else out
    d = batch.decode
    if d is not None:
        k, v = read(d.context_slots)  # [B, H_kv, C, d]
        mask = visible(d.lens, k.shape[2], 1, window, chunk)  # [B, 1, C]
        if select is not None:
            mask = select(d.rows[:, None], d.context_slots, mask)
        out[d.rows] = _attend(q[d.rows][:, :, None, :], k, v, mask, scale, sinks)[:, :, 0, :]
    for c in batch.prefills:
        k, v = read(c.context_slots[None])  # [1, H_kv, C, d]
        qs = q[c.start:c.start + c.num_tokens].transpose(0, 1)[None]  # [1, H, n, dk]
        simple = (c.context_len == c.num_tokens and window is None and sinks is None and chunk is None
                  and select is None)
        lens = torch.full((1,), c.context_len, device=q.device)  # a fill on the device: no host-to-device copy
        mask = None if simple else visible(lens, c.context_len, c.num_tokens, window, chunk)
        if select is not None:
            rows = torch.arange(c.start, c.start + c.num_tokens, device=q.device)[None]
            mask = select(rows, c.context_slots[None], mask)
        out[c.start:c.start + c.num_tokens] = _attend(qs, k, v, mask, scale, sinks)[0].transpose(0, 1)
    return out


def query_temperature(positions: Tensor, floor_scale: float, attn_scale: float) -> Tensor:
    """[T] Llama 4's query scale on NoPE layers: 1 up to floor_scale - 1, then growing with log(position)."""
    return torch.log1p(torch.floor((positions.float() + 1.0) / floor_scale)) * attn_scale + 1.0


def attention(x: Tensor, w: AttentionWeights, cfg: ModelConfig, layer: int, batch: Batch,
              cache: KVCache, rope: tuple[Tensor, Tensor], paged=None) -> Tensor:
    """paged: a paged-attention backend (attention_backend.make_backend) that attends what it covers
    of the batch first; SDPA attends the rest."""
    q, k, v = _project(x, w, cfg, layer)
    if cfg.rotates(layer):
        rotate = rotary_interleaved if cfg.rope_interleave else apply_rotary
        q, k = rotate(q, *rope), rotate(k, *rope)
    elif cfg.attn_temperature is not None:
        q = (q * query_temperature(batch.positions, *cfg.attn_temperature)[:, None, None]).to(q.dtype)
    cache.write(layer, batch.slot_mapping, k, v)
    window, chunk, out = cfg.sliding_window(layer), cfg.attention_chunk(layer), q.new_empty(q.shape)
    if paged is not None:
        batch = paged.attend(q, out, batch, cache, layer, cfg.attn_scale, window, w.sinks, chunk)
    attend_batch(q, batch, lambda slots: cache.gather(layer, slots), cfg.head_dim_of(layer), cfg.attn_scale, window,
                 w.sinks, chunk, out=out)
    out = out.reshape(x.shape[0], -1)
    if w.gate is not None:  # Qwen3-Next: each output channel gated by its own sigmoid
        out = out * torch.sigmoid(F.linear(x, w.gate))
    return F.linear(out, w.o, w.o_bias)
