"""Turn last-token logits into next tokens: greedy, temperature, top-k, top-p, seeds.

Shapes: B sequences, V vocab.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from cluster.engine.params import SamplingParams


@dataclass(frozen=True)
class Sampled:
    token_id: int
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()


def _filter(logits: Tensor, params: SamplingParams) -> Tensor:
    """Temperature, then top-k, then top-p (nucleus) on one row [V]."""
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, -1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, -1) >= params.top_p  # keep the token that crosses top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def sample_row(logits: Tensor, params: SamplingParams, generator: torch.Generator | None,
               argmax: int | None = None) -> Sampled:
    """logits [V] fp32 → the next token (plus logprobs when asked); `argmax` if the caller has it already."""
    if params.greedy:
        token = int(torch.argmax(logits)) if argmax is None else argmax
    else:
        probs = torch.softmax(_filter(logits, params), -1)
        token = int(torch.multinomial(probs, 1, generator=generator))
    if params.logprobs is None:
        return Sampled(token)
    logp = torch.log_softmax(logits, -1)
    top = torch.topk(logp, params.logprobs) if params.logprobs else None
    top_pairs = tuple(zip(top.indices.tolist(), top.values.tolist())) if top is not None else ()
    return Sampled(token, float(logp[token]), top_pairs)
