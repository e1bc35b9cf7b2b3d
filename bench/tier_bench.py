"""Expert tiers: a small fast tier and a 10x slower host tier, placed five ways, on traffic whose hot
experts move, in one run.

    .venv/bin/python bench/tier_bench.py [--fast-shares 0.10,0.25] [--fast-workers 2] [--host-workers 2] \\
        [--clients 16] [--phases prose:20,code:20,numbers:20,prose:20] [--row-ms 1] [--host-factor 10] \\
        [--router-ms 0] [--prompt-tokens 16] [--stream --link-gbps 25] [--config Qwen3-30B-A3B --zipf 0,1,1.5] \\
        [--measure-host-row] [--max-moves 8] [--noise-z 5]

The traffic is the shift benchmark's (prose → code → numbers → prose): the demo model's own routing of
held-out text of each domain (our engine's forward, tools/routing_stats.py's windows), replayed token by
token. Workers are devices of fixed capacity as in bench/shift_bench.py (one call at a time, a fixed
time per row): fast-tier workers T ms per row, host-tier workers host_factor × T. A step runs the MoE
layers one after another; a layer takes as long as its busiest worker; the step is one inter-token gap
for every sequence in it (prompts of 16 tokens run in the step a request starts). The run is a
discrete-time model, so it takes seconds and does not depend on this (shared) machine's speed.

Placements (the fast tier holds `share` of the expert bytes; the host tier holds every expert):
  all-fast  every expert on every fast worker (the upper bound: no memory limit);
  by-layer  whole layers' experts on the fast tier (llama.cpp --n-cpu-moe): only layers that fit whole;
  uniform   the same number of fast experts in every layer, chosen without load (KTransformers' uniform);
  static    the fast tier's room to the experts hottest in a profile recorded during the first phase
            of the uniform run ("frequency"), fixed from then on;
  online    starts from the same profile; every interval the promote/demote decision (cluster/tiers.py, with
            hysteresis) runs on the smoothed live load; a promotion loads its copies in the background
            (load_ms each) and switches when they are in, as the staged autoscaler does.
  online+stream (--stream) online, and per layer and step the experts cluster/stream_load.py picks stream
            their weights to a fast worker for that step (bytes / --link-gbps on that worker, then its rows
            at the fast tier's speed): stream-loading prefill.
Rows go to copies by cluster/tier_choice.py (fast copy first, spill to a host copy by queue) in every mode.

--config NAME: a published model's shape (experts, top-k, MoE layers, expert bytes) with synthetic routing,
for models whose trained weights are not here: per (domain, layer) a Zipf popularity over the experts in
an order of its own (so the hot experts move with the domain), skew set by --zipf and reported as measured
(rows share of the hottest 10% of experts, hottest over mean).
Printed per mode and share: tokens/s, inter-token p50/p99, failed requests (rows that found no live
copy), the fast tier's share of rows, promotions/demotions, bytes moved, p99 in windows with a
promotion over steady windows and over the static run's p99 in the same windows (a shift's slow
windows without a switch); then the ratios the issue's goals name.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import ChainMap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
from cluster.copy_choice import NoLiveCopy  # noqa: E402
from cluster.placement import Placement  # noqa: E402
from cluster.stream_load import StreamCosts, crossover_rows, stream_set  # noqa: E402
from cluster.tier_choice import choose_tiered  # noqa: E402
from cluster.tiers import (FAST, HOST, Hysteresis, TierWorker, decide, fast_of, fast_sets,  # noqa: E402
                           layer_sets, tier_placement, uniform_sets)

MODES = ("all-fast", "by-layer", "uniform", "static", "online", "online+stream")
ONLINE = ("online", "online+stream")


def traces(model: str, domains: set[str], windows: int, length: int) -> tuple[dict[str, np.ndarray], int]:
    """domain -> [T, L, K] expert ids the demo model routes each held-out token to; and bytes per expert."""
    import torch

    from cluster.engine import LLMEngine
    from cluster.model.batch import make_batch
    from cluster.model.kv_cache import KVCache
    from routing_stats import windows as text_windows

    engine = LLMEngine.from_pretrained(model, max_num_seqs=1, max_model_len=length)
    out = {}
    for d in sorted(domains):
        prompts = text_windows(engine, d, windows, length)
        blocks = -(-length // 16)
        cache = KVCache.for_model(engine.cfg, len(prompts) * blocks, block_size=16)
        with torch.no_grad():
            _, routing = engine.model.forward(make_batch([(cache.allocate(blocks), p, 0) for p in prompts], 16), cache)
        out[d] = torch.stack([r.ids for r in routing]).permute(1, 0, 2).numpy()  # [T, L, K]
    return out, engine.cfg.expert_bytes(torch.bfloat16)


def synthetic(n_layers: int, n_exp: int, top_k: int, domains: set[str], tokens: int, zipf: float,
              seed: int) -> dict[str, np.ndarray]:
    """domain -> [T, L, K] expert ids drawn, per layer, from a Zipf popularity (rank r ∝ (r+1)^-zipf;
    0 = uniform) over experts in an order of their own per (domain, layer), so the hot experts move
    when the domain does. K distinct experts per token (Gumbel top-k: sampling without replacement)."""
    rng = np.random.default_rng(seed)
    logp = -zipf * np.log(np.arange(n_exp) + 1.0)
    out = {}
    for d in sorted(domains):
        order = np.stack([rng.permutation(n_exp) for _ in range(n_layers)])  # [L, E] expert at each rank
        ranks = np.argsort(-(logp + rng.gumbel(size=(tokens, n_layers, n_exp))), axis=-1)[..., :top_k]
        out[d] = order[np.arange(n_layers)[None, :, None], ranks]  # [T, L, K]
    return out


def skew(tr: dict[str, np.ndarray], n_exp: int) -> dict:
    """How concentrated the routing is, per (domain, layer), averaged: the rows share of the hottest
    10% of experts and the hottest expert's load over the mean."""
    top, peak = [], []
    hot = max(1, round(0.1 * n_exp))
    for ids in tr.values():
        for i in range(ids.shape[1]):
            c = np.sort(np.bincount(ids[:, i].reshape(-1), minlength=n_exp))[::-1]
            top.append(c[:hot].sum() / c.sum())
            peak.append(c[0] / c.mean())
    return {"hottest_10pct_row_share": round(float(np.mean(top)), 3),
            "hottest_over_mean": round(float(np.mean(peak)), 2)}


