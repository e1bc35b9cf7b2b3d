"""What bench/tier_bench.py assumes about tiers, measured on this machine's hardware (issue 23).

    python bench/tier_hw.py --out DIR [--device cuda|cpu] [--budget-s 120] [--threads 0] [--max-s 0.3]

tier_bench models a fast tier at T ms per row, a host tier at 10·T, and a host → fast link of 25 GB/s
for stream-loading. This script measures those on real hardware, in order of value, within --budget-s
(checked between measurements; a part or shape it reaches too late is listed under "skipped"):
  3. layer:  one real tiered MoE layer (bench/tier_layer.py: Qwen3-30B-A3B's shape, 128 experts, top-8),
             routing drawn from Zipf --zipf as tier_bench draws it, decode batches of --batches tokens:
             all on the fast device, the hottest --fast-share by a matching profile on it and the rest on
             the CPU at once (KTransformers' setting), the same room chosen uniformly, all on the CPU;
             layer ms and all-fast ms ÷ each mode's; the profile split's tiers timed alone (how much
             of one the concurrent step hid: "overlap");
  1. expert: one expert (SwiGLU, LocalExperts.run_subset: what an expert worker runs) per shape of
             --shapes on the fast tier (--device, --fast-dtype) and the host tier (CPU, all cores, each of
             --host-dtypes), for --rows rows: ms per call and per row, host ÷ fast per row (tier_bench's 10);
  2. link:   one expert's bf16 weights host → fast device from pinned and pageable memory (MB/s, ms per
             expert), and cluster/stream_load.crossover_rows with the measured costs (and the crossover
             read off the measured curves, whose fixed per-call costs the formula leaves out).
Then a model check: tier_bench's per-row model priced with part 1's costs, next to part 3's layers.
Writes DIR/tier_hw.json after every part (a run cut short keeps what it measured) and prints a table.
--device cpu runs everything on the CPU (the fast tier too): a check of the script, not a measurement.
"""
from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
from cluster.model.layers import swiglu  # noqa: E402
from cluster.stream_load import StreamCosts, crossover_rows  # noqa: E402
from hw_timing import Budget, cpu_threads, environment, measure, sync  # noqa: E402
from tier_bench import published_config  # noqa: E402
from tier_layer import Shape, held, layer_part, random_experts  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
CPU = torch.device("cpu")


def shape_of(spec: str) -> Shape:
    """A published config's name (tests/published_configs.py), or DxI / DxIxExK for tiny test shapes."""
    parts = spec.split("x")
    if all(p.isdigit() for p in parts) and len(parts) in (2, 4):
        d, i, e, k = [int(p) for p in parts] + [1, 1][:4 - len(parts)]
        return Shape(spec, d, i, e, k)
    c = published_config(spec)
    return Shape(spec, c.hidden_size, c.expert_intermediate_size, c.num_experts, c.top_k)


