"""Expert tiers in the application's YAML: worker groups of different kinds (issue 23).

    tiers:
      - name: fast                 # accelerator workers: the hottest experts
        count: 2
        device: cuda
        budget_bytes: 20GiB        # expert copies each worker may hold
        num_gpus: 1
        label_selector: {moe-cluster/role: experts-gpu}
      - name: host                 # host-memory workers: every other expert (all of them when room allows)
        count: 2
        device: cpu
        budget_bytes: 200GiB
        num_cpus: 8
        memory: 214748364800
        label_selector: {moe-cluster/role: experts-host}

The groups replace `worker`'s resources and `num_workers` (their counts add up); the placement
is `cluster.tiers.tier_placement`. Validated by pydantic; the errors name the field.
"""
from __future__ import annotations

from typing import Callable, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cluster.sizing import parse_bytes
from cluster.placement import Placement
from cluster.tiers import TierLayout, TierWorker, fast_sets, tier_placement, tier_slots, uniform_sets


class TierGroup(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: Literal["fast", "host"] = Field(description="fast: the most-loaded experts; host: the rest")
    count: int = Field(ge=1, description="expert workers in this group")
    device: Literal["cpu", "cuda"] = Field("cpu", description="where its workers compute")
    budget_bytes: int = Field(gt=0, description="bytes of expert copies each worker may hold (e.g. 20GiB)")
    num_cpus: float = Field(1.0, ge=0, description="Ray CPUs reserved per worker")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per worker")
    memory: int | None = Field(None, ge=0, description="bytes of memory reserved per worker (Ray resource)")
    torch_threads: int = Field(1, ge=1, description="torch intra-op threads per worker")
    copies: int = Field(1, ge=1, description="host tier: copies of each expert without a fast copy, on different "
                                            "workers (2: a host worker may die without failing a request)")
    label_selector: dict[str, str] = Field(default_factory=dict, description="node labels its workers must land on")

    @field_validator("budget_bytes", mode="before")
    @classmethod
    def _size(cls, value):
        if isinstance(value, str):
            try:
                return parse_bytes(value)
            except ValueError:
                raise ValueError(f"cannot read {value!r} as a size (e.g. 20GiB, 200GB)") from None
        return value

    @model_validator(mode="after")
    def _gpu(self) -> "TierGroup":
        if self.copies > self.count:
            raise ValueError(f"tier {self.name!r}: copies ({self.copies}) must not exceed count ({self.count})")
        if self.name == "fast" and self.copies != 1:
            raise ValueError("tier 'fast': copies is the host tier's setting (the fast tier holds one copy of each "
                             "expert it takes)")
        if self.device == "cuda" and self.num_gpus <= 0:
            raise ValueError(f"tier {self.name!r}: device cuda needs num_gpus > 0 (Ray shows a worker without "
                             "GPUs none)")
        return self


def check_tiers(groups: list[TierGroup]) -> None:
    """One group per tier, and a host tier: it holds every expert without a fast copy."""
    names = [g.name for g in groups]
    if len(set(names)) != len(names):
        raise ValueError(f"tiers: each tier once, got {names}")
    if "host" not in names:
        raise ValueError("tiers: a host tier is needed (it holds every expert without a fast copy)")


def tier_workers(groups: list[TierGroup], expert_bytes: Callable[[str], int] | None = None) -> list[TierWorker]:
    """One entry per expert worker, fast tier first (worker i of the placement). With
    `expert_bytes(device)`, budgets are counted in copies of the first worker's size, so each
    group's copies are those of its own device's dtype (auto: bf16 on cuda, float32 on cpu)."""
    ordered = sorted(groups, key=lambda g: g.name != "fast")
    if expert_bytes is None:
        return [TierWorker(g.name, g.budget_bytes) for g in ordered for _ in range(g.count)]
    unit = expert_bytes(ordered[0].device)
    return [TierWorker(g.name, g.budget_bytes // expert_bytes(g.device) * unit)
            for g in ordered for _ in range(g.count)]


def tier_layout(groups: list[TierGroup], expert_bytes: Callable[[str], int]) -> TierLayout:
    """The workers as the online tier step sees them (budgets in copies of the first group's size)."""
    unit = expert_bytes(sorted(groups, key=lambda g: g.name != "fast")[0].device)
    host = next(g for g in groups if g.name == "host")
    return TierLayout(tuple(tier_workers(groups, expert_bytes)), unit, host.copies)


def initial_placement(groups: list[TierGroup], moe_layers: list[int], num_experts: int,
                      expert_bytes: Callable[[str], int], loads: np.ndarray | None = None) -> Placement:
    """The placement at start: the fast tier's room spread evenly over the layers (no load yet),
    or given a profile's loads [L, E], to its hottest experts; every other expert on the host tier."""
    workers = tier_workers(groups, expert_bytes)
    unit = expert_bytes(sorted(groups, key=lambda g: g.name != "fast")[0].device)
    slots = tier_slots(workers, "fast", unit)
    fast = fast_sets(loads, slots) if loads is not None else uniform_sets(len(moe_layers), num_experts, slots)
    host = next(g for g in groups if g.name == "host")
    return tier_placement(fast, moe_layers, num_experts, workers, unit, loads, host_copies=host.copies)


def profile_loads(path: str, moe_layers: list[int], num_experts: int) -> np.ndarray:
    """A recorded load profile's [L, E] loads for mode static (EPLB, or the fast tier's room to the
    experts hottest in it); ValueError naming the file when it is unreadable or another model's."""
    from cluster.profile import load_profile, loads_for

    try:
        return loads_for(load_profile(path), moe_layers, num_experts)
    except ValueError as e:
        message = str(e)
        raise ValueError(message if message.startswith(f"{path}:") else f"{path}: {message}") from None


def tier_group_of(groups: list[TierGroup], worker: int) -> TierGroup:
    """The group of expert worker `worker` (in `tier_workers` order)."""
    for g in sorted(groups, key=lambda g: g.name != "fast"):
        if worker < g.count:
            return g
        worker -= g.count
    raise IndexError(f"worker {worker} is beyond the tiers' workers")
