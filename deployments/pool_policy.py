"""Ray Serve autoscaling policy for the expert pool (`AutoscalingPolicy.policy_function`).

Each pool replica reports, through `record_autoscaling_stats`, the fraction of
time it spent computing experts (`busy`) and the policy's `target_busy`. The
pool is sized so that the mean busy fraction comes back to the target, within
Serve's min/max bounds; Serve applies its own up/downscale delays around it.
"""
from __future__ import annotations

import math
from typing import Any


def desired_replicas(current: int, busy: list[float], target: float, lo: int, hi: int) -> int:
    """Pure: the pool size that brings the mean busy fraction to `target`."""
    if not busy:
        return max(lo, min(current, hi))
    mean = sum(busy) / len(busy)
    want = math.ceil(current * mean / target - 1e-9) if mean > 0 else lo
    return max(lo, min(want, hi))


def scale_on_busy(ctx) -> tuple[int, dict[str, Any]]:
    metrics = ctx.aggregated_metrics or {}
    busy = list(metrics.get("busy", {}).values())
    target = next(iter(metrics.get("target_busy", {}).values()), 0.6)
    n = desired_replicas(ctx.current_num_replicas, busy, target, ctx.capacity_adjusted_min_replicas,
                         ctx.capacity_adjusted_max_replicas)
    return n, {}
