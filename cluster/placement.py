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


def round_robin(slots: list[Slot], num_workers: int) -> Placement:
    """One copy of every slot; expert e of every layer goes to worker e % num_workers.

    Keeping an expert id on one worker across layers spreads each layer's
    experts evenly, so every worker gets a share of every layer's tokens.
    """
    if num_workers < 1:
        raise ValueError("num_workers must be ≥ 1")
    workers: list[list[Slot]] = [[] for _ in range(num_workers)]
    for layer, expert_id in slots:
        workers[expert_id % num_workers].append((layer, expert_id))
    return Placement(tuple(tuple(w) for w in workers))
