"""Placement: which expert worker holds which (layer, expert_id) slots. Pure, no Ray.

The router reads one `Placement` at a time; a new table replaces the old one
atomically (one reference swap), so a step never sees half a change.
"""
from __future__ import annotations

from dataclasses import dataclass

Slot = tuple[int, int]  # (layer, expert_id)


@dataclass(frozen=True)
class Placement:
    workers: tuple[tuple[Slot, ...], ...]  # workers[w] = slots held by worker w

    @property
    def num_workers(self) -> int:
        return len(self.workers)

    def copies(self) -> dict[Slot, tuple[int, ...]]:
        """Slot -> workers holding a copy of it."""
        out: dict[Slot, list[int]] = {}
        for worker, slots in enumerate(self.workers):
            for slot in slots:
                out.setdefault(slot, []).append(worker)
        return {slot: tuple(ws) for slot, ws in out.items()}

    def check_covers(self, slots: list[Slot]) -> None:
        missing = sorted(set(slots) - set(self.copies()))
        if missing:
            raise ValueError(f"placement leaves {len(missing)} expert slot(s) without a copy, e.g. {missing[:3]}")


def round_robin(slots: list[Slot], num_workers: int, copies: int = 1) -> Placement:
    """`copies` copies of every slot; copy c of expert e (every layer) goes to worker
    (e + c) % num_workers, so copies of one expert are always on different workers.

    Keeping an expert id on one worker across layers spreads each layer's
    experts evenly, so every worker gets a share of every layer's tokens.
    More than one copy lets a worker fail without failing a request.
    """
    if num_workers < 1:
        raise ValueError("num_workers must be ≥ 1")
    if not 1 <= copies <= num_workers:
        raise ValueError(f"copies must be between 1 and num_workers ({num_workers}), got {copies}")
    workers: list[list[Slot]] = [[] for _ in range(num_workers)]
    for layer, expert_id in slots:
        for c in range(copies):
            workers[(expert_id + c) % num_workers].append((layer, expert_id))
    return Placement(tuple(tuple(w) for w in workers))
