"""Traffic whose hot experts move: no balancing vs static DeepSeek EPLB vs our online autoscaler, in one run.

    .venv/bin/pip install matplotlib   # for the plot (not a serving dependency)
    .venv/bin/python bench/shift_bench.py [--workers 8] [--clients 16] \\
        [--phases prose:25,code:25,numbers:25,prose:25] [--extra 8] [--service-time-per-token 0.002] \\
        [--plot docs/shift.png]

The demo model routes each domain to different experts (tools/routing_stats.py --domains
prose,code,numbers). Each mode is a fresh deployment with the same traffic:
  off     round-robin placement, one copy per expert, no balancing;
  static  DeepSeek's EPLB planned once, at start, on the expert load recorded during the first
          phase of the `off` run (`mode: static`), with the same copy budget as online;
  online  our hot-expert autoscaler (extra_slots_per_layer copies, the same budget).
Expert workers behave like devices of fixed capacity (service-time model: one call at a time,
at least S seconds per row): this 2-core machine cannot show per-worker capacity otherwise.
Prints per mode: worker max/mean over time, inter-token latency p50/p99 overall and in the
30 s after each shift, throughput, failed requests, copies and bytes per worker, bytes moved,
seconds from each shift until max/mean ≤ 1.15, and the stall ratio (p99 inter-token latency
in windows containing a table switch over steady windows).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from cluster.profile import save_profile  # noqa: E402
from cluster.tokenizer import TextTokenizer  # noqa: E402
from tools.demo_corpus import documents  # noqa: E402

BALANCED = 1.15
ONLINE = {"enabled": True, "interval_s": 1, "window_steps": 20, "hot_threshold": BALANCED, "min_gain": 0.05,
          "cooldown_s": 3, "max_copies_per_expert": 4, "switch_timeout_s": 30}


def prompt_sets(model: str, domains: set[str]) -> dict[str, list[list[int]]]:
    tok = TextTokenizer.from_checkpoint(model)
    return {d: [tok.encode(doc[:2000])[:16] for doc in documents(d, "heldout")[:24]] for d in domains}


class Recorder:
    def __init__(self):
        self.t0, self.wall0 = time.perf_counter(), time.time()
        self.gaps: list[tuple[float, float]] = []  # (time, inter-token gap)
        self.tokens: list[float] = []
        self.failed: list[float] = []
        self.sent = 0
        self.samples: list[dict] = []  # (time, worst-layer max/mean, copies and bytes per worker)
        self.history: list[dict] = []
        self.profile_totals: list = []

    def now(self) -> float:
        return time.perf_counter() - self.t0


async def client(session, url: str, rec: Recorder, domain_at, prompts, max_tokens: int, end: float, k: int):
    i = k
    await asyncio.sleep(0.2 * k)  # staggered: requests join the batch one by one
    while rec.now() < end:
        domain = domain_at(rec.now())
        prompt = prompts[domain][i % len(prompts[domain])]
        i += 7
        rec.sent += 1
        body = {"prompt": prompt, "max_tokens": max_tokens // 2 + (i * 13) % max_tokens, "temperature": 0,
                "stream": True, "ignore_eos": True}
        last = None
        try:
            async with session.post(f"{url}/v1/completions", json=body) as r:
                if r.status != 200:
                    raise RuntimeError(r.status)
                async for line in r.content:
                    if line.startswith(b"data: {"):
                        if b'"error"' in line:
                            raise RuntimeError(line[:200])
                        t = rec.now()
                        rec.tokens.append(t)
                        if last is not None:
                            rec.gaps.append((t, t - last))
                        last = t
        except Exception:  # noqa: BLE001 - counted, the run goes on
            rec.failed.append(rec.now())


def _sample(url: str) -> dict:
    dp = requests.get(f"{url}/admin/stats", timeout=30).json()["data_plane"]
    return {"max_over_mean": max(dp["worker_max_over_mean"], default=0.0), "copies": dp["copies_per_worker"],
            "bytes": dp["bytes_per_worker"]}


async def poll(url: str, rec: Recorder, end: float, first_phase_end: float) -> None:
    """Samples every 0.5 s; at the end of the first phase, the expert-load totals for a profile."""
    rec.profile_totals.append(await asyncio.to_thread(_totals, url))
    while rec.now() < end:
        sample = await asyncio.to_thread(_sample, url)
        rec.samples.append({"t": rec.now(), **sample})
        if len(rec.profile_totals) == 1 and rec.now() >= first_phase_end:
            rec.profile_totals.append(await asyncio.to_thread(_totals, url))
        await asyncio.sleep(0.5)


def _totals(url: str) -> tuple[list[int], list]:
    load = requests.get(f"{url}/admin/load", timeout=30).json()["load"]
    return load["layers"], load["total_tokens"]


async def drive(url: str, prompts, phases: list[tuple[str, float]], clients: int, max_tokens: int) -> Recorder:
    import aiohttp

    rec = Recorder()
    bounds = np.cumsum([s for _, s in phases])
    domain_at = lambda t: phases[min(int(np.searchsorted(bounds, t, side="right")), len(phases) - 1)][0]  # noqa
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        await asyncio.gather(poll(url, rec, bounds[-1], bounds[0]),
                             *(client(session, url, rec, domain_at, prompts, max_tokens, bounds[-1], k)
                               for k in range(clients)))
    return rec


def run_mode(args, prompts, mode: str, profile: str | None) -> Recorder:
    import ray
    from ray import serve

    from deployments.app import build_app
    from deployments.config import app_config
    from deployments.local import start_local_ray

    start_local_ray("127.0.0.1", 8, 1 << 20, _temp_dir=tempfile.mkdtemp(prefix="/tmp/moe-shift-"), log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        policy = {"off": {**ONLINE, "enabled": False, "extra_slots_per_layer": 0},
                  "static": {**ONLINE, "mode": "static", "profile_file": profile, "extra_slots_per_layer": args.extra},
                  "online": {**ONLINE, "extra_slots_per_layer": args.extra}}[mode]
        cfg = app_config({"model": args.model, "num_workers": args.workers, "routers": {"num_cpus": 0.5},
                          "max_num_seqs": args.clients, "max_model_len": 256, "autoscaler": policy,
                          "worker": {"num_cpus": 0.25, "torch_threads": 1,
                                     "service_time_per_token_s": args.service_time_per_token}})
        serve.run(build_app(cfg), name="moe", route_prefix="/")
        url = f"http://127.0.0.1:{args.port}"
        _settle(url, prompts, mode)
        print(f"{mode}: {sum(s for _, s in args.phases):g} s of traffic", file=sys.stderr, flush=True)
        rec = asyncio.run(drive(url, prompts, args.phases, args.clients, args.max_tokens))
        rec.history = [{**h, "time": round(h["time"] - rec.wall0, 2)}
                       for h in requests.get(f"{url}/admin/autoscaler", timeout=30).json().get("history", [])]
        return rec
    finally:
        serve.shutdown()
        ray.shutdown()


def _settle(url: str, prompts, mode: str) -> None:
    """Ready, and (static) the EPLB placement in force before traffic starts."""
    deadline = time.time() + 120
    while time.time() < deadline:
        ok = requests.get(f"{url}/ready", timeout=30).status_code == 200
        history = requests.get(f"{url}/admin/autoscaler", timeout=30).json().get("history", [])
        if ok and (mode != "static" or any(h["outcome"] == "done" for h in history)):
            return
        requests.post(f"{url}/v1/completions", json={"prompt": prompts["prose"][0], "max_tokens": 2}, timeout=120)
        time.sleep(1)
    raise RuntimeError(f"{mode}: not settled within 120 s")


def pct(values: list[float], q: int) -> float | None:
    return round(1000 * statistics.quantiles(values, n=100)[q - 1], 1) if len(values) > 1 else None


def summary(rec: Recorder, phases: list[tuple[str, float]]) -> dict:
    starts = list(np.cumsum([0] + [s for _, s in phases]))[:-1]
    shifts = []
    for lo in starts[1:]:
        after = [g for t, g in rec.gaps if lo <= t < lo + 30]
        reached = next((s["t"] - lo for s in rec.samples if s["t"] >= lo and 0 < s["max_over_mean"] <= BALANCED),
                       None)
        end = [s for s in rec.samples if s["t"] < lo]
        shifts.append({"at_s": lo, "itl_p99_ms_30s_after": pct(after, 99),
                       "s_until_max_over_mean_le_1.15": round(reached, 1) if reached is not None else None,
                       "copies_per_worker_before": end[-1]["copies"] if end else None,
                       "bytes_per_worker_before": end[-1]["bytes"] if end else None})
    switches = [(h["time"] - h["seconds"], h["time"]) for h in rec.history if h["outcome"] in ("done", "abandoned")]
    in_switch = [g for t, g in rec.gaps if any(a <= t <= b for a, b in switches)]
    steady = [g for t, g in rec.gaps if not any(a - 1 <= t <= b + 1 for a, b in switches)]
    total = sum(s for _, s in phases)
    return {"sent": rec.sent, "failed": len(rec.failed), "itl_p50_ms": pct([g for _, g in rec.gaps], 50),
            "itl_p99_ms": pct([g for _, g in rec.gaps], 99), "tokens_per_s": round(len(rec.tokens) / total, 1),
            "shifts": shifts, "rebalances": len(switches), "bytes_moved": sum(h["bytes_loaded"] for h in rec.history),
            "copies_per_worker_at_end": rec.samples[-1]["copies"] if rec.samples else None,
            "bytes_per_worker_at_end": rec.samples[-1]["bytes"] if rec.samples else None,
            "itl_p99_ms_in_switch_windows": pct(in_switch, 99), "itl_p99_ms_steady": pct(steady, 99)}


def write_profile(rec: Recorder, path: str) -> None:
    (layers, before), (_, after) = rec.profile_totals[0], rec.profile_totals[1]
    save_profile(path, np.asarray(after, float) - np.asarray(before, float), layers, {"recorded": "first phase"})


def plot(recs: dict[str, Recorder], phases, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(9, 9), sharex=True)
    for mode, rec in recs.items():
        axes[0].plot([s["t"] for s in rec.samples], [s["max_over_mean"] for s in rec.samples], label=mode)
        buckets = np.arange(0, sum(s for _, s in phases), 5.0)
        p99 = [pct([g for t, g in rec.gaps if b <= t < b + 5], 99) for b in buckets]
        axes[1].plot(buckets + 5, p99, marker=".", label=mode)
        axes[2].plot([s["t"] for s in rec.samples], [max(s["bytes"]) / 2**20 for s in rec.samples], label=mode)
    for ax, label in zip(axes, ["worker max/mean load", "inter-token p99, 5 s (ms)", "most expert MiB on a worker"]):
        for lo in np.cumsum([0] + [s for _, s in phases])[1:-1]:
            ax.axvline(lo, color="grey", linestyle=":", linewidth=1)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].axhline(BALANCED, color="grey", linestyle="--", linewidth=1)
    axes[0].legend()
    axes[0].set_title(" → ".join(d for d, _ in phases) + " (demo model; service-time model on)")
    axes[2].set_xlabel("seconds")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/demo")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--phases", default="prose:25,code:25,numbers:25,prose:25")
    p.add_argument("--extra", type=int, default=8, help="extra copies per layer, static and online alike")
    p.add_argument("--service-time-per-token", type=float, default=0.002)
    p.add_argument("--port", type=int, default=8125)
    p.add_argument("--plot", default=None, help="write a PNG here (needs matplotlib)")
    args = p.parse_args()
    args.phases = [(d, float(s)) for d, s in (x.split(":") for x in args.phases.split(","))]
    prompts = prompt_sets(args.model, {d for d, _ in args.phases} | {"prose"})
    profile = str(Path(tempfile.mkdtemp(prefix="moe-shift-")) / "profile.json")
    recs = {"off": run_mode(args, prompts, "off", None)}
    write_profile(recs["off"], profile)
    recs["static"] = run_mode(args, prompts, "static", profile)
    recs["online"] = run_mode(args, prompts, "online", None)
    summaries = {mode: summary(rec, args.phases) for mode, rec in recs.items()}
    after = lambda m: [s["itl_p99_ms_30s_after"] for s in summaries[m]["shifts"]]  # noqa: E731
    online = summaries["online"]
    print(json.dumps({
        "workload": f"{args.clients} streaming clients, {args.workers} workers, phases {args.phases}, "
                    f"{args.extra} extra copies per layer (static and online), service time "
                    f"{args.service_time_per_token * 1000:g} ms per row",
        "summary": summaries,
        "static_over_online_itl_p99_30s_after_each_shift": [round(s / o, 2) if s and o else None
                                                             for s, o in zip(after("static"), after("online"))],
        "online_stall_ratio": round(online["itl_p99_ms_in_switch_windows"] / online["itl_p99_ms_steady"], 2)
        if online["itl_p99_ms_in_switch_windows"] and online["itl_p99_ms_steady"] else None}, indent=1))
    if args.plot:
        plot(recs, args.phases, args.plot)
        print(f"plot: {args.plot}", file=sys.stderr)


if __name__ == "__main__":
    main()
