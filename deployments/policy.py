"""The hot-expert autoscaling policy: every knob applied at run time, validated (user YAML → pydantic).

`PUT /admin/policy` changes these on a running cluster. Deployment options read only
when the application is built (pool bounds, router counts) live in deployments/config.py.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import ConfigDict, Field, ValidationError, model_validator

from cluster.autoscale import Limits
from deployments.field_types import NoGuessing

log = logging.getLogger("ray.serve")
RENAMED = {"token_split": "copy_choice"}  # old key → new key: old policy files keep working, with a warning


class AutoscalePolicy(NoGuessing):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    enabled: bool = Field(True, description="run the rebalancing loop at all")
    mode: Literal["online", "static"] = Field(
        "online", description="online: re-plan from the live expert load every interval; static: plan once, from a "
                              "recorded load profile with DeepSeek's EPLB (profile_file), then hold the placement")
    profile_file: str | None = Field(None, description="expert-load profile for mode static (`moe-cluster "
                                                       "record-profile` writes one)")
    interval_s: float = Field(10.0, gt=0, description="seconds between looks at the expert loads")
    window_steps: int = Field(50, ge=1, description="decode steps the load estimate averages over (EMA span)")
    hot_threshold: float = Field(1.2, ge=1.0, description="act only when the worst layer's max/mean worker "
                                                          "load is at least this")
    min_gain: float = Field(0.05, ge=0, description="skip a change that lowers max/mean worker load by less")
    cooldown_s: float = Field(30.0, ge=0, description="minimum seconds between two rebalances (no flapping)")
    extra_slots_per_layer: int = Field(2, ge=0, description="expert copies beyond one per expert, per layer")
    max_copies_per_expert: int = Field(4, ge=1, description="most copies of one expert (capped by worker count)")
    hierarchical: bool = Field(False, description="balance across nodes first, then workers inside a node")
    co_activation: bool = Field(False, description="co-locate experts often chosen for the same token (from the "
                                                   "router's co-activation counts), when balance allows")
    slots_per_worker: int | None = Field(None, ge=1, description="most routed-expert copies one worker may hold, "
                                                                 "all layers together (None: no limit)")
    memory_budget_bytes: int | None = Field(None, ge=1, description="most bytes of expert copies one worker may "
                                            "hold, at the serving dtype (None: no limit)")
    extra_copy_bytes_per_worker: int | None = Field(None, ge=0, description="most bytes of extra copies one worker "
                                                    "may hold beyond its even share of one copy per expert "
                                                    "(the memory redundancy costs; None: no limit)")
    copy_choice: Literal["even", "least_loaded"] = Field(
        "even", description="how an expert's rows are shared among its copies (router's own node first): split "
                            "evenly, or all to the copy whose worker has the fewest rows so far in the layer")
    max_copies_per_stage: int | None = Field(None, ge=1, description="load at most this many new copies per table "
                                             "switch: a change then goes through several table versions, each "
                                             "covering every expert (bounds the work between two switches)")
    tier_noise_z: float = Field(5.0, ge=0, description="expert tiers, online: promote a host expert over a fast "
                                "one only when their load gap exceeds this many standard deviations of the load "
                                "estimate's sampling noise (window_steps steps of row counts): no swaps for noise")
    switch_timeout_s: float = Field(30.0, gt=0, description="a rebalance whose new table not every router has "
                                    "switched to within this is abandoned: nothing is retired, it is counted "
                                    "and logged, and the next one can run")

    @model_validator(mode="before")
    @classmethod
    def _renamed_keys(cls, data: Any) -> Any:
        return renamed(data) if isinstance(data, dict) else data

    @model_validator(mode="after")
    def _static_needs_a_profile(self) -> "AutoscalePolicy":
        if self.mode == "static" and not self.profile_file:
            raise ValueError("mode static needs profile_file (record one with `moe-cluster record-profile`)")
        return self

    def worker_budget_bytes(self, num_copies: int, active_workers: int, expert_bytes: int) -> int | None:
        """Bytes of expert copies one worker may hold: the memory budget, and/or its even share of
        `num_copies` (one per expert) plus the extra-copy allowance; None when neither is set."""
        limits = [self.memory_budget_bytes] if self.memory_budget_bytes is not None else []
        if self.extra_copy_bytes_per_worker is not None:
            share = -(-num_copies // max(active_workers, 1)) * expert_bytes
            limits.append(share + self.extra_copy_bytes_per_worker)
        return min(limits) if limits else None

    def limits(self, *, num_copies: int, active_workers: int, expert_bytes: int, min_copies: int = 1) -> Limits:
        """The knobs `cluster.autoscale.decide` reads, with the byte budget for this many copies and workers
        (num_copies: the copies every expert keeps, min_copies each)."""
        return Limits(hot_threshold=self.hot_threshold, min_gain=self.min_gain, cooldown_s=self.cooldown_s,
                      min_copies=min_copies,
                      extra_per_layer=self.extra_slots_per_layer, max_copies=self.max_copies_per_expert,
                      hierarchical=self.hierarchical, co_activation=self.co_activation,
                      slots_per_worker=self.slots_per_worker,
                      budget_bytes=self.worker_budget_bytes(num_copies, active_workers, expert_bytes))

    def merge(self, fields: dict) -> "AutoscalePolicy":
        """This policy with `fields` changed (old key names accepted); ValueError names the field."""
        try:
            return AutoscalePolicy(**{**self.model_dump(), **renamed(fields)})
        except (ValidationError, TypeError) as e:
            raise ValueError(describe(e) if isinstance(e, ValidationError) else str(e)) from None

    @property
    def ema_alpha(self) -> float:
        return 2.0 / (self.window_steps + 1)


def renamed(data: dict) -> dict:
    """`data` with every old key under its new name, each logged as deprecated."""
    for old, new in RENAMED.items():
        if old in data:
            if new in data:
                raise ValueError(f"{old} is the old name of {new}: give only {new}")
            log.warning("policy key %r is deprecated: it is now %r", old, new)
            data = {**{k: v for k, v in data.items() if k != old}, new: data[old]}
    return data


def describe(e: ValidationError) -> str:
    """One line per bad field: 'worker.num_cpus: Input should be greater than or equal to 0'. Our own
    checks' messages go as written (no pydantic "Value error, "), and a whole-model check, which names
    its fields itself, gets no location prefix."""
    def one(err) -> str:
        msg = str(err["ctx"]["error"]) if err["type"] == "value_error" else err["msg"]
        return f"{'.'.join(map(str, err['loc']))}: {msg}" if err["loc"] else msg

    return "; ".join(one(err) for err in e.errors())


def check_copies(policy: AutoscalePolicy | None, expert_copies: int) -> None:
    """Mode static plans DeepSeek's EPLB (one copy per expert, plus extras to the hottest), which
    would retire the redundancy `expert_copies` > 1 keeps for failures: refused, naming both."""
    if policy is not None and policy.mode == "static" and expert_copies > 1:
        raise ValueError(f"mode static plans one copy per expert (DeepSeek's EPLB) and would retire the "
                         f"copies expert_copies ({expert_copies}) keeps for failures: use mode online, which "
                         f"keeps {expert_copies} of every expert")


def load_policy(path: str | Path) -> AutoscalePolicy:
    """A policy file; errors name the file, the field and the reason."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"{path}: cannot read policy ({e})") from None
    try:
        return AutoscalePolicy(**data)
    except (ValidationError, TypeError) as e:
        reason = describe(e) if isinstance(e, ValidationError) else str(e)
        raise ValueError(f"{path}: {reason}") from None
