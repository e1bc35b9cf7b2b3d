"""The Mamba-1 mixer (Jamba) over a ragged batch.

Per token: x (half of in_proj) through a short depthwise causal convolution (with a bias, silu); from it
x_proj gives a low-rank step dt_r and the input-dependent B and C [N], each RMS-normed (Jamba's dt / B / C
norms); dt = softplus(dt_proj · dt_r + dt_bias) per channel. Each of the I channels keeps a state s [N]:
    s ← exp(dt · A) · s + dt · x · B;  y = s · C + D · x
with A = −exp(A_log) [I, N]; the output is gated by silu(z) (the other half of in_proj) and projected back.
Prefill runs the scan in chunks of l tokens (`chunked_selective_scan`): within a chunk, a parallel prefix scan
(log2 l doubling steps over all tokens at once) composes the steps s ← p · s + w, giving every token's state
from zero and its decay from the chunk's start; the state carried in is added decayed, and only the state passes
between chunks. Not Mamba-2's segment sums: Mamba-1's decay differs per (channel, state), so their [l, l] decay
matrix would cost l²·I·N a chunk (tried: 30x slower than the loop, tiny config on CPU); the doubling costs l·log2(l)·I·N, multiplies
decays ≤ 1 only (no exp of a positive sum to overflow). Decode runs the recurrence (`selective_scan`), batched.
The convolution's last K-1 inputs and s are kept in the state cache between steps.
Shapes: T rows, B decoding sequences, n a chunk's tokens, I channels, N state size, R the dt rank.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from cluster.config import ModelConfig
from cluster.model.batch import Batch, one_chunk
from cluster.model.deltanet import causal_conv
from cluster.model.kv_cache import KVCache
from cluster.model.layers import rms_norm
from cluster.model.weights import MambaWeights


def selective_scan(x: Tensor, dt: Tensor, a: Tensor, b: Tensor, c: Tensor, d: Tensor,
                   state: Tensor) -> tuple[Tensor, Tensor]:
    """The recurrence, token by token: x, dt [n, ..., I] (dt after softplus), a [I, N], b, c [n, ..., N], d [I],
    state [..., I, N] → y [n, ..., I] (fp32, before the gate) and the state after the last token. Decode runs it
    with n = 1 and a batch dimension (one step); prefill runs `chunked_selective_scan`, its equal."""
    xf, dt = x.float(), dt.float()
    decay = (dt[..., None] * a.float()).exp()  # [n, ..., I, N]
    writes = (dt * xf)[..., None] * b.float()[..., None, :]  # [n, ..., I, N]
    s, ys = state.float(), []
    for t in range(x.shape[0]):  # the recurrence, one token at a time
        s = decay[t] * s + writes[t]
        ys.append((s * c[t].float()[..., None, :]).sum(-1))
    return torch.stack(ys) + d.float() * xf, s


# The chunk, measured (docs/benchmarks.md, bench/mamba1_scan_bench.py). On CPU the doubling pays while a chunk's
# [l, I, N] states stay in cache (_CPU_CHUNK_ELEMENTS floats: l = 32 for the tiny configs, 2x the loop); a chunk
# spilling it loses to the loop, which re-reads one cached [I, N] state per token (Jamba-1.5, I·N = 2^17: l = 128
# ran 5x slower than the loop, l = 2 on a par). On a GPU the loop is launch-bound: l = 128 ran 5x (Jamba-1.5's
# sizes) to 11x (tiny) faster; longer chunks gained little more, so 128 bounds the states' memory (256 MiB there).
_CPU_CHUNK_ELEMENTS = 1 << 16
_GPU_CHUNK = 128


def scan_chunk(channels: int, state_size: int, device: torch.device) -> int:
    """Prefill's chunk: 128 on a GPU; on CPU the longest power of two (2 to 64) whose states fit in cache."""
    if device.type != "cpu":
        return _GPU_CHUNK
    chunk = 64
    while chunk > 2 and chunk * channels * state_size > _CPU_CHUNK_ELEMENTS:
        chunk //= 2
    return chunk


