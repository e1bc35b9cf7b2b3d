"""Copy choice: which copy of an expert serves which of a layer's rows. Pure, no transport.

Shapes: E experts, rows sorted by expert_id (counts[e] rows for expert e).
Each rule is a named function (like SGLang's expert_location_dispatch):

- `even`: an expert's rows are split evenly among its live copies;
- `least_loaded`: all of an expert's rows go to the copy whose worker has the
  fewest rows so far in this layer (fewer, larger calls).

Either way, copies on the router's own node come first: when an expert has
one there, the others are not used.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

Group = tuple[int, int, int]  # (expert_id, first row, rows)


class NoLiveCopy(RuntimeError):
    """An expert that got rows has no live copy."""

    def __init__(self, layer: int, expert_id: int, holders: tuple[int, ...]):
        super().__init__(f"layer {layer} expert {expert_id}: no live copy (worker(s) {list(holders)} down); "
                         "retry once it is back")
        self.layer, self.expert_id = layer, expert_id


def split(start: int, n: int, parts: int) -> list[tuple[int, int]]:
    """Rows [start, start + n) in `parts` contiguous chunks of near-equal size."""
    sizes = [n // parts + (1 if i < n % parts else 0) for i in range(parts)]
    offsets = [start + sum(sizes[:i]) for i in range(parts)]
    return list(zip(offsets, sizes))


def _even(candidates: list[int], start: int, n: int, rows: dict[int, int]) -> list[tuple[int, int, int]]:
    return [(w, s, k) for w, (s, k) in zip(candidates, split(start, n, len(candidates))) if k]


def _least_loaded(candidates: list[int], start: int, n: int, rows: dict[int, int]) -> list[tuple[int, int, int]]:
    return [(min(candidates, key=lambda w: rows.get(w, 0)), start, n)]


RULES: dict[str, Callable[[list[int], int, int, dict[int, int]], list[tuple[int, int, int]]]] = {
    "even": _even, "least_loaded": _least_loaded}


def choose_copies(layer: int, counts: Sequence[int], copies: Mapping[tuple[int, int], tuple[int, ...]], *,
                  down: set[int], same_node: frozenset[int], rule: str = "even") -> dict[int, list[Group]]:
    """worker -> [(expert_id, first row, rows)] for one layer's rows.

    `copies[(layer, e)]`: workers holding expert e; `down`: workers not to use;
    `same_node`: workers on the router's node. Raises NoLiveCopy when an expert with
    rows has no copy outside `down`.
    """
    pick = RULES[rule]
    groups: dict[int, list[Group]] = {}
    rows: dict[int, int] = {}  # rows given to each worker so far in this layer
    start = 0
    for expert_id, n in enumerate(counts):
        if n:
            holders = copies.get((layer, expert_id), ())
            live = [w for w in holders if w not in down]
            if not live:
                raise NoLiveCopy(layer, expert_id, holders)
            candidates = [w for w in live if w in same_node] or live
            for worker, s, k in pick(candidates, start, n, rows):
                groups.setdefault(worker, []).append((expert_id, s, k))
                rows[worker] = rows.get(worker, 0) + k
            start += n
    return groups
