"""Placement at the extreme scales (pure simulation, no Ray, no model): our online planner
(cluster/rebalance.py) against static DeepSeek-style EPLB (cluster/eplb.py) at the same copy
budget (`extra_per_layer` copies beyond one per expert, every layer).

    .venv/bin/python bench/placement_scale.py [--tokens 4096] [--zipf 1.0] [--repeat 3] [--seed 0]

Expert load per layer: `--tokens` tokens each pick top-k distinct experts, drawn without
replacement from a Zipf popularity (p ∝ 1 / rank^zipf, a fresh random ranking per layer).
Reported: planner wall and CPU time for the whole layer set (medians of `--repeat`), and max/mean worker
load (tokens split evenly among an expert's copies) of the worst layer and averaged over layers.
"""
from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import numpy as np

from cluster.eplb import rebalance_experts, to_placement
from cluster.placement import round_robin
from cluster.rebalance import Worker, plan, worker_imbalance


@dataclass(frozen=True)
class Scale:
    name: str
    layers: int  # MoE layers
    experts: int  # per layer
    top_k: int
    workers: int
    nodes: int
    groups: int  # expert groups (EPLB hierarchical: groups → nodes)
    extra: int  # extra copies per layer


SCALES = [
    Scale("DeepSeek-V3", 58, 256, 8, 64, 8, 8, 32),
    Scale("Switch-C (top-1)", 15, 2048, 1, 256, 32, 256, 256),
    Scale("GShard (top-2)", 18, 2048, 2, 256, 32, 256, 256),
]


def expert_loads(rng: np.random.Generator, scale: Scale, tokens: int, zipf: float) -> np.ndarray:
    """[L, E] tokens per expert: each token's top-k distinct experts (Gumbel top-k over log p)."""
    out = np.zeros((scale.layers, scale.experts))
    for layer in range(scale.layers):
        logp = -zipf * np.log(rng.permutation(scale.experts) + 1.0)  # [E]
        scores = logp + rng.gumbel(size=(tokens, scale.experts))  # [T, E]
        chosen = np.argpartition(-scores, scale.top_k - 1, axis=1)[:, :scale.top_k]  # [T, K]
        out[layer] = np.bincount(chosen.ravel(), minlength=scale.experts)
    return out


def timed(fn, repeat: int):
    """fn's result, median wall seconds and median CPU seconds of this process (a shared machine
    inflates wall time; CPU time is what the planner itself costs)."""
    wall, cpu, result = [], [], None
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        result = fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return result, statistics.median(wall), statistics.median(cpu)


def planners(scale: Scale, loads: np.ndarray):
    """name → function returning a Placement for all layers."""
    layers = list(range(scale.layers))
    per_node = scale.workers // scale.nodes
    workers = [Worker(f"node-{w // per_node}") for w in range(scale.workers)]
    return {
        "round-robin, no extra copies": lambda: round_robin([(lyr, e) for lyr in layers for e in range(scale.experts)],
                                                            scale.workers),
        "ours": lambda: plan(loads, moe_layers=layers, workers=workers, extra_per_layer=scale.extra).placement,
        "ours, hierarchical": lambda: plan(loads, moe_layers=layers, workers=workers, extra_per_layer=scale.extra,
                                           hierarchical=True).placement,
        "EPLB": lambda: to_placement(rebalance_experts(loads=loads, extra_per_layer=scale.extra,
                                                       num_workers=scale.workers), layers),
        "EPLB, hierarchical": lambda: to_placement(rebalance_experts(
            loads=loads, extra_per_layer=scale.extra, num_workers=scale.workers, num_nodes=scale.nodes,
            num_groups=scale.groups), layers),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096, help="tokens in the load window, per layer")
    ap.add_argument("--zipf", type=float, default=1.0, help="popularity exponent: p ∝ 1 / rank^zipf")
    ap.add_argument("--repeat", type=int, default=3, help="runs per planner; the median time is reported")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    print("| scale | L × E, top-k | workers / nodes | extra / layer | planner | wall (s) | CPU (s) | CPU ms / layer "
          "| extra copies kept / layer | max/mean worst layer | max/mean mean of layers |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for scale in SCALES:
        loads = expert_loads(rng, scale, args.tokens, args.zipf)
        for name, fn in planners(scale, loads).items():
            placement, wall, cpu = timed(fn, 1 if name.startswith("round") else args.repeat)
            ratios = worker_imbalance(loads, list(range(scale.layers)), placement)
            kept = (sum(map(len, placement.workers)) - scale.layers * scale.experts) / scale.layers
            print(f"| {scale.name} | {scale.layers} × {scale.experts}, top-{scale.top_k} | {scale.workers} / "
                  f"{scale.nodes} | {scale.extra} | {name} | {wall:.3f} | {cpu:.3f} | {cpu / scale.layers * 1e3:.1f} "
                  f"| {kept:.1f} | {max(ratios):.3f} | {np.mean(ratios):.3f} |", flush=True)


if __name__ == "__main__":
    main()
