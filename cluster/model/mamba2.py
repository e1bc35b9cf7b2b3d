"""The Mamba-2 mixer (Nemotron-H / Nemotron 3, Granite 4.0-H) over a ragged batch.

Per token: x, B, C through a short depthwise causal convolution (with a bias, silu), then per head h a
selective state space on a per-sequence state S [H, P, N]:
    dt = softplus(dt_in + dt_bias);  S ← exp(dt · A) · S + dt · x ⊗ B;  y = S · C + D · x
with A = −exp(A_log) and B, C shared by the heads of a group. The output is gated by silu(z), RMS-normed
per group of channels, and projected back.
Prefill chunks run the chunked (state space duality) form: within a chunk a masked, decayed C·Bᵀ
product, across chunks a scan of the state; decodes the one-token recurrence, batched: the
algorithms of transformers' torch fallbacks (`mamba2_chunk_scan` with its segment sums,
`mamba2_selective_state_update`). As there, dt is clamped to the config's limits in the chunked form
only. The convolution's last K-1 inputs and S are kept in the state cache between steps.
Shapes: T rows, B decoding sequences, n a chunk's tokens, H heads of P, G groups, N state size,
I = H·P, C = I + 2·G·N conv channels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from cluster.config import ModelConfig
from cluster.model.batch import Batch, one_chunk
from cluster.model.deltanet import causal_conv, repeat_heads
from cluster.model.kv_cache import KVCache
from cluster.model.weights import Mamba2Weights


def _segment_sum(a: Tensor) -> Tensor:
    """a [.., l] → [.., l, l]: entry (i, j) = a[j+1] + ... + a[i] for j ≤ i (the log-decay from j to i),
    −inf above the diagonal."""
    cum = a.cumsum(-1)
    seg = cum[..., :, None] - cum[..., None, :]
    upper = torch.ones(a.shape[-1], a.shape[-1], dtype=torch.bool, device=a.device).triu(1)
    return seg.masked_fill(upper, float("-inf"))


def chunked_scan(x: Tensor, dt: Tensor, a: Tensor, b: Tensor, c: Tensor, d: Tensor, state: Tensor,
                 chunk: int) -> tuple[Tensor, Tensor]:
    """One sequence's prefill chunk: x [n, H, P], dt [n, H] (after softplus), a [H] (negative), b, c [n, G, N],
    d [H], state [H, P, N] → y [n, H, P] (fp32), the state after the last token."""
    n, h = x.shape[:2]
    heads_per_group = h // b.shape[1]
    b, c = (repeat_heads(t.float(), heads_per_group, dim=1) for t in (b, c))  # [n, H, N]
    xf, dt = x.float(), dt.float()
    skip = d.float()[:, None] * xf  # [n, H, P]
    pad = (chunk - n % chunk) % chunk
    xs, b, c = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (xf * dt[..., None], b, c))
    da = F.pad(dt * a.float(), (0, 0, 0, pad))  # [n', H] log-decay of each step
    chunks = (n + pad) // chunk
    xs, b, c = (t.reshape(chunks, chunk, *t.shape[1:]) for t in (xs, b, c))  # [c, l, H, .]
    da = da.reshape(chunks, chunk, h).permute(2, 0, 1)  # [H, c, l]
    cum = da.cumsum(-1)
    decay = _segment_sum(da).exp()  # [H, c, l, s]
    scores = torch.einsum("clhn,cshn->hcls", c, b) * decay  # within a chunk: token s's write read by token l
    y = torch.einsum("hcls,cshp->clhp", scores, xs)
    to_end = (cum[..., -1:] - cum).exp()  # [H, c, l] decay from each token to its chunk's end
    writes = torch.einsum("clhn,hcl,clhp->chpn", b, to_end, xs)  # what each chunk adds to the state
    from_start = cum.exp()  # decay from the chunk's start to each token
    s, outs = state.float(), []
    for i in range(chunks):  # the scan: each chunk reads the state the previous ones left
        outs.append(torch.einsum("lhn,hpn,hl->lhp", c[i], s, from_start[:, i]))
        s = s * cum[:, i, -1].exp()[:, None, None] + writes[i]
    y = y + torch.stack(outs)
    return y.reshape(-1, h, x.shape[-1])[:n] + skip, s


def recurrent_step(x: Tensor, dt: Tensor, a: Tensor, b: Tensor, c: Tensor, d: Tensor,
                   state: Tensor) -> tuple[Tensor, Tensor]:
    """One token of B sequences: x [B, H, P], dt [B, H] (after softplus), b, c [B, G, N], state [B, H, P, N]
    → y [B, H, P] (fp32), the new state."""
    heads_per_group = x.shape[1] // b.shape[1]
    b, c = (repeat_heads(t.float(), heads_per_group, dim=1) for t in (b, c))  # [B, H, N]
    xf, dt = x.float(), dt.float()
    s = state.float() * (dt * a.float()).exp()[..., None, None] + (dt[..., None] * xf)[..., None] * b[:, :, None]
    return (s * c[:, :, None]).sum(-1) + d.float()[:, None] * xf, s


def gated_group_norm(y: Tensor, gate: Tensor, weight: Tensor, groups: int, eps: float) -> Tensor:
    """y, gate [T, I]: y × silu(gate) in fp32, RMS-normed within each of `groups` channel groups, weighed."""
    g = (y.float() * F.silu(gate.float())).unflatten(-1, (groups, -1))
    g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + eps)
    return weight * g.flatten(-2).to(y.dtype)


def mamba2(x: Tensor, w: Mamba2Weights, cfg: ModelConfig, layer: int, batch: Batch, cache: KVCache,
           rope: tuple[Tensor, Tensor]) -> Tensor:
    """x [T, D] → [T, D]; reads and writes each sequence's state in cache.states (rope: unused, no positions)."""
    t, h, p, g, n = x.shape[0], cfg.ssm_heads, cfg.ssm_head_dim, cfg.ssm_groups, cfg.ssm_state_size
    states, a = cache.states, -w.a_log.float().exp()
    xbc = F.linear(x, w.xbc)  # [T, C]
    dt_in = F.linear(x, w.dt).float() + w.dt_bias  # [T, H]
    split = lambda m: (m[..., :h * p].unflatten(-1, (h, p)),  # noqa: E731  (x, B, C of the conv's output)
                       m[..., h * p:h * p + g * n].unflatten(-1, (g, n)), m[..., h * p + g * n:].unflatten(-1, (g, n)))
    y = x.new_empty(t, h, p, dtype=torch.float32)  # fp32 up to the norm, as transformers keeps the scan's output
    dec = batch.decode
    if dec is not None:
        rows = slice(None) if batch.decode_only else dec.rows  # a decode-only step: all rows, no gather
        conv, s = states.read(layer, dec.state_slots, batch.decode_fresh)
        xbc_d, conv = causal_conv(xbc[rows][:, :, None], conv, w.conv, w.conv_bias)  # [B, C, 1]
        xs, b, c = split(xbc_d[:, :, 0])
        o, s = recurrent_step(xs, F.softplus(dt_in[rows]), a, b, c, w.d, s)
        states.write(layer, dec.state_slots, conv, s)
        y[rows] = o
    for i, ch in enumerate(batch.prefills):  # each chunk scans from its own state: a loop over chunks
        rows, (slot, fresh) = slice(ch.start, ch.start + ch.num_tokens), one_chunk(batch.prefill, i)
        conv, s = states.read(layer, slot, fresh)
        xbc_c, conv = causal_conv(xbc[rows].t()[None], conv, w.conv, w.conv_bias)  # [1, C, n]
        xs, b, c = split(xbc_c[0].t())
        dt = F.softplus(dt_in[rows]).clamp(cfg.ssm_dt_min, cfg.ssm_dt_max)
        o, s = chunked_scan(xs, dt, a, b, c, w.d, s[0], cfg.ssm_chunk)
        states.write(layer, slot, conv, s[None])
        y[rows] = o
    out = gated_group_norm(y.reshape(t, h * p), F.linear(x, w.z), w.norm, g, cfg.rms_norm_eps)
    return F.linear(out.to(x.dtype), w.out)