def chunked_selective_scan(x: Tensor, dt: Tensor, a: Tensor, b: Tensor, c: Tensor, d: Tensor, state: Tensor,
                           chunk: int) -> tuple[Tensor, Tensor]:
    """One sequence's prefill: x, dt [n, I] (dt after softplus), a [I, N], b, c [n, N], d [I], state [I, N] →
    y [n, I] (fp32, before the gate) and the state after the last token; equals `selective_scan`."""
    xf, dt, a, s = x.float(), dt.float(), a.float(), state.float()
    u, b, ys = dt * xf, b.float(), []  # u: each token's write before B
    for start in range(0, x.shape[0], chunk):  # the state is all that passes between chunks
        piece = slice(start, start + chunk)  # [l, I, N] tensors made per chunk: memory bounded by l, not n
        w, p = u[piece, :, None] * b[piece, None, :], (dt[piece, :, None] * a).exp()
        step = 1
        while step < w.shape[0]:  # after it: w[t] = the state at t from zero, p[t] = the decay from the start to t
            w[step:] = w[step:] + p[step:] * w[:-step]  # the right side is computed whole before the copy
            p[step:] = p[step:] * p[:-step]
            step *= 2
        states = w + p * s  # [l, I, N], the carried state decayed to each token
        ys.append(torch.einsum("tin,tn->ti", states, c[piece].float()))
        s = states[-1]
    return torch.cat(ys) + d.float() * xf, s


def _ssm_inputs(xc: Tensor, w: MambaWeights, cfg: ModelConfig) -> tuple[Tensor, Tensor, Tensor]:
    """The convolved x [T, I] → dt [T, I] (after softplus), B and C [T, N]."""
    r, n = cfg.ssm_dt_rank, cfg.ssm_state_size
    dt_r, b, c = F.linear(xc, w.x_proj).split([r, n, n], dim=-1)
    eps = cfg.rms_norm_eps
    dt_r, b, c = rms_norm(dt_r, w.dt_norm, eps), rms_norm(b, w.b_norm, eps), rms_norm(c, w.c_norm, eps)
    return F.softplus(F.linear(dt_r, w.dt_proj).float() + w.dt_bias), b, c


def mamba(x: Tensor, w: MambaWeights, cfg: ModelConfig, layer: int, batch: Batch, cache: KVCache,
          rope: tuple[Tensor, Tensor]) -> Tensor:
    """x [T, D] → [T, D]; reads and writes each sequence's state in cache.states (rope: unused, no positions)."""
    states, a = cache.states, -w.a_log.float().exp()
    xs, z = F.linear(x, w.x), F.linear(x, w.z)  # [T, I] each
    y = x.new_empty(xs.shape)
    dec, chunk = batch.decode, scan_chunk(*a.shape, x.device)
    if dec is not None:
        rows = slice(None) if batch.decode_only else dec.rows  # a decode-only step: all rows, no gather
        conv, s = states.read(layer, dec.state_slots, batch.decode_fresh)
        xc, conv = causal_conv(xs[rows][:, :, None], conv, w.conv, w.conv_bias)  # [B, I, 1]
        xc = xc[:, :, 0]
        dt, b, c = _ssm_inputs(xc, w, cfg)
        o, s = selective_scan(xc[None], dt[None], a, b[None], c[None], w.d, s)
        states.write(layer, dec.state_slots, conv, s)
        y[rows] = o[0].to(y.dtype)
    for i, ch in enumerate(batch.prefills):  # each chunk scans from its own state: a loop over chunks
        rows, (slot, fresh) = slice(ch.start, ch.start + ch.num_tokens), one_chunk(batch.prefill, i)
        conv, s = states.read(layer, slot, fresh)
        xc, conv = causal_conv(xs[rows].t()[None], conv, w.conv, w.conv_bias)  # [1, I, n]
        xc = xc[0].t()
        dt, b, c = _ssm_inputs(xc, w, cfg)
        o, s = chunked_selective_scan(xc, dt, a, b, c, w.d, s[0], chunk)
        states.write(layer, slot, conv, s[None])
        y[rows] = o.to(y.dtype)
    return F.linear((y.float() * F.silu(z.float())).to(x.dtype), w.out)
