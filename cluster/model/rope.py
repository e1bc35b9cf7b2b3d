"""Rotary position embeddings with the scaling kinds transformers implements
(modeling_rope_utils.py): default, linear, dynamic (NTK), yarn, llama3, longrope,
on the first `dim` features of each head (partial rotary), and proportional (Gemma 4): the whole head
pairs i with i + dim/2 as default rope does, but only the first `proportion` of the frequencies turn
(exponents over the whole head), the rest are 0.

Shapes: T rows of the batch, P = dim / 2 frequencies.
`dynamic` and `longrope` depend on the sequence length: transformers recomputes
them from the longest position of the forward call, so a sequence's new rows use
frequencies for its own length (cached keys keep the ones they were written
with, as in transformers' cache). Every other kind is one table.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Rope:
    kind: str = "default"  # default | linear | dynamic | yarn | llama3 | longrope | proportional
    theta: float = 10000.0
    dim: int = 0  # rotated features per head (head_dim * partial_rotary_factor)
    max_position_embeddings: int = 4096
    factor: float = 1.0
    original_max: int = 0  # original_max_position_embeddings (yarn, llama3, longrope)
    attention_factor: float | None = None  # scales cos/sin (yarn, longrope); None: derived as transformers does
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    short_mscale: float | None = None  # Phi-3.5-MoE: the cos/sin scale below / above original_max
    long_mscale: float | None = None
    proportion: float = 1.0  # proportional: the share of the dim / 2 frequencies that turn

    @property
    def length_threshold(self) -> int | None:
        """Sequences longer than this get other frequencies (dynamic, longrope); None: never."""
        return {"dynamic": self.max_position_embeddings, "longrope": self.original_max}.get(self.kind)

    def context_limit(self) -> int:
        """Longest context the scaling is meant for (vLLM's rule: yarn extends original_max by factor,
        linear and dynamic extend max_position_embeddings, llama3 and longrope configs already say it)."""
        if self.kind == "yarn":
            return int(self.original_max * self.factor)
        if self.kind in ("linear", "dynamic"):
            return int(self.max_position_embeddings * self.factor)
        return self.max_position_embeddings


def _exponents(dim: int, device=None) -> Tensor:
    return torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim  # [P]


def _yarn(r: Rope) -> Tensor:
    dim, base, factor = r.dim, r.theta, r.factor

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(r.original_max / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(r.beta_fast), correction_dim(r.beta_slow)
    if r.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    high = high + 0.001 if low == high else high  # as transformers: no division by zero
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp
    return (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation


def _llama3(r: Rope) -> Tensor:
    inv = 1.0 / (r.theta ** _exponents(r.dim))
    low_wavelen, high_wavelen = r.original_max / r.low_freq_factor, r.original_max / r.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / r.factor, inv)
    smooth = (r.original_max / wavelen - r.low_freq_factor) / (r.high_freq_factor - r.low_freq_factor)
    smoothed = (1 - smooth) * scaled / r.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def inv_freq(r: Rope, seq_len: int | None = None) -> Tensor:
    """[P] inverse frequencies for a sequence of `seq_len` tokens (None: the table's)."""
    if r.kind == "yarn":
        return _yarn(r)
    if r.kind == "llama3":
        return _llama3(r)
    if r.kind == "longrope":
        long = seq_len is not None and seq_len > r.original_max
        ext = torch.tensor(r.long_factor if long else r.short_factor, dtype=torch.float32)
        return 1.0 / (ext * r.theta ** _exponents(r.dim))
    if r.kind == "proportional":
        turning = int(r.proportion * r.dim // 2)
        inv = 1.0 / (r.theta ** _exponents(r.dim)[:turning])
        return torch.cat([inv, torch.zeros(r.dim // 2 - turning)]) / r.factor
    base = r.theta
    if r.kind == "dynamic":
        n = max(seq_len or 0, r.max_position_embeddings)
        base = base * ((r.factor * n / r.max_position_embeddings) - (r.factor - 1)) ** (r.dim / (r.dim - 2))
    inv = 1.0 / (base ** _exponents(r.dim))
    return inv / r.factor if r.kind == "linear" else inv


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def attention_factor(r: Rope, seq_len: int | None = None) -> float:
    """The scale transformers applies to cos and sin."""
    if r.kind == "longrope" and r.short_mscale is not None:
        long = seq_len is not None and seq_len > r.original_max
        return r.long_mscale if long else r.short_mscale
    if r.attention_factor is not None or r.kind not in ("yarn", "longrope"):
        return 1.0 if r.attention_factor is None else r.attention_factor
    if r.kind == "yarn":
        if r.mscale and r.mscale_all_dim:
            return yarn_mscale(r.factor, r.mscale) / yarn_mscale(r.factor, r.mscale_all_dim)
        return yarn_mscale(r.factor)
    factor = r.max_position_embeddings / r.original_max
    return 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(r.original_max))


def _cos_sin(r: Rope, positions: Tensor, seq_len: int | None) -> tuple[Tensor, Tensor]:
    freqs = positions[:, None].float() * inv_freq(r, seq_len).to(positions.device)[None, :]  # [T, P]
    emb = torch.cat([freqs, freqs], dim=-1)  # [T, dim]
    scale = attention_factor(r, seq_len)
    return emb.cos() * scale, emb.sin() * scale


class Rotary:
    """cos/sin for every position below max_len (rotate-half layout), looked up per batch."""

    def __init__(self, rope: Rope, max_len: int, device: str = "cpu"):
        self.rope = rope
        self.cos, self.sin = _cos_sin(rope, torch.arange(max_len, device=device), None)  # [L, dim]

    def at(self, positions: Tensor, chunks=()) -> tuple[Tensor, Tensor]:
        """cos, sin [T, 1, dim] for the batch rows; `chunks` (start, num_tokens, context_len) let
        length-dependent kinds use each sequence's own length."""
        cos, sin = self.cos[positions], self.sin[positions]  # [T, dim]
        limit = self.rope.length_threshold
        long = [c for c in chunks if limit is not None and c.context_len > limit]
        if long:
            cos, sin = cos.clone(), sin.clone()
            for c in long:
                rows = slice(c.start, c.start + c.num_tokens)
                cos[rows], sin[rows] = _cos_sin(self.rope, positions[rows], c.context_len)
        return cos[:, None, :], sin[:, None, :]


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [T, H, hd]; cos, sin [T, 1, dim]: rotate-half on the first dim features, the rest pass."""
    dim = cos.shape[-1]
    rot, rest = x[..., :dim], x[..., dim:]
    half = dim // 2
    rotated = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
    out = (rot * cos + rotated * sin).to(x.dtype)
    return torch.cat([out, rest], dim=-1) if rest.shape[-1] else out


def rotary_interleaved(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary on interleaved pairs (x0, x1), (x2, x3), ... (DeepSeek); the result is laid out
    [rotated evens, rotated odds]. q and k get the same layout, so scores are as DeepSeek defines."""
    half = x.shape[-1] // 2
    c, s = cos[..., :half], sin[..., :half]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)
