"""Expert compute options on this CPU: one MoE layer's routed rows through its experts, timed.

    .venv/bin/python bench/expert_compute_bench.py [--reps 40] [--threads 2]

Options (all give the same outputs, checked against the loop):
- loop:          one matmul chain per expert that got rows (counts read on the host): the old path;
- grouped:       torch.nn.functional.grouped_mm on the stacked [S, 2I, D] weights, counts as device
                 offsets: what LocalExperts runs (cluster/model/grouped.py);
- grouped_t:     the same on weights stored transposed and contiguous ([S, D, 2I]);
- padded_bmm:    rows scattered into [E, max rows, D], one bmm per projection, gathered back.
Shapes of the demo model and of the ~1B qwen3_moe engine_bench builds; T tokens (decode batch
sizes, and one prefill), routing uniform or skewed (a few experts take most rows, as trained
routers do). Options run round-robin and the lower quartile of each is reported, so load from
other processes on a shared machine hits them alike.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from cluster.model.grouped import run_stack, stack_layer, swiglu_loop
from cluster.model.weights import MLPWeights

SHAPES = {"demo": (8, 256, 320, 2), "qwen3_moe-1b": (64, 1024, 288, 8)}  # E, D, I, K


def routed(e: int, d: int, i: int, k: int, tokens: int, skew: float):
    g = torch.Generator().manual_seed(tokens)
    experts = {x: MLPWeights(torch.randn(2 * i, d, generator=g) * 0.05, torch.randn(d, i, generator=g) * 0.05)
               for x in range(e)}
    logits = torch.randn(tokens, e, generator=g) + skew * torch.linspace(3, 0, e)
    counts = torch.bincount(logits.topk(k, -1).indices.reshape(-1), minlength=e)  # [E]
    return stack_layer(experts), counts, torch.randn(tokens * k, d, generator=g)


def padded_bmm(stack, counts, rows):
    e, n = counts.numel(), rows.shape[0]
    expert = torch.repeat_interleave(torch.arange(e), counts)  # [N]
    pos = torch.arange(n) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)  # row within its expert
    buf = rows.new_zeros(e, int(counts.max()), rows.shape[1])
    buf[expert, pos] = rows
    gate, up = torch.bmm(buf, stack.gate_up.transpose(1, 2)).chunk(2, -1)
    return torch.bmm(F.silu(gate) * up, stack.down.transpose(1, 2))[expert, pos]


def options(stack, counts):
    transposed = stack.__class__(**{**stack.__dict__, "gate_up": stack.gate_up.transpose(1, 2).contiguous()
                                    .transpose(1, 2), "down": stack.down.transpose(1, 2).contiguous().transpose(1, 2)})
    host = counts.tolist()
    return {"loop": lambda rows: swiglu_loop(rows, stack, host),
            "grouped": lambda rows: run_stack(rows, stack, counts),
            "grouped_t": lambda rows: run_stack(rows, transposed, counts),
            "padded_bmm": lambda rows: padded_bmm(stack, counts, rows)}


def measure(fns: dict, rows, reps: int) -> dict[str, float]:
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn(rows)
            times[name].append(time.perf_counter() - t0)
    return {name: 1000 * sorted(ts)[len(ts) // 4] for name, ts in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=40)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, ms per layer (lower quartile of {args.reps})")
    print("| model | tokens | routing | rows | " + " | ".join(["loop", "grouped", "grouped_t", "padded_bmm"])
          + " | fastest |")
    print("|---|---|---|---|---|---|---|---|---|")
    for model, (e, d, i, k) in SHAPES.items():
        for tokens in (1, 8, 32, 128, 512):
            for routing, skew in (("uniform", 0.0), ("skewed", 1.5)):
                stack, counts, rows = routed(e, d, i, k, tokens, skew)
                fns = options(stack, counts)
                ref = fns["loop"](rows)
                assert all(torch.allclose(fn(rows), ref, atol=1e-4) for fn in fns.values())
                ms = measure(fns, rows, args.reps)
                best = min(ms, key=ms.get)
                print(f"| {model} | {tokens} | {routing} | {rows.shape[0]} | "
                      + " | ".join(f"{v:.3f}" for v in ms.values()) + f" | {best} |", flush=True)


if __name__ == "__main__":
    main()
