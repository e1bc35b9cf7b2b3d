"""Turn last-token logits into next tokens: logit shaping, greedy, temperature, top-k, top-p, seeds.

Shapes: V vocab. Order as vLLM applies it: logit_bias → penalties → min_tokens
→ temperature → top-k → top-p. Logprobs are reported from the model's raw
logits (vLLM's default), the choice is made on the shaped ones.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from cluster.engine.params import SamplingParams


@dataclass(frozen=True)
class Sampled:
    token_id: int
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class History:
    """What the penalties and min_tokens look at: the tokens a sequence has seen so far."""

    prompt_ids: Sequence[int]
    output_ids: Sequence[int]
    banned_early: tuple[int, ...] = ()  # EOS and stop ids, masked while output < min_tokens


def shape_logits(logits: Tensor, params: SamplingParams, history: History) -> Tensor:
    """logit_bias, repetition / presence / frequency penalties and min_tokens on one row [V]."""
    logits = logits.clone()
    vocab = logits.shape[-1]
    for token, bias in params.logit_bias:
        if token < vocab:
            logits[token] += bias
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted({*history.prompt_ids, *history.output_ids}), dtype=torch.long)
        seen = seen[seen < vocab]
        values = logits[seen]
        logits[seen] = torch.where(values > 0, values / params.repetition_penalty, values * params.repetition_penalty)
    if (params.presence_penalty or params.frequency_penalty) and history.output_ids:
        counts = torch.bincount(torch.tensor(list(history.output_ids), dtype=torch.long), minlength=vocab)[:vocab]
        logits -= params.frequency_penalty * counts.to(logits.dtype)
        logits -= params.presence_penalty * (counts > 0).to(logits.dtype)
    if len(history.output_ids) < params.min_tokens and history.banned_early:
        banned = torch.tensor([t for t in history.banned_early if t < vocab], dtype=torch.long)
        logits[banned] = float("-inf")
    return logits


def _filter(logits: Tensor, params: SamplingParams) -> Tensor:
    """Temperature, then top-k, then top-p (nucleus) on one row [V].

    The row's maximum is subtracted first: dividing by a tiny temperature then
    sends every other logit to -inf instead of overflowing to inf and NaN.
    """
    logits = (logits - logits.max()) / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, -1)
        drop = probs.cumsum(-1) - probs >= params.top_p  # keep the token that crosses top_p (so ≥ 1 is kept)
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def _draw(logits: Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    probs = torch.softmax(_filter(logits, params), -1)
    if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0:
        return int(torch.argmax(logits))  # nothing left to sample from (all -inf): the best shaped logit
    return int(torch.multinomial(probs, 1, generator=generator))


def top_logprobs(logp: Tensor, n: int) -> tuple[tuple[int, float], ...]:
    if not n:
        return ()
    top = torch.topk(logp, n)
    return tuple(zip(top.indices.tolist(), top.values.tolist()))


def sample_row(logits: Tensor, params: SamplingParams, generator: torch.Generator | None,
               argmax: int | None = None, history: History | None = None) -> Sampled:
    """logits [V] fp32 → the next token (plus logprobs when asked); `argmax` if the caller has it already
    (only used when nothing shapes the logits)."""
    shaped = shape_logits(logits, params, history) if params.shapes_logits and history is not None else None
    choice = logits if shaped is None else shaped
    if params.greedy:
        token = int(torch.argmax(choice)) if argmax is None or shaped is not None else argmax
    else:
        token = _draw(choice, params, generator)
    if params.logprobs is None:
        return Sampled(token)
    logp = torch.log_softmax(logits.float(), -1)
    return Sampled(token, float(logp[token]), top_logprobs(logp, params.logprobs))
