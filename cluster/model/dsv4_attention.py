"""DeepSeek-V4 attention over a ragged batch with the paged KV cache.

Shapes: T rows, H heads, hd head_dim, C context, n new tokens of a sequence, m a layer's compression
ratio, N = C // m compressed entries, Hi / Di the indexer's heads / width.

What is cached, per token and layer, in the existing paged cache (so it is budgeted, freed, preempted
and prefix-cached with the sequence like any KV): `k` holds the token's K=V row (normed, rotated);
`v` holds its compressor inputs (kv and gate projections, the indexer's too on CSA layers). The
compressed entries are a pure function of those, recomputed from the context each step: entry w
depends on tokens [w*m, (w+1)*m) only (and the window before on CSA layers), so no running state
outlives the cache. That costs cache bytes (CSA: 4*hd + 4*Di per token besides the hd of K=V) and
O(C) work per step and layer, linear like the attention itself.

Per query at position p: the window's keys (the last `sliding_window` positions) and the compressed
entries w < (p + 1) // m (HCA: all of them; CSA: the index_topk the indexer scores highest), one
softmax with the learned sinks, values = keys; then the rotary is undone on the output's rope slice.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from cluster.config import ModelConfig
from cluster.model.attention import _with_sinks, visible
from cluster.model.batch import Batch, SeqChunk
from cluster.model.kv_cache import KVCache
from cluster.model.layers import rms_norm
from cluster.model.rope import Rotary
from cluster.model.weights import CompressorWeights, V4AttentionWeights


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """V4's rotary: interleaved pairs of the trailing 2 * P features, in place of layout (the values are
    the keys here, so the layout must stay). x [..., T, ?, d]; cos, sin [T, 1, P] (one per pair)."""
    p2 = 2 * cos.shape[-1]
    nope, rope = x[..., :-p2], x[..., -p2:].float()
    x1, x2 = rope[..., 0::2], rope[..., 1::2]
    out = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
    return torch.cat([nope, out.to(x.dtype)], dim=-1)


def pairs(rotary: Rotary, positions: Tensor) -> tuple[Tensor, Tensor]:
    """cos, sin [T, 1, P] per interleaved pair (Rotary keeps the rotate-half table: its first half)."""
    cos, sin = rotary.at(positions)
    half = cos.shape[-1] // 2
    return cos[..., :half], sin[..., :half]


def compress(kv: Tensor, gate: Tensor, w: CompressorWeights, ratio: int, overlap: bool, rotary: Rotary,
             eps: float) -> Tensor:
    """kv, gate [C, c * d] of a sequence's tokens → its N = C // ratio entries [N, d], rotated at the
    position of their window's first token. overlap (CSA): entry w mixes window w's second half of
    features with window w - 1's first half, over 2 * ratio slots (window 0 has no predecessor)."""
    n = kv.shape[0] // ratio
    d = w.norm.shape[0]
    if n == 0:
        return kv.new_zeros(0, d)
    kv = kv[:n * ratio].view(n, ratio, -1)
    gate = gate[:n * ratio].view(n, ratio, -1) + w.position_bias
    if overlap:
        both_kv = kv.new_zeros(n, 2 * ratio, d)
        both_gate = gate.new_full((n, 2 * ratio, d), float("-inf"))
        both_kv[:, ratio:], both_gate[:, ratio:] = kv[..., d:], gate[..., d:]
        both_kv[1:, :ratio], both_gate[1:, :ratio] = kv[:-1, :, :d], gate[:-1, :, :d]
        kv, gate = both_kv, both_gate
    mixed = (kv * gate.softmax(dim=1, dtype=torch.float32).to(kv.dtype)).sum(dim=1)  # [N, d]
    entries = rms_norm(mixed, w.norm, eps)
    cos, sin = pairs(rotary, torch.arange(n, device=kv.device) * ratio)
    return rotate(entries[:, None, :], cos, sin)[:, 0]


def _project(x: Tensor, w: V4AttentionWeights, cfg: ModelConfig, cos: Tensor, sin: Tensor):
    """Queries [T, H, hd], the q latent [T, q_lora] (the indexer reads it) and the K=V rows [T, hd]."""
    latent = rms_norm(F.linear(x, w.q_a), w.q_a_norm, cfg.rms_norm_eps)
    q = F.linear(latent, w.q_b).view(x.shape[0], cfg.num_heads, cfg.head_dim)
    q = rotate(rms_norm(q, None, cfg.rms_norm_eps), cos, sin)
    kv = rotate(rms_norm(F.linear(x, w.kv), w.kv_norm, cfg.rms_norm_eps)[:, None, :], cos, sin)[:, 0]
    return q, latent, kv


def _raw(x: Tensor, w: V4AttentionWeights, width: int) -> Tensor:
    """[T, width] the compressor inputs of each new token (zeros on a window-only layer)."""
    parts = [] if w.compressor is None else [F.linear(x, w.compressor.kv), F.linear(x, w.compressor.gate)]
    if w.indexer is not None:
        parts += [F.linear(x, w.indexer.kv), F.linear(x, w.indexer.gate)]
    raw = torch.cat(parts, dim=-1) if parts else x.new_zeros(x.shape[0], 0)
    return F.pad(raw, (0, width - raw.shape[-1]))


