"""What fits in which tier, from config.json alone: `moe-cluster plan --gpus 2 --gpu-memory 24GiB
--host-memory 256GiB [--profile load.json]`. Pure, no Ray.

The router (backbone and KV cache) takes the first GPU; every GPU's remaining room, at
`gpu_memory_utilization`, holds fast-tier expert copies (one fast worker per GPU); the host
tier's memory holds every expert when it can (a demotion then moves nothing and losing a GPU
loses no expert), and must hold at least the experts without a fast copy. With a load profile
(`cluster.profile`), the fast copies go where `cluster.tiers.fast_sets` puts them and the plan
says what share of the expert rows they would serve; without one, experts count as equally loaded.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from cluster.config import ModelConfig
from cluster.model.kv_cache import kv_bytes_per_token
from cluster.sizing import backbone_bytes, bytes_text, model_config, parse_bytes
from cluster.precision import dtype_name, resolve_dtype, resolve_kv_dtype
from cluster.profile import LoadProfile, load_profile, loads_for
from cluster.tiers import fast_sets


@dataclass(frozen=True)
class TierPlan:
    model_type: str
    dtype: str
    router_weight_bytes: int
    kv_bytes: int  # the router's KV cache for kv_tokens
    kv_tokens: int
    expert_bytes: int  # one expert copy
    routed_expert_count: int  # all MoE layers
    moe_layers: int
    gpus: int
    fast_tier_bytes: int  # room for fast copies, all GPUs
    fast_experts: int  # copies the fast tier holds
    fast_experts_per_layer: tuple[int, ...]  # [L] where fast_sets puts them
    fast_byte_share: float  # fast copies / all experts
    host_tier_bytes: int  # expert bytes the host tier holds
    host_keeps_every_expert: bool
    expected_fast_row_share: float  # of expert rows, from the profile (or the byte share without one)
    from_profile: bool
    fits: bool
    reasons: tuple[str, ...]

    def as_dict(self) -> dict:
        return asdict(self)


def tier_plan(c: ModelConfig, *, dtype: torch.dtype, kv_dtype: torch.dtype, gpus: int, gpu_memory_bytes: int,
              host_memory_bytes: int, kv_tokens: int, gpu_memory_utilization: float = 0.9,
              host_memory_utilization: float = 0.9, profile: LoadProfile | None = None) -> TierPlan:
    if gpus < 1:
        raise ValueError("--gpus: must be ≥ 1 (the router and the fast tier live on GPUs)")
    layers, n_exp = len(c.moe_layer_ids), c.num_experts
    total, eb = layers * n_exp, c.expert_bytes(dtype)
    usable = int(gpu_memory_bytes * gpu_memory_utilization)
    router, kv = backbone_bytes(c, dtype), kv_bytes_per_token(c, kv_dtype) * kv_tokens
    per_gpu = [max(0, usable - (router + kv if g == 0 else 0)) // eb for g in range(gpus)]
    fast = min(total, sum(per_gpu))
    loads = _loads(profile, c) if profile is not None else np.ones((layers, n_exp))
    chosen = fast_sets(loads, fast)
    rows = sum(loads[i, e] for i, s in enumerate(chosen) for e in s) / max(loads.sum(), 1e-300)
    host_room = int(host_memory_bytes * host_memory_utilization) // eb
    host = min(total, host_room)
    reasons = []
    if router + kv > usable:
        reasons.append(f"the router's weights and KV cache ({bytes_text(router + kv)}) exceed {gpu_memory_utilization:.0%} "
                       f"of one GPU ({bytes_text(usable)}): lower --kv-tokens or use larger GPUs")
    if host_room < total - fast:
        reasons.append(f"the host tier holds {host_room} experts ({bytes_text(host_room * eb)} at "
                       f"{host_memory_utilization:.0%} of --host-memory) but the {total - fast} experts without a "
                       f"fast copy need {bytes_text((total - fast) * eb)}: raise --host-memory")
    return TierPlan(c.model_type, dtype_name(dtype), router, kv, kv_tokens, eb, total, layers, gpus,
                    sum(per_gpu) * eb, fast, tuple(len(s) for s in chosen), fast / total, host * eb, host >= total,
                    float(rows), profile is not None, not reasons, tuple(reasons))


def _loads(profile: LoadProfile, c: ModelConfig) -> np.ndarray:
    try:
        return loads_for(profile, c.moe_layer_ids, c.num_experts)
    except ValueError as e:
        raise ValueError(f"--profile: {e}") from None


def format_tier_plan(p: TierPlan) -> str:
    per_layer = sorted(set(p.fast_experts_per_layer))
    spread = f"{per_layer[0]}" if len(per_layer) == 1 else f"{per_layer[0]}–{per_layer[-1]}"
    share = ("expected from the profile" if p.from_profile else "with every expert equally loaded (give --profile)")
    lines = [
        f"model: {p.model_type}, weights {p.dtype}; {p.routed_expert_count} routed experts "
        f"({p.moe_layers} MoE layers), {bytes_text(p.expert_bytes)} each = {bytes_text(p.routed_expert_count * p.expert_bytes)}",
        f"router (GPU 0): weights {bytes_text(p.router_weight_bytes)} + KV cache {bytes_text(p.kv_bytes)} "
        f"({p.kv_tokens:,} tokens)",
        f"fast tier ({p.gpus} GPU{'s' if p.gpus != 1 else ''}): {p.fast_experts} experts = "
        f"{bytes_text(p.fast_experts * p.expert_bytes)} ({p.fast_byte_share:.1%} of the expert bytes), "
        f"{spread} per layer",
        f"host tier: {bytes_text(p.host_tier_bytes)}"
        + (" (every expert: a demotion moves nothing)" if p.host_keeps_every_expert else
           " (not every expert: a demotion loads a host copy first)"),
        f"expert rows served by the fast tier: {p.expected_fast_row_share:.1%}, {share}",
        "fits: yes" if p.fits else "fits: no: " + "; ".join(p.reasons),
    ]
    return "\n".join(lines)


def tier_plan_from_config(model: str, *, gpus: int, gpu_memory: str = "80GiB", host_memory: str = "256GiB",
                          profile: str | None = None, dtype: str = "auto", kv_cache_dtype: str = "auto",
                          kv_tokens: int = 8192, gpu_memory_utilization: float = 0.9) -> TierPlan:
    """`model`: a checkpoint directory or its config.json; `profile`: a load profile file (optional)."""
    cfg = model_config(model)
    weights = resolve_dtype(dtype, "cuda", cfg.checkpoint_dtype)  # planned for GPUs: auto = the checkpoint's
    try:
        host = parse_bytes(host_memory)
    except ValueError:
        raise ValueError(f"--host-memory: cannot read {host_memory!r} as a size (e.g. 256GiB, 512GB)") from None
    if kv_tokens < 0:
        raise ValueError("--kv-tokens: must be ≥ 0")
    return tier_plan(cfg, dtype=weights, kv_dtype=resolve_kv_dtype(kv_cache_dtype, weights), gpus=gpus,
                     gpu_memory_bytes=parse_bytes(gpu_memory), host_memory_bytes=host, kv_tokens=kv_tokens,
                     gpu_memory_utilization=gpu_memory_utilization,
                     profile=load_profile(profile) if profile else None)
