"""Gated DeltaNet linear attention (Qwen3-Next, Qwen3.5/3.6) over a ragged batch.

Per token: q, k, v through a short depthwise causal convolution (silu), q and k L2-normed,
then the gated delta rule on a per-sequence state S [Hv, dk, dv]:
    S ← exp(g) · S;  S ← S + k ⊗ β (v − Sᵀk);  out = Sᵀ q / √dk
with β = sigmoid(b · x) and g = −exp(A_log) · softplus(a · x + dt_bias). The output is
RMS-normed per head, gated by silu(z · x), and projected back.
Prefill chunks run the chunked form (chunks of 64, triangular solves inside each, a scan
across them), decodes the one-token recurrence, batched: the algorithms of transformers'
torch fallbacks (torch_chunk_gated_delta_rule, torch_recurrent_gated_delta_rule). The
convolution's last K-1 inputs and S are kept in the state cache between steps.
Which kernels run the delta rule is a `DeltaRule` (prefill over all of a step's chunks at once, decode
over its decoding sequences): `TORCH_RULE` here, flash-linear-attention's Triton kernels in deltanet_fla.py
(chosen by linear_attention_backend.py). The convolution, gates and norm run in torch either way.
Shapes: T rows, B decoding sequences, N prefill chunks, n a chunk's tokens, P their rows in all,
C = 2·Hk·dk + Hv·dv conv channels.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from cluster.config import ModelConfig
from cluster.model.batch import Batch
from cluster.model.kv_cache import KVCache
from cluster.model.weights import DeltaNetWeights

CHUNK = 64  # transformers' and flash-linear-attention's chunk size
L2_EPS = 1e-6


def _l2norm(x: Tensor) -> Tensor:
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + L2_EPS)


def repeat_heads(t: Tensor, groups: int, dim: int = -2) -> Tensor:
    """t.repeat_interleave(groups, dim) (head h of the result is head h // groups of t), as a broadcast and
    one copy: repeat_interleave builds and scans a repeats tensor first (several ops a call, a layer)."""
    dim = dim % t.dim()
    return t.unsqueeze(dim + 1).expand(*t.shape[:dim + 1], groups, *t.shape[dim + 1:]).flatten(dim, dim + 1)


def causal_conv(x: Tensor, prev: Tensor, weight: Tensor, bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """x [B, C, n], prev [B, C, K-1] (the inputs before x), weight [C, K], bias [C] (Mamba's) → silu(conv)
    [B, C, n] and the new prev (the last K-1 inputs)."""
    full = torch.cat([prev.to(x.dtype), x], dim=-1)
    n, k = x.shape[-1], weight.shape[1]
    # K shifted multiply-adds in fp32 (as conv1d accumulates): a handful of taps, cheaper than conv1d's set-up
    wf, ff = weight.float(), full.float()
    out = sum(ff[..., j:j + n] * wf[:, j, None] for j in range(k))  # [B, C, n]
    out = (out if bias is None else out + bias.float()[:, None]).to(weight.dtype)
    return F.silu(out).to(x.dtype), full[..., -(k - 1):]


def _heads(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor) -> list[Tensor]:
    """[.., n, H*, d] inputs → fp32 [.., H, n, d], q and k repeated over the value heads they serve and
    L2-normed, q scaled by 1/√dk."""
    groups = v.shape[-2] // k.shape[-2]
    if groups > 1:
        q, k = repeat_heads(q, groups), repeat_heads(k, groups)
    q, k, v, beta, g = (t.transpose(-2, -3) if t.dim() == v.dim() else t.transpose(-1, -2)
                        for t in (q, k, v, beta, g))
    q, k, v, beta, g = (t.float().contiguous() for t in (q, k, v, beta, g))
    q, k = _l2norm(q), _l2norm(k)
    return [q * q.shape[-1] ** -0.5, k, v, beta, g]


def chunked_delta_rule(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, state: Tensor,
                       chunk: int = CHUNK) -> tuple[Tensor, Tensor]:
    """One sequence's prefill chunk: q, k [n, Hk, dk], v [n, Hv, dv], g, beta [n, Hv], state [Hv, dk, dv]
    → out [n, Hv, dv] (fp32), the state after the last token."""
    n = q.shape[0]
    q, k, v, beta, g = _heads(q, k, v, beta, g)  # [H, n, d], beta and g [H, n]
    pad = (chunk - n % chunk) % chunk
    q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    beta, g = (F.pad(t, (0, pad)) for t in (beta, g))
    h, chunks = q.shape[0], (n + pad) // chunk
    v_beta, k_beta = v * beta[..., None], k * beta[..., None]
    q, k, k_beta, v_beta = (t.reshape(h, chunks, chunk, t.shape[-1]) for t in (q, k, k_beta, v_beta))
    cum = g.reshape(h, chunks, chunk).cumsum(dim=-1)  # log of the decay from the chunk's start
    upper = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).triu(1)
    pair = (cum[..., :, None] - cum[..., None, :]).masked_fill(upper, float("-inf")).exp()  # decay j → i
    system = (k_beta @ k.transpose(-1, -2)) * pair
    intra = (q @ k.transpose(-1, -2)) * pair
    # the UT transform: all of a chunk's delta-rule writes as two unit-triangular solves
    new_v = torch.linalg.solve_triangular(system, v_beta, upper=False, unitriangular=True)
    k_cum = torch.linalg.solve_triangular(system, k_beta * cum.exp()[..., None], upper=False, unitriangular=True)
    q = q * cum.exp()[..., None]
    k = k * (cum[..., -1:] - cum).exp()[..., None]
    chunk_decay = cum[..., -1].exp()[..., None, None]
    s, out = state.float(), torch.zeros_like(new_v)
    for i in range(chunks):  # the scan: each chunk reads the state the previous ones left
        v_i = new_v[:, i] - k_cum[:, i] @ s
        out[:, i] = q[:, i] @ s + intra[:, i] @ v_i
        s = s * chunk_decay[:, i] + k[:, i].transpose(-1, -2) @ v_i
    return out.reshape(h, -1, out.shape[-1])[:, :n].transpose(0, 1), s


def recurrent_step(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
    """One token of B sequences: q, k [B, Hk, dk], v [B, Hv, dv], g, beta [B, Hv], state [B, Hv, dk, dv]
    → out [B, Hv, dv] (fp32), the new state. The heads as _heads makes them, without its time axis: the same
    values from fewer ops (a decode step runs this once a layer)."""
    groups = v.shape[-2] // k.shape[-2]
    if groups > 1:
        q, k = repeat_heads(q, groups), repeat_heads(k, groups)
    q, k, v, beta, g = (t.float() for t in (q, k, v, beta, g))
    q, k = _l2norm(q) * q.shape[-1] ** -0.5, _l2norm(k)
    s = state.float() * g.exp()[..., None, None]
    delta = (v - (s * k[..., None]).sum(dim=-2)) * beta[..., None]  # what the state does not yet predict
    s = s + k[..., None] * delta[..., None, :]
    return (s * q[..., None]).sum(dim=-2), s


def chunked_prefill(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, states: Tensor,
                    cu_seqlens: Tensor, cu_seqlens_cpu: Tensor) -> tuple[Tensor, Tensor]:
    """N sequences' prefill chunks packed: q, k [P, Hk, dk], v [P, Hv, dv], g, beta [P, Hv], states
    [N, Hv, dk, dv], cu_seqlens [N + 1] (chunk i is rows cu_seqlens[i]:cu_seqlens[i+1]) and the same bounds
    on the host → out [P, Hv, dv] (fp32), the N states after each chunk's last token. One chunked_delta_rule
    a chunk, sliced by the host bounds (the device ones would cost a sync in every layer)."""
    bounds, outs, finals = cu_seqlens_cpu.tolist(), [], []
    for i in range(len(bounds) - 1):
        rows = slice(bounds[i], bounds[i + 1])
        o, s = chunked_delta_rule(q[rows], k[rows], v[rows], g[rows], beta[rows], states[i])
        outs.append(o)
        finals.append(s)
    return torch.cat(outs), torch.stack(finals)


@dataclass(frozen=True)
class DeltaRule:
    """The delta rule's two forms, as one kernel library computes them (q and k before their L2 norm,
    heads as in chunked_prefill and recurrent_step, states [.., Hv, dk, dv] fp32)."""
    name: str
    prefill: Callable[..., tuple[Tensor, Tensor]]  # as chunked_prefill
    decode: Callable[..., tuple[Tensor, Tensor]]  # as recurrent_step


TORCH_RULE = DeltaRule("torch", chunked_prefill, recurrent_step)


def gated_rms_norm(x: Tensor, gate: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x, gate [.., dv]: RMS-normed, weighed, then × silu(gate) in fp32."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return ((weight * xf.to(x.dtype)) * F.silu(gate.float())).to(x.dtype)


def _split(m: Tensor, cfg: ModelConfig) -> tuple[Tensor, Tensor, Tensor]:
    """The conv's output [.., C] → q, k [.., Hk, dk], v [.., Hv, dv]."""
    hk, hv, dk, dv = cfg.linear_num_key_heads, cfg.linear_num_value_heads, cfg.linear_key_head_dim, \
        cfg.linear_value_head_dim
    return (m[..., :hk * dk].unflatten(-1, (hk, dk)), m[..., hk * dk:2 * hk * dk].unflatten(-1, (hk, dk)),
            m[..., 2 * hk * dk:].unflatten(-1, (hv, dv)))


def _prefill(mixed: Tensor, g: Tensor, beta: Tensor, w: DeltaNetWeights, cfg: ModelConfig, layer: int,
             batch: Batch, cache: KVCache, rule: DeltaRule) -> tuple[Tensor, Tensor]:
    """All prefill chunks of the step: each one's conv from its sequence's slot, then the delta rule over
    them in one call; states written back. → out [P, Hv, dv] and its rows in the batch [P]."""
    p = batch.prefill
    conv, s = cache.states.read(layer, p.state_slots, p.fresh)  # [N, C, K-1], [N, Hv, dk, dv]
    convolved, new_conv = [], []
    for i, c in enumerate(batch.prefills):  # the conv per chunk: a handful of taps, each chunk its own history
        m, prev = causal_conv(mixed[c.start:c.start + c.num_tokens].t()[None], conv[i:i + 1], w.conv)  # [1, C, n]
        convolved.append(m[0].t())
        new_conv.append(prev)
    out, s = rule.prefill(*_split(torch.cat(convolved), cfg), g[p.rows], beta[p.rows], s, p.cu_seqlens,
                          p.cu_seqlens_cpu)
    cache.states.write(layer, p.state_slots, torch.cat(new_conv), s)
    return out, p.rows


def _decode(mixed: Tensor, g: Tensor, beta: Tensor, w: DeltaNetWeights, cfg: ModelConfig, layer: int,
            batch: Batch, cache: KVCache, rule: DeltaRule) -> Tensor:
    """The decoding sequences' rows of mixed, g, beta [B, ..] → out [B, Hv, dv]; states read and written."""
    d = batch.decode
    conv, s = cache.states.read(layer, d.state_slots, batch.decode_fresh)
    mixed, conv = causal_conv(mixed[:, :, None], conv, w.conv)  # [B, C, 1]
    o, s = rule.decode(*_split(mixed[:, :, 0], cfg), g, beta, s)
    cache.states.write(layer, d.state_slots, conv, s)
    return o


def gated_deltanet(x: Tensor, w: DeltaNetWeights, cfg: ModelConfig, layer: int, batch: Batch, cache: KVCache,
                   rope: tuple[Tensor, Tensor], rule: DeltaRule = TORCH_RULE) -> Tensor:
    """x [T, D] → [T, D]; reads and writes each sequence's state in cache.states (rope: unused, no positions)."""
    t, hv, dv = x.shape[0], cfg.linear_num_value_heads, cfg.linear_value_head_dim
    mixed = F.linear(x, w.qkv)  # [T, C]
    z = F.linear(x, w.z).view(t, hv, dv)
    beta = torch.sigmoid(F.linear(x, w.b))  # [T, Hv]
    g = -w.a_log.exp() * F.softplus(F.linear(x, w.a).float() + w.dt_bias)  # [T, Hv] log-decay, ≤ 0
    if batch.decode_only:  # the decode group's rows are all rows, in order: no gather, no scatter
        out = _decode(mixed, g, beta, w, cfg, layer, batch, cache, rule).to(x.dtype)
    else:
        out, rows = x.new_empty(t, hv, dv), batch.decode.rows if batch.decode is not None else None
        if rows is not None:
            out[rows] = _decode(mixed[rows], g[rows], beta[rows], w, cfg, layer, batch, cache, rule).to(out.dtype)
        if batch.prefills:
            o, rows = _prefill(mixed, g, beta, w, cfg, layer, batch, cache, rule)
            out[rows] = o.to(out.dtype)
    out = gated_rms_norm(out, z, w.norm, cfg.rms_norm_eps)
    return F.linear(out.reshape(t, hv * dv), w.out)
