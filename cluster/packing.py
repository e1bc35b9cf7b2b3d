"""Packing expert copies into bins (workers, or nodes): balanced, within capacity. Pure, no Ray.

Shapes: E experts of one layer, B bins. A bin holds at most `cap[b]` copies and at
most `limit[b]` copies of one expert (1 for a worker: two copies of one expert on
one worker would be wasted memory; a node's limit is its number of workers).

`Packing.place` is greedy (heaviest copy first → the least-loaded bin with room),
preferring a bin that already holds the copy (`sticky`, fewer weight moves) or one
holding experts often chosen together with it (`affinity`), as long as that bin
stays under `target`. When no bin with room may take a copy, a repair step moves
copies of other experts along a chain of bins until a slot frees up (an
augmenting path, as in bipartite matching): if a placement of the copy counts
exists at all (`fits`), the packer finds one.
"""
from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Sequence

import numpy as np


def copy_order(loads: np.ndarray, extra: int, max_copies: int, base: int = 1) -> np.ndarray:
    """[E] loads → the experts receiving extra copies beyond `base` each, in the order DeepSeek EPLB's
    greedy gives them (highest load per copy first; ties: fewer copies, then lower id); at most
    `max_copies` copies of one expert, so the result may be shorter than `extra`. Prefix m of it =
    m extras."""
    copies = [base] * len(loads)
    heap = [(-float(load) / base, base, e) for e, load in enumerate(loads)] if max_copies > base else []
    heapq.heapify(heap)
    order: list[int] = []
    while heap and len(order) < extra:
        _, _, e = heapq.heappop(heap)
        copies[e] += 1
        order.append(e)
        if copies[e] < max_copies:
            heapq.heappush(heap, (-float(loads[e]) / copies[e], copies[e], e))
    return np.array(order, dtype=np.int64)


def copy_counts(num_experts: int, order: np.ndarray, extra: int, base: int = 1) -> np.ndarray:
    """[E] copies per expert: `base` each, with the first `extra` entries of `copy_order` added."""
    return base + np.bincount(order[:extra], minlength=num_experts).astype(np.int64)


def fits(copies: np.ndarray, caps: np.ndarray) -> bool:
    """Can `copies[e]` copies of each expert go onto bins of capacity `caps[b]`, no two copies of
    one expert in one bin? (Gale–Ryser: for every a, the a largest counts sum to at most
    Σ_b min(caps[b], a).)"""
    need = np.cumsum(np.sort(copies)[::-1])  # [E]
    k = np.sort(np.asarray(caps, dtype=np.int64))
    a = np.arange(1, len(need) + 1)
    below = np.searchsorted(k, a, side="left")  # bins with cap < a
    room = np.concatenate([[0], np.cumsum(k)])[below] + a * (len(k) - below)
    return bool(np.all(need <= room))


def items(copies: np.ndarray, per_copy: np.ndarray) -> list[int]:
    """Copies as a list of expert ids, heaviest copy first (copies of one expert together)."""
    order = np.lexsort((np.arange(len(copies)), -per_copy))
    return np.repeat(order, copies[order]).tolist()


