"""The cluster as the controller sees it through the routers' reports: pure functions over them.

Expert load is summed over the live routers (each reports an EMA of tokens per
step of its own engine). Used for the policy, `/admin/*`, `/ready` and `/metrics`.
"""
from __future__ import annotations

import numpy as np

from cluster.expert_load import max_over_mean
from cluster.placement import Table
from cluster.rebalance import worker_imbalance
from deployments import metrics
from deployments.messages import AppSpec, RouterReport


def _live(reports: dict[str, RouterReport], live) -> list[RouterReport]:
    return [reports[r] for r in live if r in reports]


def expert_load(reports: dict[str, RouterReport], live) -> tuple[np.ndarray, np.ndarray | None]:
    """([L, E] summed EMA tokens per step, [L, E, E] co-activation counts or None)."""
    mine = _live(reports, live)
    loads = np.sum([np.asarray(r.expert_load, dtype=float) for r in mine], axis=0)
    pairs = [np.asarray(r.coactivation) for r in mine if r.coactivation is not None]
    return loads, (np.sum(pairs, axis=0) if pairs else None)


def down_workers(reports: dict[str, RouterReport], live, table: Table | None) -> set[int]:
    """Workers some live router saw fail in their current generation (not healed yet)."""
    if table is None:
        return set()
    return {w for r in _live(reports, live) for w, gen in r.down
            if w < len(table.workers) and table.workers[w].generation == gen}


def load_view(reports, live, table: Table | None, moe_layers) -> dict:
    mine = _live(reports, live)
    if not mine:
        return {"load": None, "placement": None, "routers": 0}
    loads, _ = expert_load(reports, live)
    totals = np.sum([np.asarray(r.total_tokens) for r in mine], axis=0)
    placement = "in-process" if table is None else {
        "version": table.version, "workers": [[list(e) for e in experts] for experts in table.placement.workers]}
    return {"load": {"layers": list(moe_layers), "ema_tokens_per_step": loads.tolist(), "total_tokens": totals.tolist(),
                     "max_over_mean": max_over_mean(_tensor(loads)).tolist()},
            "placement": placement, "routers": len(mine),
            "tokens_per_router": {r.router_id: int(np.sum(r.total_tokens)) for r in mine}}


def _tensor(a: np.ndarray):
    import torch

    return torch.from_numpy(np.asarray(a, dtype=float))


def _sum_stats(mine: list[RouterReport]) -> dict:
    keys = ("running", "waiting", "steps", "step_seconds", "step_cpu_seconds", "active_requests", "free_seq_slots",
            "free_kv_blocks", "kv_blocks", "preemptions", *PREFIX_KEYS)
    out = {k: sum(r.stats.get(k, 0) for r in mine) for k in keys}
    queried = out["prefix_cache_query_tokens"]
    return {**out, "prefix_cache_hit_rate": out["prefix_cache_hit_tokens"] / queried if queried else 0.0}


PREFIX_KEYS = ("prefix_cache_query_tokens", "prefix_cache_hit_tokens", "prefix_cached_blocks", "prefix_cache_evictions")


def _prefix_metrics(mine: list[RouterReport]) -> None:
    """Per router (its own KV cache): what its engine reports since it started."""
    per = {k: {r.router_id: r.stats.get(k, 0) for r in mine} for k in PREFIX_KEYS}
    metrics.PREFIX_QUERY_TOKENS.set(per["prefix_cache_query_tokens"])
    metrics.PREFIX_HIT_TOKENS.set(per["prefix_cache_hit_tokens"])
    metrics.PREFIX_EVICTIONS.set(per["prefix_cache_evictions"])
    metrics.PREFIX_CACHED_BLOCKS.clear()
    for router, n in per["prefix_cached_blocks"].items():
        metrics.PREFIX_CACHED_BLOCKS.labels(router).set(n)


def _kv_metrics(mine: list[RouterReport]) -> None:
    """Per router (each has its own KV cache): how full it is, and what running out of room cost."""
    metrics.KV_USAGE.clear()  # routers gone drop out
    for r in mine:
        blocks = r.stats.get("kv_blocks", 0)
        if blocks:
            metrics.KV_USAGE.labels(r.router_id).set(1 - r.stats.get("free_kv_blocks", blocks) / blocks)
    metrics.PREEMPTIONS.set({r.router_id: r.stats.get("preemptions", 0) for r in mine})