def expert_part(shapes: list[Shape], tiers: list[tuple[str, torch.device, torch.dtype]], rows: list[int], *,
                seed: int, max_s: float, budget: Budget, gen: torch.device) -> dict:
    """Part 1: per shape and tier, ms per call of one expert for each row count, and the per-row slope."""
    out = {"rows": rows, "shapes": {}, "skipped": []}
    for shape in shapes:
        weights = random_experts(shape, [0], seed=seed, device=gen)
        x = torch.randn(max(rows), shape.hidden, generator=torch.Generator().manual_seed(seed))  # [N, D] fp32
        want = swiglu(x[:16], weights[0].to(CPU))  # fp32 CPU reference for the tiers' accuracy
        res = out["shapes"][shape.name] = {"hidden": shape.hidden, "intermediate": shape.intermediate, "tiers": {}}
        for name, device, dtype in tiers:
            if budget.over():
                out["skipped"].append(f"{shape.name} {name}: budget")
                continue
            try:
                res["tiers"][name] = _tier_costs(weights, x, want, rows, device, dtype, max_s, budget)
            except Exception as e:  # noqa: BLE001 (a dtype this CPU cannot run is a finding, not a crash)
                res["tiers"][name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        res["host_over_fast_per_row"] = _ratios(res["tiers"])
        del weights
    return out


def _tier_costs(weights, x, want, rows, device, dtype, max_s, budget: Budget) -> dict:
    """One tier's costs for the row counts the budget leaves time for (the smallest first)."""
    experts = held(weights, [0], device, dtype)
    xs = x.to(device=device, dtype=dtype)
    got = experts.run_subset(0, xs[:16], [0], [min(16, len(xs))]).float().cpu()
    ms = {}
    for n in rows:
        if ms and budget.over():
            break
        ms[n] = measure(lambda: experts.run_subset(0, xs[:n], [0], [n]), device, max_s=max_s)
    rows = list(ms)
    slope = (ms[rows[-1]]["ms"] - ms[rows[0]]["ms"]) / max(rows[-1] - rows[0], 1)
    return {"device": str(device), "dtype": str(dtype).removeprefix("torch."), "loop_reason": experts.loop_reason,
            "ms_per_call": {n: m["ms"] for n, m in ms.items()},
            "ms_per_row_at": {n: round(m["ms"] / n, 5) for n, m in ms.items()},
            "ms_per_row_slope": round(slope, 6), "reps": {n: m["reps"] for n, m in ms.items()},
            "max_rel_diff_vs_cpu_fp32": float((got - want[:len(got)]).abs().max() / want.abs().max())}


def _ratios(tiers: dict) -> dict:
    """Host per-row cost over the fast tier's, by the slope and at each row count: what tier_bench calls 10."""
    fast = tiers.get("fast", {})
    out = {}
    for name, t in tiers.items():
        if name == "fast" or "ms_per_call" not in t or "ms_per_call" not in fast:
            continue
        at = {n: round(ms / fast["ms_per_call"][n], 2) for n, ms in t["ms_per_call"].items()
              if n in fast["ms_per_call"]}
        slope = t["ms_per_row_slope"] / fast["ms_per_row_slope"] if fast["ms_per_row_slope"] > 0 else None
        out[name] = {"by_slope": round(slope, 2) if slope else None, "at_rows": at}
    return out


def link_part(shapes: list[Shape], experts: dict, *, device: torch.device, seed: int, max_s: float,
              budget: Budget) -> dict:
    """Part 2: host → device copy of one expert's bf16 weights, pinned and pageable; the crossovers."""
    out = {"shapes": {}, "skipped": []}
    for shape in shapes:
        if budget.over():
            out["skipped"].append(f"{shape.name}: budget")
            continue
        w = random_experts(shape, [0], seed=seed, device=device)[0]  # drawn where it is fast, then to the host
        src = [w.gate_up.to(torch.bfloat16).cpu(), w.down.to(torch.bfloat16).cpu()]
        nbytes = shape.expert_bytes(torch.bfloat16)
        res = out["shapes"][shape.name] = {"expert_bytes": nbytes}
        for kind in ("pinned", "pageable"):
            res[kind] = _copy_cost(src, kind, device, nbytes, max_s)
        res["crossover"] = _crossovers(experts.get(shape.name, {}).get("tiers", {}), res, nbytes)
    return out


def _copy_cost(src: list, kind: str, device: torch.device, nbytes: int, max_s: float) -> dict:
    if kind == "pinned" and device.type != "cuda":
        return {"error": "pinned memory needs CUDA: the fast tier is the CPU here"}
    try:
        host = [t.pin_memory() for t in src] if kind == "pinned" else src
        dst = [torch.empty_like(t, device=device) for t in src]
        copy = lambda: [d.copy_(s, non_blocking=True) for d, s in zip(dst, host)]  # noqa: E731
        m = measure(copy, device, max_s=max_s)
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    return {"ms_per_expert": m["ms"], "MB_per_s": round(nbytes / (m["ms"] / 1000) / 1e6, 1), "reps": m["reps"]}


def _crossovers(tiers: dict, link: dict, nbytes: int) -> dict:
    """Per host dtype: crossover_rows (cluster/stream_load.py) with the measured per-row slopes and the
    faster measured link, and the fewest measured rows for which link + fast call < host call."""
    fast = tiers.get("fast", {})
    best = next((link[k] for k in ("pinned", "pageable") if "ms_per_expert" in link.get(k, {})), None)
    if "ms_per_call" not in fast or best is None:
        return {"error": "needs part 1's fast tier and a measured link"}
    out = {"link": "pinned" if "ms_per_expert" in link["pinned"] else "pageable"}
    for name, t in tiers.items():
        if name == "fast" or "ms_per_call" not in t:
            continue
        costs = StreamCosts(best["MB_per_s"] * 1e6, max(fast["ms_per_row_slope"], 1e-9) / 1000,
                            max(t["ms_per_row_slope"], 1e-9) / 1000)
        curve = [n for n, ms in t["ms_per_call"].items()
                 if n in fast["ms_per_call"] and best["ms_per_expert"] + fast["ms_per_call"][n] < ms]
        out[name] = {"crossover_rows": crossover_rows(nbytes, costs),
                     "measured_curve_first_rows": curve[0] if curve else None}
    return out


def model_check(layer: dict, experts: dict, host_tier: str) -> dict:
    """tier_bench's model with part 1's measured costs against part 3's measured layers: a layer takes as
    long as its busier tier, a tier's time its rows × the per-row slope ("rows"), or that plus a fixed
    cost per expert called, part 1's 1-row call less one slope ("calls"). Each gives all-fast ÷ mode.
    On a CPU the fixed cost is reading the expert's weights, paid per expert; on a GPU it is mostly the
    call's launch and sync, which a grouped layer pays once: "calls" overprices the fast tier there."""
    tiers = experts.get(layer.get("shape", {}).get("name"), {}).get("tiers", {})
    if not layer.get("runs") or any("ms_per_call" not in tiers.get(t, {}) for t in ("fast", host_tier)):
        return {"error": f"needs part 3 and part 1's fast and {host_tier} tiers of the layer's shape"}
    cost = {}
    for tier, t in (("fast", tiers["fast"]), ("host", tiers[host_tier])):
        first, slope = next(iter(t["ms_per_call"].items())), t["ms_per_row_slope"]
        if slope <= 0:  # the calls did not grow with their rows (timing noise on tiny shapes): the largest
            at = t["ms_per_row_at"]  # call's time per row, so that no tier prices at zero (keys: str from JSON)
            slope = at[max(at, key=int)]
        cost[tier] = {"row_ms": slope, "call_ms": round(max(first[1] - first[0] * slope, 0.0), 6)}
    price = lambda load, calls: max(load[x]["rows"] * cost[x]["row_ms"]  # noqa: E731
                                    + calls * load[x]["experts"] * cost[x]["call_ms"] for x in cost)
    runs = []
    for r in layer["runs"]:
        ref = {k: price(r["modes"]["all-fast"], k) for k in (0, 1)}
        runs.append({"zipf": r["zipf"], "tokens": r["tokens"], "all_fast_over_mode": {
            name: {"measured": m["all_fast_ms_over_mode_ms"],
                   "rows_model": round(ref[0] / max(price(m, 0), 1e-12), 4),
                   "calls_model": round(ref[1] / max(price(m, 1), 1e-12), 4)} for name, m in r["modes"].items()}})
    return {"host_tier": host_tier, "costs_ms": cost, "runs": runs}


def table(result: dict) -> str:
    env = result["environment"]
    lines = [f"torch {env['torch']}, device {env['device']} {env.get('gpu', '')}, cpu threads {env['cpu_threads']} "
             f"of {env['cpu_cores_visible']} ({env['cpu_model']}; {' '.join(env['cpu_matmul_flags'])}), "
             f"wall {result.get('wall_s')} s"]
    layer = result["parts"].get("layer", {})
    if layer.get("runs"):
        lines += [f"\n3. layer {layer['shape']['name']}: fast {layer['fast_dtype']}, host {layer['host_dtype']}, "
                  f"host workers {layer.get('host_workers') or 'one call, intra-op threads'}, "
                  f"fast share {layer['fast_share']:g}",
                  "zipf tokens | " + " | ".join(f"{m} ms (÷, fast rows)" for m in layer["runs"][0]["modes"])]
        for r in layer["runs"]:
            cells = [f"{m['ms']:.3f} ({m['all_fast_ms_over_mode_ms']:.2f}, {m['fast_row_share']:.0%})"
                     for m in r["modes"].values()]
            lines.append(f"{r['zipf']:g} {r['tokens']} | " + " | ".join(cells)
                         + f" | profile ÷ uniform speed {r['profile_speed_over_uniform']:.2f}"
                         + " | profile's tiers alone ms: fast {fast_alone_ms}, host {host_alone_ms}, "
                           "neither {neither_ms}; overlap {overlap}".format(**r["modes"]["tiered-profile"]))
    for name, s in result["parts"].get("expert", {}).get("shapes", {}).items():
        lines.append(f"\n1. expert {name}: ms per call at rows {result['parts']['expert']['rows']}; slope ms/row")
        for tier, t in s["tiers"].items():
            lines.append(f"  {tier}: {t['error']}" if "error" in t else
                         f"  {tier} ({t['dtype']}): {list(t['ms_per_call'].values())}; {t['ms_per_row_slope']}")
        lines.append(f"  host ÷ fast per row: {s['host_over_fast_per_row']}")
    for name, s in result["parts"].get("link", {}).get("shapes", {}).items():
        lines.append(f"\n2. link {name} ({s['expert_bytes'] / 1e6:.1f} MB bf16): pinned {s['pinned']}; "
                     f"pageable {s['pageable']}; crossover {s['crossover']}")
    for r in result.get("model_check", {}).get("runs", []):
        lines.append(f"model check zipf {r['zipf']:g}, {r['tokens']} tokens (measured / rows model / calls model): "
                     + "; ".join(f"{n} {m['measured']:.2f} / {m['rows_model']:.2f} / {m['calls_model']:.2f}"
                                 for n, m in r["all_fast_over_mode"].items() if n != "all-fast"))
    for part, p in result["parts"].items():
        if p.get("skipped") or p.get("error"):
            lines.append(f"{part}: skipped {p.get('skipped')} {p.get('error', '')}")
    return "\n".join(lines)


def run_part(run, budget: Budget, device: torch.device) -> dict:
    if budget.over():
        return {"skipped": ["budget"]}
    try:
        return run()
    except Exception:  # noqa: BLE001 (one part failing must not lose the others' figures)
        return {"error": traceback.format_exc(limit=6)}
    finally:
        sync(device)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for tier_hw.json")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="the fast tier")
    p.add_argument("--fast-dtype", default="bfloat16", choices=DTYPES)
    p.add_argument("--host-dtype", default="float32", choices=DTYPES, help="part 3's host tier (CPU workers' auto)")
    p.add_argument("--host-dtypes", default="float32,bfloat16", help="part 1's host tiers")
    p.add_argument("--shapes", default="Qwen3-30B-A3B,Mixtral-8x7B-Instruct-v0.1", help="parts 1 and 2")
    p.add_argument("--layer-shape", default="Qwen3-30B-A3B", help="part 3")
    p.add_argument("--rows", default="1,4,16,64,256")
    p.add_argument("--zipf", default="0,1,1.5")
    p.add_argument("--batches", default="16,64", help="part 3's decode batches, tokens")
    p.add_argument("--fast-share", type=float, default=0.1, help="part 3: share of the experts on the fast tier")
    p.add_argument("--parts", default="layer,expert,link", help="run in this order (by value)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: every core)")
    p.add_argument("--host-workers", type=int, default=0, help="part 3: 0 = the host rows in one call on torch's "
                   "threads; N = expert-parallel over N single-thread workers")
    p.add_argument("--max-s", type=float, default=0.3, help="seconds of timed calls per measurement")
    p.add_argument("--budget-s", type=float, default=120.0)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    unknown = set(a.parts.split(",")) - {"layer", "expert", "link"}
    if unknown:
        p.error(f"--parts: {sorted(unknown)} not among layer, expert, link")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    budget, device = Budget(a.budget_s), torch.device(a.device)
    cpu_threads(a.threads)
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    ints, floats = (lambda s: [int(x) for x in s.split(",")]), (lambda s: [float(x) for x in s.split(",")])  # noqa
    shapes = [shape_of(s) for s in a.shapes.split(",")]
    tiers = [("fast", device, DTYPES[a.fast_dtype])] + [(f"host-{d}", CPU, DTYPES[d]) for d in a.host_dtypes.split(",")]
    runs = {"layer": lambda: layer_part(shape_of(a.layer_shape), zipfs=floats(a.zipf), batches=ints(a.batches),
                                        fast_share=a.fast_share, device=device, fast_dtype=DTYPES[a.fast_dtype],
                                        host_dtype=DTYPES[a.host_dtype], seed=a.seed, max_s=a.max_s, budget=budget,
                                        host_workers=a.host_workers),
            "expert": lambda: expert_part(shapes, tiers, ints(a.rows), seed=a.seed, max_s=a.max_s, budget=budget,
                                          gen=device),
            "link": lambda: link_part(shapes, result["parts"].get("expert", {}).get("shapes", {}), device=device,
                                      seed=a.seed, max_s=a.max_s, budget=budget)}
    result = {"environment": environment(device), "args": vars(a), "parts": {}}
    for part in a.parts.split(","):
        result["parts"][part] = run_part(runs[part], budget, device)
        result["wall_s"] = round(budget.used(), 1)
        (out_dir / "tier_hw.json").write_text(json.dumps(result, indent=1))
        state = "error" if "error" in result["parts"][part] else "done"
        print(f"part {part}: {state} at {result['wall_s']} s", file=sys.stderr, flush=True)  # progress if cut short
    result["model_check"] = model_check(result["parts"].get("layer", {}), result["parts"].get("expert", {}).get(
        "shapes", {}), f"host-{a.host_dtype}")
    (out_dir / "tier_hw.json").write_text(json.dumps(result, indent=1))
    print(table(result))
    return 1 if any("error" in p for p in result["parts"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
