"""Measure how domain-specialised a model's routing is.

    .venv/bin/python tools/routing_stats.py --model models/demo [--windows 32 --window-len 128] [--json]

Runs held-out code-only and prose-only text through the model (our engine's
forward) and counts, per MoE layer, how many tokens each expert receives.
Reports per layer and domain the hottest expert's load over the mean load
(1.0 = perfectly even) and the total-variation distance between the code and
prose usage distributions (0 = identical, 1 = disjoint).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from demo_corpus import DOMAINS, documents  # noqa: E402

from cluster.engine import LLMEngine  # noqa: E402
from cluster.model.batch import make_batch  # noqa: E402
from cluster.model.kv_cache import KVCache  # noqa: E402


def windows(engine: LLMEngine, domain: str, count: int, length: int) -> list[list[int]]:
    ids: list[int] = []
    for doc in documents(domain, "heldout"):
        ids += engine.encode(doc)
    step = max(length, (len(ids) - length) // count)
    return [ids[i:i + length] for i in range(0, len(ids) - length, step)][:count]


def expert_counts(engine: LLMEngine, prompts: list[list[int]]) -> torch.Tensor:
    """Tokens routed to each expert: [num_moe_layers, num_experts]."""
    cfg = engine.cfg
    blocks_each = -(-max(map(len, prompts)) // 16)
    cache = KVCache.for_model(cfg, len(prompts) * blocks_each, block_size=16, num_state_slots=len(prompts))
    items = [(cache.allocate(blocks_each), p, 0) for p in prompts]
    _, routing = engine.model.forward(make_batch(items, cache.block_size), cache)
    return torch.stack([torch.bincount(r.ids.reshape(-1), minlength=cfg.num_experts) for r in routing]).float()


def report(model: str, count: int, length: int, domains: tuple[str, ...] = DOMAINS) -> dict:
    engine = LLMEngine.from_pretrained(model, max_num_seqs=1, max_model_len=length)
    counts = {d: expert_counts(engine, windows(engine, d, count, length)) for d in domains}
    share = {d: c / c.sum(-1, keepdim=True) for d, c in counts.items()}  # [layers, E]
    layers = []
    for i, layer in enumerate(engine.cfg.moe_layer_ids):
        row = {"layer": layer}
        for a, b in [(a, b) for k, a in enumerate(domains) for b in domains[k + 1:]]:
            row[f"tv_distance_{a}_vs_{b}"] = round(0.5 * float((share[a][i] - share[b][i]).abs().sum()), 3)
        for d in domains:
            row[f"{d}_hottest_expert"] = int(counts[d][i].argmax())
            row[f"{d}_hottest_over_mean"] = round(float(counts[d][i].max() / counts[d][i].mean()), 2)
            row[f"{d}_share"] = [round(float(x), 3) for x in share[d][i]]
        layers.append(row)
    best = max(max(r[f"{d}_hottest_over_mean"] for d in domains) for r in layers)
    tokens = {d: int(counts[d][0].sum()) // engine.cfg.top_k for d in domains}
    return {"model": model, "tokens_per_domain": tokens, "max_hottest_over_mean": best, "layers": layers}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/demo")
    p.add_argument("--windows", type=int, default=32)
    p.add_argument("--window-len", type=int, default=128)
    p.add_argument("--domains", default=",".join(DOMAINS), help="e.g. code,prose,numbers")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    domains = tuple(args.domains.split(","))
    result = report(args.model, args.windows, args.window_len, domains)
    if args.json or domains != ("code", "prose"):
        print(json.dumps(result, indent=1))
        return
    print(f"tokens per domain: {result['tokens_per_domain']}")
    print("layer  TV(code,prose)  code: hottest (x mean)  prose: hottest (x mean)")
    for r in result["layers"]:
        print(f"{r['layer']:>5}  {r['tv_distance_code_vs_prose']:>14}  "
              f"{r['code_hottest_expert']:>7} ({r['code_hottest_over_mean']}x)  "
              f"{r['prose_hottest_expert']:>14} ({r['prose_hottest_over_mean']}x)")


if __name__ == "__main__":
    main()