def _data_plane(mine: list[RouterReport], state, spec: AppSpec) -> dict | None:
    table = state.table
    if table is None:
        return None
    planes = [r.stats.get("data_plane") or {} for r in mine]
    failures: dict[str, int] = {}
    calls: dict[str, int] = {}
    tier_rows: dict[str, int] = {}
    for p in planes:
        for k, v in p.get("rows_per_tier", {}).items():
            tier_rows[k] = tier_rows.get(k, 0) + v
        for k, v in p.get("failures", {}).items():
            failures[k] = failures.get(k, 0) + v
        for k, v in p.get("calls_per_worker", {}).items():
            calls[k] = calls.get(k, 0) + v
    totals = {k: sum(p.get(k, 0) for p in planes) for k in ("submit_s", "wait_s", "calls")}
    loads, _ = expert_load({r.router_id: r for r in mine}, [r.router_id for r in mine]) if mine else (None, None)
    imbalance = worker_imbalance(loads, list(spec.moe_layers), table.placement,
                                 active=table.active()) if loads is not None else []
    return {**totals, "failovers": sum(p.get("failovers", 0) for p in planes), "failures": failures,
            "calls_per_worker": calls, "rows_per_tier": tier_rows,
            "copies_per_tier": _per_tier(table, lambda w: len(table.placement.workers[w])),
            "down_workers": sorted(down_workers({r.router_id: r for r in mine}, [r.router_id for r in mine], table)),
            "worker_nodes": [ref.node_id for ref in table.workers],
            "copies_per_worker": [len(e) for e in table.placement.workers],
            "bytes_per_worker": [len(e) * spec.expert_bytes for e in table.placement.workers],
            "copies": sum(len(e) for e in table.placement.workers),
            "retired_workers": [w for w, ref in enumerate(table.workers) if ref.retired],
            "worker_max_over_mean": [round(x, 3) for x in imbalance], "table_version": table.version}


def _per_tier(table, count) -> dict[str, int]:
    """Expert tiers only: tier -> a count summed over its workers (copies; × expert_bytes = bytes)."""
    out: dict[str, int] = {}
    for w, ref in enumerate(table.workers):
        if ref.tier:
            out[ref.tier] = out.get(ref.tier, 0) + count(w)
    return out


def cluster_stats(reports, live, state, spec: AppSpec, report_count: int) -> dict:
    mine = _live(reports, live)
    return {**_sum_stats(mine), "routers": {r.router_id: r.stats for r in mine},
            "data_plane": _data_plane(mine, state, spec), "controller_reports": report_count}


def update_metrics(reports, live, state, spec: AppSpec) -> None:
    mine, table = _live(reports, live), state.table
    metrics.ROUTERS.set(len(mine))
    stats = _sum_stats(mine)
    metrics.RUNNING.set(stats["running"])
    metrics.WAITING.set(stats["waiting"])
    _prefix_metrics(mine)
    _kv_metrics(mine)
    if table is not None:
        metrics.TABLE_VERSION.set(table.version)
        metrics.WORKERS_DOWN.set(len(down_workers(reports, live, table)))
        for w, experts in enumerate(table.placement.workers):
            metrics.COPIES.labels(str(w)).set(len(experts))
            metrics.COPY_BYTES.labels(str(w)).set(len(experts) * spec.expert_bytes)
        for tier, copies in _per_tier(table, lambda w: len(table.placement.workers[w])).items():
            metrics.TIER_COPIES.labels(tier).set(copies)
            metrics.TIER_COPY_BYTES.labels(tier).set(copies * spec.expert_bytes)
    if not mine:
        return
    loads, _ = expert_load(reports, live)
    for layer, ratio in zip(spec.moe_layers, max_over_mean(_tensor(loads)).tolist()):
        metrics.EXPERT_IMBALANCE.labels(str(layer)).set(ratio)
    plane = _data_plane(mine, state, spec)
    if plane is not None:
        for layer, ratio in zip(spec.moe_layers, plane["worker_max_over_mean"]):
            metrics.WORKER_IMBALANCE.labels(str(layer)).set(ratio)
        metrics.EXPERT_CALL_FAILURES.set(plane["failures"])
        metrics.TIER_ROWS.set(plane["rows_per_tier"])
