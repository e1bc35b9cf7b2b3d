"""Two micro-batches ping-ponging through the layers (DeepSeek's dual micro-batch, MegaScale-Infer).

Shapes: T rows, B sequences, D hidden, K top-k.
A step's sequences are split in two micro-batches of about equal tokens, A and B.
Per layer each runs: the MoE output of the layer before (waited for now), attention,
gate, and the submission of this layer's expert rows, in the order

    layer l:  A: finish MoE(l-1) · attention(l) · gate(l) · submit(l)
              B: finish MoE(l-1) · attention(l) · gate(l) · submit(l)

so A's expert calls are in flight during B's half and B's during A's next one: with
remote experts the router is not idle waiting on the network while there is work.
A micro-batch holds whole sequences, so attention never crosses it and the output
is the unsplit batch's up to matmul rounding (other row counts). With one micro-batch
the same loop is the plain layer-by-layer forward.
"""
from __future__ import annotations

import torch
from torch import Tensor

from cluster.model.batch import Batch, split_batch
from cluster.model.moe import MoEInFlight, Routing


class MicroBatch:
    """One micro-batch's state between layers: its hidden rows and its MoE block in flight."""

    def __init__(self, batch: Batch, x: Tensor, rope: tuple[Tensor, Tensor]):
        self.batch, self.x, self.rope = batch, x, rope  # x [T_mb, D]
        self.in_flight: MoEInFlight | None = None
        self.routing: list[Routing] = []


def balanced_cut(batch: Batch) -> int:
    """The first sequence of the second micro-batch: the cut (1 ≤ cut < B) that best evens the tokens."""
    total, before, best = batch.num_tokens, 0, (None, 1)
    for i, c in enumerate(batch.chunks[:-1]):
        before += c.num_tokens
        gap = abs(total - 2 * before)
        if best[0] is None or gap < best[0]:
            best = (gap, i + 1)
    return best[1]


def micro_batches(batch: Batch, x: Tensor, rope: tuple[Tensor, Tensor], split: bool) -> list[MicroBatch]:
    """Two micro-batches when asked and the batch has two sequences or more, else one."""
    if not split or len(batch.chunks) < 2:
        return [MicroBatch(batch, x, rope)]
    first, second = split_batch(batch, balanced_cut(batch))
    t = first.num_tokens
    cos, sin = rope
    return [MicroBatch(first, x[:t], (cos[:t], sin[:t])), MicroBatch(second, x[t:], (cos[t:], sin[t:]))]


def merged(parts: list[MicroBatch]) -> tuple[Tensor, list[Routing]]:
    """Hidden rows [T, D] and per-layer routing [T, K] of the whole batch, in its row order."""
    if len(parts) == 1:
        return parts[0].x, parts[0].routing
    x = torch.cat([p.x for p in parts])  # [T, D]
    routing = [Routing(rs[0].layer, torch.cat([r.ids for r in rs]), torch.cat([r.weights for r in rs]))
               for rs in zip(*(p.routing for p in parts))]
    return x, routing