@dataclass
class Client:
    k: int
    domain: str = ""
    pos: int = 0
    prompt_left: int = 0
    left: int = 0
    requests: int = 0


@dataclass
class Result:
    tokens: int = 0
    failed: int = 0
    sent: int = 0
    gaps: list = field(default_factory=list)  # (time s, gap s)
    switches: list = field(default_factory=list)  # (load start s, switch s)
    fast_rows: int = 0
    rows: int = 0
    promoted: int = 0
    demoted: int = 0
    bytes_moved: int = 0
    streamed: int = 0  # experts streamed to the fast tier for one step
    phase_tokens: list = field(default_factory=list)
    first_phase_loads: np.ndarray | None = None


class Sim:
    def __init__(self, args, tr: dict[str, np.ndarray], expert_bytes: int, share: float, n_exp: int | None = None):
        self.args, self.tr, self.eb = args, tr, expert_bytes
        _, self.L, self.K = next(iter(tr.values())).shape
        self.E = n_exp or int(max(t.max() for t in tr.values())) + 1
        self.slots = max(0, round(share * self.L * self.E))  # the fast tier's copies, all workers together
        nf, nh = args.fast_workers, args.host_workers
        self.workers = ([TierWorker(FAST, (self.slots // nf + (i < self.slots % nf)) * expert_bytes) for i in range(nf)]
                        + [TierWorker(HOST, self.L * self.E * expert_bytes) for _ in range(nh)])
        self.cost = [args.row_ms] * nf + [args.row_ms * args.host_factor] * nh
        self.bounds = np.cumsum([s for _, s in args.phases])
        self.stream = StreamCosts(args.link_gbps * 1e9, args.row_ms / 1000, args.row_ms * args.host_factor / 1000)

    def domain_at(self, t: float) -> str:
        return self.args.phases[min(int(np.searchsorted(self.bounds, t, side="right")), len(self.bounds) - 1)][0]

    def placement(self, fast) -> Placement:
        return tier_placement(fast, list(range(self.L)), self.E, self.workers, self.eb)

    def start(self, mode: str, profile: np.ndarray | None) -> Placement:
        if mode == "all-fast":
            every = tuple((i, e) for i in range(self.L) for e in range(self.E))
            return Placement(tuple(every if w.tier == FAST else () for w in self.workers))
        fast = {"by-layer": lambda: layer_sets(self.L, self.E, self.slots),
                "uniform": lambda: uniform_sets(self.L, self.E, self.slots),
                "static": lambda: fast_sets(profile, self.slots),
                "online": lambda: fast_sets(profile, self.slots),
                "online+stream": lambda: fast_sets(profile, self.slots)}[mode]()
        return self.placement(fast)

    def begin(self, c: Client, t: float) -> None:
        c.domain, c.requests = self.domain_at(t), c.requests + 1
        i = c.k * 7 + c.requests * 13
        c.pos = (i * 97) % (len(self.tr[c.domain]) - self.args.prompt_tokens - 64)
        c.prompt_left = self.args.prompt_tokens
        c.left = self.args.max_tokens // 2 + (i * 13) % self.args.max_tokens

    def run(self, mode: str, profile: np.ndarray | None = None) -> Result:
        a, res = self.args, Result()
        table = self.start(mode, profile)
        fast = held = fast_of(table, self.workers, list(range(self.L)))  # decided / held by the table in use
        copies = table.copies()
        clients = [Client(k) for k in range(a.clients)]
        for c in clients:
            self.begin(c, 0.0)
            res.sent += 1
        ema = np.zeros((self.L, self.E))
        seen = np.zeros((self.L, self.E))
        pending, next_decide, decisions, moved = None, a.interval_s, 0, {}
        t, total, phase = 0.0, float(self.bounds[-1]), 0
        res.phase_tokens = [0] * len(self.bounds)
        while t < total:
            decoding = [c for c in clients if t >= a.stagger_s * c.k]  # requests join the batch one by one
            ids = []
            for c in decoding:
                n = c.prompt_left or 1
                ids.append(self.tr[c.domain][c.pos:c.pos + n])
            rows = np.concatenate(ids)  # [N, L, K]
            counts = np.stack([np.bincount(rows[:, i].reshape(-1), minlength=self.E) for i in range(self.L)])
            step_ms = a.router_ms
            try:
                for i in range(self.L):
                    layer_copies, link_ms = self.streamed(mode, i, counts[i], held[i], copies, res)
                    groups = choose_tiered(i, counts[i].tolist(), layer_copies, cost=self.cost, down=set())
                    per = {w: sum(k for _, _, k in g) for w, g in groups.items()}
                    step_ms += max(n * self.cost[w] + link_ms.get(w, 0.0) for w, n in per.items())
                    res.fast_rows += sum(n for w, n in per.items() if self.workers[w].tier == FAST)
                    res.rows += sum(per.values())
            except NoLiveCopy:
                res.failed += len(decoding)
                for c in decoding:
                    self.begin(c, t)
                    res.sent += 1
                continue
            t += step_ms / 1000
            while phase < len(self.bounds) - 1 and t >= self.bounds[phase]:
                phase += 1
            if phase == 0:
                seen += counts
            elif res.first_phase_loads is None:
                res.first_phase_loads = seen.copy()
            ema = (1 - a.alpha) * ema + a.alpha * counts
            for c in decoding:
                res.gaps.append((t, step_ms / 1000))  # a prefill's first token waits one step too
                res.tokens += 1
                res.phase_tokens[phase] += 1
                c.pos += c.prompt_left or 1
                c.prompt_left, c.left = 0, c.left - 1
                if c.left <= 0:
                    self.begin(c, t)
                    res.sent += 1
            if mode not in ONLINE:
                continue
            if pending and t >= pending[1]:
                table = pending[0]
                held, copies = fast_of(table, self.workers, list(range(self.L))), table.copies()
                res.switches.append((pending[2], t))
                pending = None
            if not pending and t >= next_decide:
                next_decide, decisions = t + a.interval_s, decisions + 1
                d = decide(ema, fast, self.slots, moved=moved, now=decisions, window_steps=2 / a.alpha - 1,
                           rule=Hysteresis(margin=a.margin, dwell=a.dwell, max_moves=a.max_moves,
                                           noise_z=a.noise_z))
                if d.promoted:
                    new = tier_placement(d.fast, list(range(self.L)), self.E, self.workers, self.eb, ema, table)
                    adds = sum(len(set(n) - set(o)) for n, o in zip(new.workers, table.workers))
                    pending = (new, t + adds * a.load_ms / 1000, t)
                    moved.update({x: decisions for x in d.promoted + d.demoted})
                    res.promoted, res.demoted = res.promoted + len(d.promoted), res.demoted + len(d.demoted)
                    res.bytes_moved += adds * self.eb
                    fast = d.fast
        return res

    def streamed(self, mode: str, i: int, counts: np.ndarray, held: frozenset[int], copies: dict,
                 res: Result) -> tuple[Mapping, dict[int, float]]:
        """online+stream: layer i's experts that stream to the fast tier this step (cluster/stream_load.py):
        their rows all go to one fast worker, whose link time (bytes / link) adds to its time."""
        if mode != "online+stream":
            return copies, {}
        nf = self.args.fast_workers
        chosen = stream_set(counts.tolist(), held, self.eb, self.stream, max_streams=self.args.stream_slots,
                            fast_workers=nf, host_workers=self.args.host_workers)
        if not chosen:
            return copies, {}
        link_ms: dict[int, float] = {}
        override = {}
        for e in sorted(chosen, key=lambda e: -counts[e]):
            w = min(range(nf), key=lambda w: (link_ms.get(w, 0.0), w))
            link_ms[w] = link_ms.get(w, 0.0) + 1000 * self.stream.link_s(self.eb)
            override[(i, e)] = (w,)
        res.streamed += len(chosen)
        return ChainMap(override, copies), link_ms


def pct(values: list[float], q: int) -> float | None:
    return round(1000 * statistics.quantiles(values, n=100)[q - 1], 1) if len(values) > 1 else None


def p99_within(res: Result, windows, warmup_s: float) -> float | None:
    """Inter-token p99 of `res` in `windows` (another run's promotion windows), after the warm-up."""
    return pct([g for t, g in res.gaps if t >= warmup_s and any(a <= t <= b for a, b in windows)], 99)


def summary(res: Result, phases, warmup_s: float) -> dict:
    """Inter-token windows leave out the first warmup_s (every request's prompt at once)."""
    total = sum(s for _, s in phases)
    gaps = [(t, g) for t, g in res.gaps if t >= warmup_s]
    inside = [g for t, g in gaps if any(a <= t <= b for a, b in res.switches)]
    steady = [g for t, g in gaps if not any(a - 1 <= t <= b + 1 for a, b in res.switches)]
    ratio = pct(inside, 99) / pct(steady, 99) if pct(inside, 99) and pct(steady, 99) else None
    return {"tokens_per_s": round(res.tokens / total, 1), "failed": res.failed, "sent": res.sent,
            "itl_p50_ms": pct([g for _, g in res.gaps], 50), "itl_p99_ms": pct([g for _, g in res.gaps], 99),
            "tokens_per_s_by_phase": [round(n / s, 1) for n, (_, s) in zip(res.phase_tokens, phases)],
            "fast_tier_row_share": round(res.fast_rows / max(res.rows, 1), 3),
            "promoted": res.promoted, "demoted": res.demoted, "bytes_moved": res.bytes_moved,
            "streamed_experts": res.streamed,
            "switches": len(res.switches), "itl_p99_ms_in_promotion_windows": pct(inside, 99),
            "itl_p99_ms_steady": pct(steady, 99), "promotion_over_steady_p99": round(ratio, 2) if ratio else None}


def compare(s: dict, phases) -> dict:
    unseen = [i for i, (d, _) in enumerate(phases) if i > 0 and d != phases[0][0]]
    rate = lambda m: sum(s[m]["tokens_per_s_by_phase"][i] for i in unseen) / max(len(unseen), 1)  # noqa: E731
    r = lambda x, y: round(s[x]["tokens_per_s"] / s[y]["tokens_per_s"], 2) if x in s and y in s else None  # noqa
    return {"online_over_all_fast": r("online", "all-fast"),
            "online_over_uniform": r("online", "uniform"),
            "online_over_by_layer": r("online", "by-layer"),
            "online_over_static_in_unseen_phases": (round(rate("online") / rate("static"), 2)
                                                    if "online" in s and "static" in s else None),
            "online_over_static_whole_run": r("online", "static"),
            "online_stream_over_all_fast": r("online+stream", "all-fast"),
            "online_stream_over_online": r("online+stream", "online"),
            "failed_requests_all_modes": sum(x["failed"] for x in s.values())}


def run_shares(args, tr: dict[str, np.ndarray], expert_bytes: int, n_exp: int | None = None,
               keep: dict | None = None, label: str = "") -> dict:
    """Every mode at every fast share; `keep` (for the plot) gets "label, share" → {mode → Result}."""
    out = {}
    for share in (float(x) for x in args.fast_shares.split(",")):
        sim = Sim(args, tr, expert_bytes, share, n_exp)
        runs = {m: sim.run(m) for m in ("all-fast", "by-layer", "uniform") if m in args.modes}
        profile = (runs["uniform"] if "uniform" in runs else sim.run("uniform")).first_phase_loads
        runs.update({m: sim.run(m, profile) for m in ("static", "online", "online+stream") if m in args.modes})
        s = {m: summary(runs[m], args.phases, args.warmup_s) for m in MODES if m in runs}
        if keep is not None:
            keep[f"{label}fast tier {share:.0%} of the expert bytes"] = {m: runs[m] for m in MODES if m in runs}
        for m in ("online", "online+stream"):
            if m in s and "static" in runs:  # the same windows without a switch: what the traffic alone does there
                same = p99_within(runs["static"], runs[m].switches, args.warmup_s)
                own = s[m]["itl_p99_ms_in_promotion_windows"]
                s[m]["static_itl_p99_ms_in_these_windows"] = same
                s[m]["promotion_windows_p99_over_static"] = round(own / same, 2) if own and same else None
        out[f"{share:g}"] = {"fast_copies": sim.slots, "of": sim.L * sim.E, "summary": s,
                             "ratios": compare(s, args.phases)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/demo")
    p.add_argument("--fast-shares", default="0.10,0.25", help="fast tier's share of the expert bytes, one run each")
    p.add_argument("--fast-workers", type=int, default=2)
    p.add_argument("--host-workers", type=int, default=2)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--phases", default="prose:20,code:20,numbers:20,prose:20", help="domain:simulated seconds")
    p.add_argument("--row-ms", type=float, default=1.0, help="T: a fast-tier worker's time per row")
    p.add_argument("--host-factor", type=float, default=10.0, help="a host-tier worker's time per row over T")
    p.add_argument("--router-ms", type=float, default=0.0, help="the router's time per step (attention etc.)")
    p.add_argument("--stagger-s", type=float, default=0.2, help="client k starts at k x this")
    p.add_argument("--warmup-s", type=float, default=5.0, help="left out of the inter-token windows")
    p.add_argument("--interval-s", type=float, default=1.0, help="online: seconds between decisions")
    p.add_argument("--alpha", type=float, default=2 / 21, help="online: EMA weight of the newest step (20 steps)")
    p.add_argument("--margin", type=float, default=Hysteresis.margin)
    p.add_argument("--dwell", type=int, default=Hysteresis.dwell)
    p.add_argument("--noise-z", type=float, default=Hysteresis.noise_z,
                   help="online: a swap's load gap must exceed this many standard deviations of the estimate's noise")
    p.add_argument("--max-moves", type=int, default=Hysteresis.max_moves, help="online: promotions per decision")
    p.add_argument("--load-ms", type=float, default=50.0, help="online: time to load one copy (staged: no stall)")
    p.add_argument("--windows", type=int, default=16, help="held-out windows per domain (x 128 tokens)")
    p.add_argument("--modes", default=",".join(MODES[:-1]), help="placements to run, of " + ",".join(MODES))
    p.add_argument("--prompt-tokens", type=int, default=16, help="each request's prompt (one prefill step)")
    p.add_argument("--stream", action="store_true", help="also run online+stream: stream-loading prefill")
    p.add_argument("--link-gbps", type=float, default=25.0, help="host → fast worker link, GB/s (PCIe 4.0 x16)")
    p.add_argument("--stream-slots", type=int, default=8, help="experts one layer may stream per step")
    p.add_argument("--expert-bytes", type=int, default=0, help="bytes of one expert (default: the model's, bf16)")
    p.add_argument("--config", default="", help="a published config (name in tests/published_configs.py, or a "
                   "config.json): synthetic routing of that shape instead of the demo model's real routing")
    p.add_argument("--zipf", default="0,1.0,1.5", help="--config: routing skews, Zipf exponents, one run each")
    p.add_argument("--layers", type=int, default=0, help="--config: MoE layers simulated (default all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", default="", help="a PNG: tokens/s and inter-token p99 over time per mode and run "
                   "(needs matplotlib: .venv/bin/pip install matplotlib)")
    p.add_argument("--measure-host-row", action="store_true", help="--config: time one expert of that shape on "
                   "this CPU (1 thread, float32): what --row-ms x --host-factor stands for")
    args = p.parse_args()
    args.phases = [(d, float(s)) for d, s in (x.split(":") for x in args.phases.split(","))]
    args.modes = args.modes.split(",")
    if args.stream and "online+stream" not in args.modes:
        args.modes.append("online+stream")
    domains = {d for d, _ in args.phases}
    keep = {} if args.plot else None
    out = {"workload": f"{args.clients} clients, phases {args.phases} (simulated s), {args.prompt_tokens}-token "
                       f"prompts, {args.fast_workers} fast workers at {args.row_ms:g} ms/row, {args.host_workers} "
                       f"host workers at {args.row_ms * args.host_factor:g} ms/row, router {args.router_ms:g} "
                       f"ms/step, copy load {args.load_ms:g} ms, link {args.link_gbps:g} GB/s"}
    if not args.config:
        tr, expert_bytes = traces(args.model, domains, args.windows, 128)
        eb = args.expert_bytes or expert_bytes
        out.update(expert_bytes=eb, shares=run_shares(args, tr, eb, keep=keep, label=f"{args.model}: "))
    else:
        cfg = published_config(args.config)
        layers = min(len(cfg.moe_layer_ids), args.layers or len(cfg.moe_layer_ids))
        import torch
        eb = args.expert_bytes or cfg.expert_bytes(torch.bfloat16)
        out.update(model=f"{args.config}: {cfg.num_experts} experts, top-{cfg.top_k}, {layers} of "
                         f"{len(cfg.moe_layer_ids)} MoE layers simulated (synthetic routing: no trained weights here)",
                   expert_bytes=eb, skews={})
        for z in (float(x) for x in args.zipf.split(",")):
            tr = synthetic(layers, cfg.num_experts, cfg.top_k, domains, args.windows * 128, z, args.seed)
            out["skews"][f"{z:g}"] = {"measured": skew(tr, cfg.num_experts),
                                      "shares": run_shares(args, tr, eb, cfg.num_experts, keep=keep,
                                                           label=f"{args.config}, zipf {z:g}: ")}
    if args.config and args.measure_host_row:
        out["host_row_measured"] = host_row_cost(published_config(args.config))
    if "online+stream" in args.modes:
        out["stream_crossover_rows"] = crossover_rows(out["expert_bytes"], StreamCosts(
            args.link_gbps * 1e9, args.row_ms / 1000, args.row_ms * args.host_factor / 1000))
    print(json.dumps(out, indent=1))
    if args.plot:
        from tier_plot import plot
        plot(keep, args.phases, args.plot)


def host_row_cost(cfg, rows=(1, 16, 64, 256), reps: int = 5) -> dict:
    """One routed expert of `cfg`'s shape (SwiGLU, float32 as CPU workers hold it) on one CPU thread:
    CPU ms per call for each row count (lower quartile of `reps`) and the per-row slope."""
    import time

    import torch
    import torch.nn.functional as F

    torch.set_num_threads(1)
    d, i = cfg.hidden_size, cfg.expert_intermediate_size
    gate_up, down = torch.randn(2 * i, d) * 0.02, torch.randn(d, i) * 0.02
    ms = {}
    for n in rows:
        x, times = torch.randn(n, d), []
        for _ in range(reps):
            t = time.thread_time()  # CPU time of this thread: other processes on a shared machine do not count
            g, u = (x @ gate_up.T).chunk(2, -1)
            (F.silu(g) * u) @ down.T
            times.append(1000 * (time.thread_time() - t))
        ms[n] = round(statistics.quantiles(times, n=4)[0], 3)
    slope = (ms[rows[-1]] - ms[rows[0]]) / (rows[-1] - rows[0])
    return {"shape": f"D={d}, I={i}, float32, 1 thread", "ms_per_call": ms, "ms_per_row": round(slope, 4)}


def published_config(name: str):
    """A published config.json by name (tests/published_configs.py: every field as released) or a path."""
    from cluster.sizing import model_config

    if Path(name).exists():
        return model_config(name)
    import tempfile

    from tests.published_configs import PUBLISHED
    if name not in PUBLISHED:
        raise SystemExit(f"--config: {name!r} is neither a file nor one of {sorted(PUBLISHED)}")
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "config.json").write_text(json.dumps(PUBLISHED[name]))
        return model_config(d)


if __name__ == "__main__":
    main()