def _split_raw(raw: Tensor, cfg: ModelConfig, csa: bool) -> tuple[Tensor, ...]:
    hd, di = cfg.head_dim, cfg.index_head_dim
    if not csa:
        return raw[:, :hd], raw[:, hd:2 * hd]
    return raw[:, :2 * hd], raw[:, 2 * hd:4 * hd], raw[:, 4 * hd:4 * hd + 2 * di], raw[:, 4 * hd + 2 * di:4 * hd + 4 * di]


def _index_select(x: Tensor, latent: Tensor, entries: Tensor, causal: Tensor, q_pos: Tensor,
                  w: V4AttentionWeights, cfg: ModelConfig, rotary: Rotary) -> Tensor:
    """[n, N] the entries each query keeps: the index_topk causal ones scoring highest by
    Σ_h weight_h · relu(q_h · k / √Di)."""
    q = F.linear(latent, w.index_q).view(x.shape[0], cfg.index_n_heads, cfg.index_head_dim)
    q = rotate(q, *pairs(rotary, q_pos))
    scores = torch.relu(torch.einsum("nhd,sd->nhs", q.float(), entries.float())) * cfg.index_head_dim ** -0.5
    weights = F.linear(x, w.index_weights).float() * cfg.index_n_heads ** -0.5  # [n, Hi]
    index = torch.einsum("nh,nhs->ns", weights, scores).masked_fill(~causal, float("-inf"))
    top = index.topk(min(cfg.index_topk, index.shape[-1]), dim=-1).indices
    return torch.zeros_like(causal).scatter_(-1, top, True) & causal


def _compressed(c: SeqChunk, x: Tensor, latent: Tensor, raw: Tensor, w: V4AttentionWeights, cfg: ModelConfig,
                layer: int, rotary: Rotary) -> tuple[Tensor, Tensor]:
    """This sequence's compressed entries [N, hd] and which of them each new token sees [n, N]."""
    ratio = cfg.compress_ratio(layer)
    csa = ratio == cfg.csa_ratio
    parts = _split_raw(raw, cfg, csa)
    entries = compress(parts[0], parts[1], w.compressor, ratio, csa, rotary, cfg.rms_norm_eps)
    q_pos = torch.arange(c.context_len - c.num_tokens, c.context_len, device=x.device)
    causal = torch.arange(entries.shape[0], device=x.device)[None, :] < ((q_pos + 1) // ratio)[:, None]
    if csa and entries.shape[0]:
        index_entries = compress(parts[2], parts[3], w.indexer, ratio, True, rotary, cfg.rms_norm_eps)
        causal = _index_select(x, latent, index_entries, causal, q_pos, w, cfg, rotary)
    return entries, causal


def _grouped_output(out: Tensor, w: V4AttentionWeights, cfg: ModelConfig) -> Tensor:
    """[T, H * hd] → [T, D]: each of o_groups head groups to o_lora_rank features, then mixed."""
    t, g = out.shape[0], cfg.o_groups
    o_a = w.o_a.view(g, cfg.o_lora_rank, -1)  # [g, o_lora, H * hd / g]
    grouped = torch.einsum("tgi,goi->tgo", out.view(t, g, -1), o_a).reshape(t, -1)
    return F.linear(grouped, w.o_b)


def v4_attention(x: Tensor, w: V4AttentionWeights, cfg: ModelConfig, layer: int, batch: Batch, cache: KVCache,
                 ropes: tuple[Rotary, Rotary]) -> Tensor:
    """ropes: (sliding layers' rotary, compressed layers' rotary)."""
    ratio = cfg.compress_ratio(layer)
    rotary = ropes[1] if ratio else ropes[0]
    cos, sin = pairs(rotary, batch.positions)
    q, latent, kv = _project(x, w, cfg, cos, sin)
    cache.write(layer, batch.slot_mapping, kv[:, None, :], _raw(x, w, cache.v.shape[-1])[:, None, :])
    out = q.new_empty(q.shape)
    for c in batch.chunks:  # one sequence at a time: each has its own compressed entries
        rows = slice(c.start, c.start + c.num_tokens)
        keys = cache.k[layer, c.context_slots][:, 0]  # [C, hd]
        lens = torch.full((1,), c.context_len, device=x.device)
        mask = visible(lens, c.context_len, c.num_tokens, cfg.sliding_window(layer))[0]  # [n, C]
        if ratio:
            raw = cache.v[layer, c.context_slots][:, 0]
            entries, seen = _compressed(c, x[rows], latent[rows], raw, w, cfg, layer, ropes[1])
            keys, mask = torch.cat([keys, entries.to(keys.dtype)]), torch.cat([mask, seen], dim=-1)
        keys = keys.to(q.dtype)[None, None]  # [1, 1, C + N, hd]: one head, keys and values alike
        out[rows] = _with_sinks(q[rows].transpose(0, 1)[None], keys, keys, mask[None, None], cfg.head_dim ** -0.5,
                                w.sinks[:, None])[0].transpose(0, 1)
    out = rotate(out, cos, -sin)  # undo the rotation the values carried
    return _grouped_output(out.reshape(x.shape[0], -1), w, cfg)
