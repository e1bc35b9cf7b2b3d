"""Placement: which expert worker holds which experts. Pure, no Ray.

Names (expert, copy, worker, slot, placement, placement table, table version,
generation) are defined once, with examples, in docs/glossary.md.

A router reads one table at a time; a new table replaces the old one
atomically (one reference swap), so a step never sees half a change.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

Expert = tuple[int, int]  # (layer, expert_id)


@dataclass(frozen=True)
class Placement:
    workers: tuple[tuple[Expert, ...], ...]  # workers[w] = experts worker w holds a copy of

    @property
    def num_workers(self) -> int:
        return len(self.workers)

    def copies(self) -> dict[Expert, tuple[int, ...]]:
        """Expert -> workers holding a copy of it."""
        out: dict[Expert, list[int]] = {}
        for worker, experts in enumerate(self.workers):
            for expert in experts:
                out.setdefault(expert, []).append(worker)
        return {expert: tuple(ws) for expert, ws in out.items()}

    def check_covers(self, experts: list[Expert]) -> None:
        missing = sorted(set(experts) - set(self.copies()))
        if missing:
            raise ValueError(f"placement leaves {len(missing)} expert(s) without a copy, e.g. {missing[:3]}")

    def with_worker(self) -> "Placement":
        """One more worker, empty (a pool worker joining)."""
        return Placement(self.workers + ((),))


@dataclass(frozen=True)
class WorkerRef:
    """Where a worker is and which incarnation of it the table means."""

    address: str  # data-plane address, host:port (gRPC: other nodes, and Load / Retire / Health)
    node_id: str = ""  # Ray node: routers prefer copies on their own node
    generation: int = 0  # bumped by the controller each time it heals the worker
    retired: bool = False  # a pool worker that left: holds nothing, counted nowhere
    local_socket: str = ""  # Unix socket of the same-node transports (shm, cuda_ipc); "" = gRPC only
    device: str = ""  # where the worker computes ("cpu", "cuda"): cuda_ipc needs a GPU on both sides
    tier: str = ""  # expert tier ("fast", "host"; cluster.tiers); "" = untiered: copies weigh alike


@dataclass(frozen=True)
class Table:
    """The placement table: what routers route by. Immutable; a change is a new version."""

    version: int
    placement: Placement
    workers: tuple[WorkerRef, ...]

    def __post_init__(self) -> None:
        if len(self.workers) != self.placement.num_workers:
            raise ValueError(f"table v{self.version}: {len(self.workers)} worker refs for "
                             f"{self.placement.num_workers} workers in the placement")

    def active(self) -> list[int]:
        return [w for w, ref in enumerate(self.workers) if not ref.retired]

    def changed(self, placement: Placement | None = None, workers: tuple[WorkerRef, ...] | None = None) -> "Table":
        """The next version with a new placement and/or worker refs."""
        return replace(self, version=self.version + 1, placement=placement or self.placement,
                       workers=workers if workers is not None else self.workers)


def round_robin(experts: list[Expert], num_workers: int, copies: int = 1) -> Placement:
    """`copies` copies of every expert; copy c of expert e (every layer) goes to worker
    (e + c) % num_workers, so copies of one expert are always on different workers.

    Keeping an expert id on one worker across layers spreads each layer's
    experts evenly, so every worker gets a share of every layer's tokens.
    More than one copy lets a worker fail without failing a request.
    """
    if num_workers < 1:
        raise ValueError("num_workers must be ≥ 1")
    if not 1 <= copies <= num_workers:
        raise ValueError(f"copies must be between 1 and num_workers ({num_workers}), got {copies}")
    workers: list[list[Expert]] = [[] for _ in range(num_workers)]
    for layer, expert_id in experts:
        for c in range(copies):
            workers[(expert_id + c) % num_workers].append((layer, expert_id))
    return Placement(tuple(tuple(w) for w in workers))
