"""What the placement controller and the split ingress cost, measured in one run.

    .venv/bin/python bench/controller_bench.py [--model PATH] [--routers 2] [--workers 3] [--requests 60]

1. Table switch: skewed traffic starts (a load change); the controller plans a new table; how long
   until it is published, and until every router routes by it.
2. Messages: router reports and ingress polls the controller answers per second.
3. Ingress overhead: a 1-token completion through HTTP (proxy → ingress → router) against the same
   call made straight to a router's handle, and against the in-process engine.
Prints a table; figures go to docs/benchmarks.md with the command.
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SKEWED = [[5, 17, 33], [5, 17, 34], [5, 17, 33, 9]]
POLICY = dict(interval_s=0.5, window_steps=4, hot_threshold=1.0, min_gain=0.01, cooldown_s=0,
              extra_slots_per_layer=3, max_copies_per_expert=2)


def ms(values: list[float], q: int = 50) -> float:
    return round(1000 * statistics.quantiles(values, n=100)[q - 1], 2) if len(values) > 1 else float("nan")


def start(args) -> tuple[str, object]:
    from ray import serve

    from deployments.app import build_app
    from deployments.config import app_config
    from deployments.local import start_local_ray
    from deployments.edge import free_port

    start_local_ray("127.0.0.1", 8, 1 << 20, _temp_dir=tempfile.mkdtemp(prefix="/tmp/moe-bench-"),
                    log_to_driver=False)
    port = free_port("127.0.0.1")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    cfg = app_config({"model": args.model, "num_workers": args.workers, "max_num_seqs": 16, "max_model_len": 256,
                      "routers": {"min": args.routers, "max": args.routers, "num_cpus": 0.25},
                      "worker": {"num_cpus": 0.25}, "autoscaler": POLICY})
    serve.run(build_app(cfg), name="moe", route_prefix="/")
    return f"http://127.0.0.1:{port}", serve


def admin(base: str, what: str) -> dict:
    return requests.get(f"{base}/admin/{what}", timeout=30).json()


def table_switch(base: str, routers: int) -> dict:
    """Skewed traffic from t0; the first change's publish time; when every router reports it."""
    while len(admin(base, "stats")["routers"]) < routers:
        time.sleep(0.2)
    reports_before, t_reports = admin(base, "stats")["controller_reports"], time.time()
    t0, stop = time.time(), False

    def traffic():
        while not stop:
            requests.post(f"{base}/v1/completions", timeout=60,
                          json={"prompt": SKEWED[int(time.time() * 10) % 3], "max_tokens": 4, "temperature": 0})

    with ThreadPoolExecutor(3) as pool:
        for _ in range(3):
            pool.submit(traffic)
        published = switched = None
        deadline = time.time() + 120
        while switched is None and time.time() < deadline:
            done = [h for h in admin(base, "autoscaler")["history"] if h["outcome"] == "done"]
            if done and published is None:
                published = done[0]
            if published is not None:
                versions = [r["table_version"] for r in admin(base, "stats")["routers"].values()]
                if len(versions) == routers and min(versions) >= published["table_version"]:
                    switched = time.time()
            time.sleep(0.05)
        stop = True
    reports = admin(base, "stats")["controller_reports"] - reports_before
    change_s = published["seconds"]  # load copies → publish → every router switched → retire
    return {"load change → change done (s)": round(published["time"] - t0, 2),
            "change: load, switch, retire (s)": change_s,
            "router reports per s (all routers)": round(reports / (time.time() - t_reports), 1),
            "observed every router on the new table (s after t0)": round((switched or float("nan")) - t0, 2)}


def overhead(base: str, model: str, n: int) -> dict:
    from ray import serve

    from cluster.engine import LLMEngine, SamplingParams
    from deployments.messages import GenerateRequest

    body = {"prompt": [5, 17, 33], "max_tokens": 1, "temperature": 0}
    http = []
    for _ in range(n):
        t = time.perf_counter()
        requests.post(f"{base}/v1/completions", json=body, timeout=60).raise_for_status()
        http.append(time.perf_counter() - t)
    router = serve.get_deployment_handle("router", "moe").options(stream=True)

    async def direct_once() -> float:
        t = time.perf_counter()
        async for _ in router.generate.remote(GenerateRequest([5, 17, 33], SamplingParams(max_tokens=1, temperature=0,
                                                                                          seed=1))):
            pass
        return time.perf_counter() - t

    async def direct_all():
        return [await direct_once() for _ in range(n)]

    direct = asyncio.run(direct_all())
    engine = LLMEngine.from_pretrained(model, max_model_len=256)
    local = []
    for _ in range(n):
        t = time.perf_counter()
        engine.generate([[5, 17, 33]], SamplingParams(max_tokens=1, temperature=0))
        local.append(time.perf_counter() - t)
    return {"1-token request via HTTP + ingress, p50 ms": ms(http), "straight to a router's handle, p50 ms": ms(direct),
            "ingress + proxy overhead, p50 ms": round(ms(http) - ms(direct), 2),
            "in-process engine, p50 ms": ms(local)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None, help="default: a tiny random Mixtral checkpoint made here")
    p.add_argument("--routers", type=int, default=2)
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--requests", type=int, default=60)
    args = p.parse_args()
    if args.model is None:
        from tools.checkpoints import make_checkpoint

        args.model = str(make_checkpoint("mixtral", Path(tempfile.mkdtemp(prefix="moe-bench-ckpt-"))))
    base, serve = start(args)
    try:
        results = {**table_switch(base, args.routers), **overhead(base, args.model, args.requests)}
    finally:
        serve.shutdown()
    print(f"\n{args.routers} routers, {args.workers} expert workers, policy interval {POLICY['interval_s']} s, "
          "router report interval 0.5 s")
    print("| figure | value |\n|---|---|")
    for k, v in results.items():
        print(f"| {k} | {v} |")


if __name__ == "__main__":
    main()
