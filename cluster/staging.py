"""Moving copies in bounded chunks: from one placement table to another through intermediate
tables, each able to serve traffic on its own. Pure, no Ray.

Between consecutive tables T(k-1) → T(k) the caller has workers load the copies T(k) adds,
switches the routers to T(k), waits for in-flight calls to drain, then retires the copies
T(k) drops. Every table holds a copy of every expert, so a call in flight never loses its
copy; an expert's old copies are retired only in the stage that finishes loading its new
ones (adds before retires). Copies of experts that gain no new copy anywhere are retired
in a first stage of their own, so memory is freed before anything loads.

A stage loads at most `max_copies` copies, at most `max_bytes` bytes (`expert_bytes` per
copy) and, with `by_layer`, copies of one layer only. While stage k loads, a worker holds
its copies in T(k-1) plus what stage k adds to it.
"""
from __future__ import annotations

from cluster.placement import Expert, Placement

Copy = tuple[int, Expert]  # (worker, (layer, expert_id))


def changes(old: Placement, new: Placement) -> tuple[list[list[Expert]], list[list[Expert]]]:
    """Per worker: the copies `new` adds and the copies it drops, for max(old, new) workers."""
    n = max(old.num_workers, new.num_workers)
    before = [set(old.workers[w]) if w < old.num_workers else set() for w in range(n)]
    after = [set(new.workers[w]) if w < new.num_workers else set() for w in range(n)]
    return [sorted(a - b) for a, b in zip(after, before)], [sorted(b - a) for a, b in zip(after, before)]


def _per_stage(max_copies: int | None, max_bytes: int | None, expert_bytes: int) -> int | None:
    limits = [] if max_copies is None else [max_copies]
    if max_bytes is not None:
        if expert_bytes <= 0:
            raise ValueError("max_bytes needs expert_bytes (bytes of one copy)")
        limits.append(max_bytes // expert_bytes)
    if limits and min(limits) < 1:
        raise ValueError(f"a stage must be able to load one copy: max_copies={max_copies}, "
                         f"max_bytes={max_bytes}, expert_bytes={expert_bytes}")
    return min(limits) if limits else None


def _stages(old: Placement, new: Placement, per_stage: int | None, by_layer: bool):
    """[(adds, drops)] per stage, each a list of copies."""
    before, after = old.copies(), new.copies()
    missing = sorted(set(before) - set(after))
    if missing:
        raise ValueError(f"the new placement leaves {len(missing)} expert(s) without a copy, e.g. {missing[:3]}")
    freed: list[Copy] = []  # copies of experts that gain no new copy: their own first stage
    stages: list[tuple[list[Copy], list[Copy]]] = [([], [])]
    for expert in sorted(after):
        adds = [(w, expert) for w in sorted(set(after[expert]) - set(before.get(expert, ())))]
        drops = [(w, expert) for w in sorted(set(before.get(expert, ())) - set(after[expert]))]
        if not adds:
            freed.extend(drops)
            continue
        for copy in adds:
            current = stages[-1][0]
            full = per_stage is not None and len(current) >= per_stage
            if current and (full or (by_layer and current[-1][1][0] != expert[0])):
                stages.append(([], []))
            stages[-1][0].append(copy)
        stages[-1][1].extend(drops)  # the expert's last new copy is in this stage
    return ([([], freed)] if freed else []) + [s for s in stages if s[0]]


def stage_moves(*, old: Placement, new: Placement, max_copies: int | None = None, max_bytes: int | None = None,
                expert_bytes: int = 0, by_layer: bool = False) -> list[Placement]:
    """The tables to switch through, in order, from `old` to `new`: the last one holds what `new`
    holds, on as many workers as the larger of the two; [] when nothing changes.

    old, new: placement tables (new must hold a copy of every expert old holds);
    max_copies: most copies loaded per stage; max_bytes: most bytes loaded per stage, with
    expert_bytes per copy; by_layer: one layer per stage. Raises ValueError when a stage could
    not load even one copy or when `new` drops an expert.
    """
    per_stage = _per_stage(max_copies, max_bytes, expert_bytes)
    n = max(old.num_workers, new.num_workers)
    held = {(w, e) for w, experts in enumerate(old.workers) for e in experts}
    tables = []
    for adds, drops in _stages(old, new, per_stage, by_layer):
        held = (held | set(adds)) - set(drops)
        workers: list[list[Expert]] = [[] for _ in range(n)]
        for w, expert in held:
            workers[w].append(expert)
        tables.append(Placement(tuple(tuple(sorted(s)) for s in workers)))
    return tables
