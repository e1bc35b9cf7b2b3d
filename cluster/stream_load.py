"""Stream-loading prefill (issue 23): for one layer of one step, which experts without a fast copy
should have their weights streamed to a fast worker for this step instead of running their rows
on the host tier. Pure, no transport.

Streaming an expert costs its bytes over the host → fast link, then its rows at the fast tier's
speed; leaving it costs its rows at the host tier's speed:

    stream = expert_bytes / link_bytes_per_s + rows × fast_row_s
    host   = rows × host_row_s

so streaming pays from `crossover_rows` = ⌊(expert_bytes / link) / (host_row_s − fast_row_s)⌋ + 1
rows on: a decode step (a few rows per expert) stays on the host, a large prefill (hundreds of rows
on one expert) streams. Past the crossover, an expert streams only when the layer then ends sooner
(a layer waits for its slower tier): a host tier of many workers may finish its rows before a link
could bring the weights. The streamed copy is scratch: it serves this step and is dropped (a
promotion, `cluster.tiers.decide`, is what keeps a copy).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class StreamCosts:
    link_bytes_per_s: float  # host memory → one fast worker (PCIe 4.0 x16 ≈ 25e9)
    fast_row_s: float  # a fast-tier worker's time per row of one expert
    host_row_s: float  # a host-tier worker's time per row of one expert

    def __post_init__(self) -> None:
        for name in ("link_bytes_per_s", "fast_row_s", "host_row_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")

    def link_s(self, expert_bytes: int) -> float:
        return expert_bytes / self.link_bytes_per_s


def crossover_rows(expert_bytes: int, costs: StreamCosts) -> int | None:
    """The fewest rows of one expert for which streaming it is strictly cheaper than the host
    tier; None when it never is (a host row no dearer than a fast row)."""
    saving = costs.host_row_s - costs.fast_row_s
    if saving <= 0:
        return None
    return math.floor(costs.link_s(expert_bytes) / saving) + 1


def stream_set(counts: Sequence[int], fast: frozenset[int], expert_bytes: int, costs: StreamCosts, *,
               max_streams: int, fast_workers: int = 1, host_workers: int = 1) -> frozenset[int]:
    """Expert ids of one layer to stream this step, at most `max_streams` (the fast tier's scratch
    room for one layer), the ones with most rows first (they save the most host time).

    An expert qualifies when it has no fast copy and rows ≥ the crossover (streaming it costs less
    work than leaving it). It is taken when the layer then ends sooner: a layer waits for its slower
    tier, each tier's time its rows spread over its workers (link time on the fast tier's side), so
    when the fast tier is the slower one nothing streams however large the prefill."""
    if fast_workers < 1 or host_workers < 1:
        raise ValueError(f"fast_workers ({fast_workers}) and host_workers ({host_workers}): each tier needs ≥ 1 "
                         "worker for anything to stream")
    least = crossover_rows(expert_bytes, costs)
    if least is None or max_streams <= 0:
        return frozenset()
    fast_s = sum(n for e, n in enumerate(counts) if e in fast) * costs.fast_row_s / fast_workers
    host_s = sum(n for e, n in enumerate(counts) if e not in fast) * costs.host_row_s / host_workers
    chosen: list[int] = []
    worth = sorted((e for e, n in enumerate(counts) if n >= least and e not in fast), key=lambda e: (-counts[e], e))
    for e in worth:
        if len(chosen) == max_streams:
            break
        f = fast_s + (costs.link_s(expert_bytes) + counts[e] * costs.fast_row_s) / fast_workers
        h = host_s - counts[e] * costs.host_row_s / host_workers
        if max(f, h) < max(fast_s, host_s):
            fast_s, host_s = f, h
            chosen.append(e)
    return frozenset(chosen)