class Packing:
    """Mutable packing state of one layer. `where[e]`: bins holding a copy of e.

    cap [B]: copies a bin may hold; limit [B]: copies of one expert a bin may hold (default 1);
    per_copy [E]: load of one copy of each expert; scale [B]: a bin's share of the load
    (its number of workers; default 1): bins are compared by load / scale.
    """

    def __init__(self, cap: Sequence[int], per_copy: np.ndarray, limit: Sequence[int] | None = None,
                 scale: Sequence[float] | None = None):
        self.cap, self.per_copy = [int(c) for c in cap], [float(x) for x in per_copy]
        self.limit = [1] * len(self.cap) if limit is None else [int(x) for x in limit]
        self.scale = [1.0] * len(self.cap) if scale is None else [float(s) for s in scale]
        self.inv = [1.0 / s for s in self.scale]
        self.load = [0.0] * len(self.cap)
        self.count = [0] * len(self.cap)
        self.held: list[dict[int, int]] = [{} for _ in self.cap]
        self.where: dict[int, list[int]] = {}

    def _open(self, b: int, e: int) -> bool:
        return self.count[b] < self.cap[b] and self.held[b].get(e, 0) < self.limit[b]

    def _put(self, e: int, b: int) -> None:
        self.load[b] += self.per_copy[e]
        held = self.held[b]
        held[e] = held.get(e, 0) + 1
        self.count[b] += 1
        self.where.setdefault(e, []).append(b)

    def _take(self, e: int, b: int) -> None:
        self.load[b] -= self.per_copy[e]
        self.held[b][e] -= 1
        self.count[b] -= 1
        if not self.held[b][e]:
            del self.held[b][e]
        self.where[e].remove(b)

    def place(self, experts: list[int], bins: Sequence[int], sticky: dict[int, Sequence[int]] | None = None,
              target: float = float("inf"), affinity: np.ndarray | None = None) -> list[int]:
        """Place copies (`experts`, one id per copy, heaviest first) into `bins`.
        `sticky[e]`: bins that hold e now; `affinity [E, E]`: how often two experts are
        chosen together; `target`: most load (per unit of scale) a preferred bin may reach.
        Returns the copies that found no place: none whenever these copies, with those placed
        before, fit into these bins (e.g. whenever `fits` holds and `bins` are all bins)."""
        heap = [(self.load[b] * self.inv[b], b) for b in bins if self.cap[b] > 0]
        heapq.heapify(heap)
        left: list[int] = []
        allowed, sticky = set(bins), sticky or {}
        load, inv, count, cap, held, limit = self.load, self.inv, self.count, self.cap, self.held, self.limit
        for e in experts:
            b = None
            if e in sticky or affinity is not None:
                b = self._preferred(e, allowed, sticky, target, affinity)
            elif heap:  # fast path: the lightest bin is current, has room and may take e
                key, top = heap[0]
                if key == load[top] * inv[top] and count[top] < cap[top] and held[top].get(e, 0) < limit[top]:
                    self._put(e, top)
                    heapq.heapreplace(heap, (load[top] * inv[top], top))
                    continue
            if b is None:
                b = self._least(e, heap)
            if b is None:
                b = self._augment(e, bins, heap)
            if b is None:
                left.append(e)
                continue
            self._put(e, b)
            heapq.heappush(heap, (self.load[b] * self.inv[b], b))
        return left

    def _under(self, b: int, e: int, target: float) -> bool:
        return self._open(b, e) and self.load[b] + self.per_copy[e] <= target * self.scale[b]

    def _preferred(self, e: int, allowed: set[int], sticky: dict[int, Sequence[int]], target: float,
                   affinity: np.ndarray | None) -> int | None:
        choice = next((b for b in sticky.get(e, ()) if b in allowed and self._under(b, e, target)), None)
        if choice is not None or affinity is None:
            return choice
        fits_ = [b for b in allowed if self._under(b, e, target)]
        if not fits_:
            return None
        return max(fits_, key=lambda b: (float(affinity[e, list(self.held[b])].sum()), -self.load[b]))

    def _least(self, e: int, heap: list[tuple[float, int]]) -> int | None:
        """The least-loaded bin with room that may take another copy of e. Full bins leave the
        heap for good (a bin's count never drops during `place`)."""
        skipped, choice = [], None
        load, inv, count, cap = self.load, self.inv, self.count, self.cap
        while heap:
            key, b = heapq.heappop(heap)
            if key != load[b] * inv[b] or count[b] >= cap[b]:
                continue  # stale entry or full bin
            if e not in self.held[b] or self.held[b][e] < self.limit[b]:
                choice = b
                break
            skipped.append((key, b))
        for entry in skipped:
            heapq.heappush(heap, entry)
        return choice

    def _augment(self, e: int, bins: Sequence[int], heap: list[tuple[float, int]]) -> int | None:
        """Every bin with room is at its limit for e: find bins b0 → b1 → … → bk where b0 may take e,
        each b(i) hands a copy of some expert to b(i+1), and bk has room; shift those copies along
        and return b0, which now has room for e. None when no such chain exists."""
        roots = [b for b in bins if self.cap[b] > 0 and self.held[b].get(e, 0) < self.limit[b]]
        parent: dict[int, tuple[int, int] | None] = {b: None for b in roots}
        queue = deque(roots)
        while queue:
            b = queue.popleft()
            if self.count[b] < self.cap[b]:
                return self._shift(b, parent, heap)
            for x in list(self.held[b]):
                for nxt in bins:
                    if nxt not in parent and self.cap[nxt] > 0 and self.held[nxt].get(x, 0) < self.limit[nxt]:
                        parent[nxt] = (b, x)
                        queue.append(nxt)
        return None

    def _shift(self, end: int, parent: dict[int, tuple[int, int] | None], heap: list) -> int:
        b, path = end, [end]
        while parent[b] is not None:
            prev, x = parent[b]
            self._take(x, prev)
            self._put(x, b)
            b = prev
            path.append(b)
        for p in path:
            heapq.heappush(heap, (self.load[p] * self.inv[p], p))
        return b
