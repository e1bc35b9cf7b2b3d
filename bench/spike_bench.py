"""Domain-spike benchmark: mixed traffic, then a spike of code-only traffic, then mixed again,
run twice in one go — hot-expert autoscaler off, then on — on the demo model.

    .venv/bin/pip install matplotlib   # for the plot (not a serving dependency)
    .venv/bin/python bench/spike_bench.py [--workers 8] [--clients 16] [--phases 20,45,20]
        [--service-time-per-token 0.002] [--plot docs/spike.png]

Each expert worker is made to behave like a device of fixed capacity with the
service-time model (`worker.service_time_per_token_s`): calls run one at a time
and take at least that long per row. This machine's 2 shared cores cannot show
real per-worker capacity otherwise; say so wherever the figures are quoted.
Reports, per 5-s bucket: worker max/mean load (worst layer, from the router's EMA
loads and its live placement), inter-token latency p50/p99, throughput, failed
requests; and a summary per mode.
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

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cluster.tokenizer import TextTokenizer  # noqa: E402
from tools.demo_corpus import documents  # noqa: E402

BUCKET_S = 5.0
POLICY = {"enabled": True, "interval_s": 2, "window_steps": 40, "hot_threshold": 1.15, "min_gain": 0.05,
          "cooldown_s": 8, "extra_slots_per_layer": 24, "max_copies_per_expert": 4, "drain_s": 1}


def prompt_sets(model: str) -> dict[str, list[list[int]]]:
    tok = TextTokenizer.from_checkpoint(model)
    cut = lambda docs: [tok.encode(d[:2000])[:16] for d in docs[:24]]  # noqa: E731
    code, prose = cut(documents("code", "heldout")), cut(documents("prose", "heldout"))
    return {"code": code, "mixed": [p for pair in zip(code, prose) for p in pair]}


class Recorder:
    def __init__(self):
        self.t0, self.wall0 = time.perf_counter(), time.time()
        self.rebalances: list[dict] = []
        self.gaps: list[tuple[float, float]] = []  # (time, inter-token gap)
        self.tokens: list[float] = []
        self.failed: list[float] = []
        self.sent = 0
        self.imbalance: list[tuple[float, float, int]] = []  # (time, worst-layer max/mean, copies)

    def now(self) -> float:
        return time.perf_counter() - self.t0


async def client(session, url: str, rec: Recorder, phase_of, prompts, max_tokens: int, end: float, seed: int):
    i = seed
    await asyncio.sleep(0.25 * seed)  # staggered starts and lengths: requests join the batch one by one
    while rec.now() < end:
        domain = phase_of(rec.now())
        prompt = prompts[domain][i % len(prompts[domain])]
        i += 7
        rec.sent += 1
        n = max_tokens // 2 + (i * 13) % max_tokens
        body = {"prompt": prompt, "max_tokens": n, "temperature": 0, "stream": True, "ignore_eos": True}
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


async def poll(url: str, rec: Recorder, end: float) -> None:
    while rec.now() < end:
        dp = await asyncio.to_thread(lambda: requests.get(f"{url}/admin/stats", timeout=30).json()["data_plane"])
        rec.imbalance.append((rec.now(), max(dp["worker_max_over_mean"], default=0.0), dp["copies"]))
        await asyncio.sleep(1.0)


async def drive(url: str, prompts, phases: list[float], clients: int, max_tokens: int) -> Recorder:
    import aiohttp

    rec = Recorder()
    bounds = [sum(phases[:i + 1]) for i in range(len(phases))]
    phase_of = lambda t: "code" if bounds[0] <= t < bounds[1] else "mixed"  # noqa: E731
    end = bounds[-1]
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        await asyncio.gather(poll(url, rec, end),
                             *(client(session, url, rec, phase_of, prompts, max_tokens, end, k) for k in range(clients)))
    return rec


def pct(values: list[float], q: int) -> float:
    return round(1000 * statistics.quantiles(values, n=100)[q - 1], 1) if len(values) > 1 else float("nan")


def buckets(rec: Recorder, total: float) -> list[dict]:
    out = []
    for k in range(int(total // BUCKET_S)):
        lo, hi = k * BUCKET_S, (k + 1) * BUCKET_S
        gaps = [g for t, g in rec.gaps if lo <= t < hi]
        imb = [v for t, v, _ in rec.imbalance if lo <= t < hi]
        out.append({"t": hi, "worker_max_over_mean": round(max(imb), 3) if imb else None,
                    "itl_ms_p50": pct(gaps, 50), "itl_ms_p99": pct(gaps, 99),
                    "tokens_per_s": round(sum(lo <= t < hi for t in rec.tokens) / BUCKET_S, 1),
                    "failed": sum(lo <= t < hi for t in rec.failed)})
    return out


def summary(rec: Recorder, phases: list[float]) -> dict:
    spike_lo, spike_hi = phases[0], phases[0] + phases[1]
    spike_gaps = [g for t, g in rec.gaps if spike_lo <= t < spike_hi]
    balanced_at = next((t - spike_lo for t, v, _ in rec.imbalance if spike_lo <= t < spike_hi and 0 < v <= 1.2
                        and all(w <= 1.2 for u, w, _ in rec.imbalance if t <= u < spike_hi)), None)
    late = [v for t, v, _ in rec.imbalance if spike_lo + 30 <= t < spike_hi]
    return {"sent": rec.sent, "failed": len(rec.failed),
            "spike_itl_ms_p50": pct(spike_gaps, 50), "spike_itl_ms_p99": pct(spike_gaps, 99),
            "spike_tokens_per_s": round(sum(spike_lo <= t < spike_hi for t in rec.tokens) / phases[1], 1),
            "spike_worker_max_over_mean_after_30s": round(max(late), 3) if late else None,
            "seconds_from_spike_to_max_over_mean_le_1.2_for_good": round(balanced_at, 1) if balanced_at else None,
            "copies_at_end": rec.imbalance[-1][2] if rec.imbalance else None,
            "rebalances": rec.rebalances}


def run_mode(args, prompts, autoscale: bool) -> Recorder:
    import ray
    from ray import serve

    from deployments.app import build_app
    from deployments.config import app_config

    ray.init(num_cpus=8, include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix="/tmp/moe-spike-"),
             log_to_driver=False, _node_ip_address="127.0.0.1")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        cfg = app_config({"model": args.model, "num_workers": args.workers, "routers": {"num_cpus": 0.5},
                          "max_num_seqs": args.clients, "max_model_len": 256,
                          "autoscaler": {**POLICY, "enabled": autoscale},
                          "worker": {"num_cpus": 0.25, "torch_threads": 1,
                                     "service_time_per_token_s": args.service_time_per_token}})
        serve.run(build_app(cfg), name="moe", route_prefix="/")
        url = f"http://127.0.0.1:{args.port}"
        requests.post(f"{url}/v1/completions", json={"prompt": prompts["mixed"][0], "max_tokens": 4}, timeout=120)
        print(f"autoscaler {'on' if autoscale else 'off'}: running {sum(args.phases):g} s of traffic",
              file=sys.stderr, flush=True)
        rec = asyncio.run(drive(url, prompts, args.phases, args.clients, args.max_tokens))
        history = requests.get(f"{url}/admin/autoscaler", timeout=30).json().get("history", [])
        rec.rebalances = [{**h, "time": round(h["time"] - rec.wall0, 1)} for h in history]
        return rec
    finally:
        serve.shutdown()
        ray.shutdown()


def plot(results: dict[str, list[dict]], phases: list[float], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(8, 8), sharex=True)
    for mode, rows in results.items():
        t = [r["t"] for r in rows]
        axes[0].plot(t, [r["worker_max_over_mean"] for r in rows], marker="o", label=f"autoscaler {mode}")
        axes[1].plot(t, [r["itl_ms_p99"] for r in rows], marker="o", label=f"autoscaler {mode}")
        axes[2].plot(t, [r["tokens_per_s"] for r in rows], marker="o", label=f"autoscaler {mode}")
    for ax, label in zip(axes, ["worker max/mean load", "inter-token p99 (ms)", "tokens/s"]):
        ax.axvspan(phases[0], phases[0] + phases[1], color="orange", alpha=0.15)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].axhline(1.2, color="grey", linestyle="--", linewidth=1)
    axes[0].legend()
    axes[0].set_title("Code-only spike (shaded) between mixed traffic; demo model, service-time model on")
    axes[2].set_xlabel("seconds")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/demo")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--phases", default="20,45,20", help="seconds of mixed, code-only, mixed traffic")
    p.add_argument("--service-time-per-token", type=float, default=0.002)
    p.add_argument("--port", type=int, default=8124)
    p.add_argument("--plot", default=None, help="write a PNG here (needs matplotlib)")
    args = p.parse_args()
    args.phases = [float(x) for x in args.phases.split(",")]
    prompts = prompt_sets(args.model)
    recs = {mode: run_mode(args, prompts, mode == "on") for mode in ("off", "on")}
    total = sum(args.phases)
    results = {mode: buckets(rec, total) for mode, rec in recs.items()}
    summaries = {mode: summary(rec, args.phases) for mode, rec in recs.items()}
    off, on = summaries["off"]["spike_itl_ms_p99"], summaries["on"]["spike_itl_ms_p99"]
    print(json.dumps({"workload": f"{args.clients} streaming clients, {args.max_tokens // 2}-{args.max_tokens * 3 // 2 - 1} tokens each, {args.workers} "
                                  f"workers, phases {args.phases} s (mixed, code, mixed), service time "
                                  f"{args.service_time_per_token * 1000:g} ms per row",
                      "summary": summaries, "spike_p99_itl_off_over_on": round(off / on, 2),
                      "buckets": results}, indent=1))
    if args.plot:
        plot(results, args.phases, args.plot)
        print(f"plot: {args.plot}", file=sys.stderr)


if __name__ == "__main__":
    main()
