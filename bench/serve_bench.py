"""Serving benchmark: N concurrent streaming clients against the distributed server, then the
same workload through the in-process engine, in one run.

    .venv/bin/python bench/serve_bench.py [--model models/demo] [--workers 2] [--concurrency 64] [--max-tokens 64]
    .venv/bin/python bench/serve_bench.py --url http://127.0.0.1:8000   # against a server already running

Prints throughput, time to first token and inter-token latency (p50/p99), where
the router's decode-step time went (backbone compute, waiting on expert
workers, serialisation), the CPU milliseconds each kind of process spent per
streamed token (Serve's proxy and the ingress: HTTP, SSE and Serve's streaming
path), and distributed ÷ in-process throughput.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_bench import make_prompts  # noqa: E402

from cluster.engine import LLMEngine, SamplingParams  # noqa: E402


def pct(values: list[float], q: float) -> float:
    return round(1000 * statistics.quantiles(values, n=100)[q - 1], 1) if len(values) > 1 else float("nan")


async def stream_one(session, url: str, prompt: list[int], max_tokens: int) -> tuple[float, list[float]]:
    """One streaming request: (time to first token, gaps between tokens)."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True, "ignore_eos": True}
    t0 = time.perf_counter()
    stamps = []
    async with session.post(f"{url}/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.content:
            if line.startswith(b"data: {"):
                stamps.append(time.perf_counter())
    return stamps[0] - t0, [b - a for a, b in zip(stamps, stamps[1:])]


async def _all_streams(url: str, prompts: list[list[int]], max_tokens: int):
    # One asyncio client for all streams: the load generator shares the 2 cores with the server,
    # and 64 threads of blocking clients cost it far more CPU.
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        return await asyncio.gather(*(stream_one(session, url, p, max_tokens) for p in prompts))


def cpu_seconds_by_role() -> dict[str, float]:
    """CPU seconds (user + system) so far of each kind of process on this machine: Serve's proxy, each
    deployment's replicas (ray::ServeReplica:<app>:<deployment>), the load generator (this process)."""
    try:
        import psutil  # comes with the test extras (accelerate)
    except ImportError:
        return {}
    out: dict[str, float] = {}
    me = psutil.Process()
    for proc in psutil.process_iter(["name", "cmdline", "cpu_times"]):
        role = _role(proc.info["name"] or "", (proc.info["cmdline"] or [""])[0], proc.pid == me.pid)
        if role and proc.info["cpu_times"] is not None:
            out[role] = out.get(role, 0.0) + proc.info["cpu_times"].user + proc.info["cpu_times"].system
    return out


def _role(name: str, title: str, mine: bool) -> str | None:
    if mine:
        return "load generator (this process)"
    if name in ("raylet", "gcs_server"):
        return name
    if "ServeReplica:" in title:  # SERVE_REPLICA::app#deployment#id:ServeReplica:app:deployment.method
        deployment = title.split("ServeReplica:", 1)[1].split(":", 1)[-1].split(".", 1)[0]
        return "expert workers (all)" if deployment.startswith("expert-worker") else deployment
    return title[5:].split(" ")[0] if title.startswith("ray::") else None


def cpu_ms_per_token(before: dict[str, float], after: dict[str, float], tokens: int) -> dict[str, float]:
    """Where the machine's CPU went, per streamed token: the proxy and the ingress are the cost of
    HTTP, SSE and Serve's streaming path; the router's is the engine's; the workers', the experts'."""
    spent = {role: after[role] - before.get(role, 0.0) for role in after}
    return {role: round(1000 * s / tokens, 3) for role, s in sorted(spent.items(), key=lambda kv: -kv[1]) if s > 0.01}


def run_clients(url: str, prompts: list[list[int]], max_tokens: int) -> dict:
    before = requests.get(f"{url}/admin/stats", timeout=30).json()
    cpu_before = cpu_seconds_by_role()
    t0 = time.perf_counter()
    results = asyncio.run(_all_streams(url, prompts, max_tokens))
    seconds = time.perf_counter() - t0
    cpu_after = cpu_seconds_by_role()
    time.sleep(1.5)  # router counters reach /admin/stats with their next report (every 0.5 s)
    after = requests.get(f"{url}/admin/stats", timeout=30).json()
    ttft = [r[0] for r in results]
    itl = [g for r in results for g in r[1]]
    tokens = len(prompts) * max_tokens
    return {"tokens_per_s": round(tokens / seconds, 1),
            "ttft_ms_p50": pct(ttft, 50), "ttft_ms_p99": pct(ttft, 99),
            "itl_ms_p50": pct(itl, 50), "itl_ms_p99": pct(itl, 99), "breakdown": breakdown(before, after),
            "cpu_ms_per_token": cpu_ms_per_token(cpu_before, cpu_after, tokens)}


def breakdown(before: dict, after: dict) -> dict:
    steps = after["steps"] - before["steps"]
    step_s = after["step_seconds"] - before["step_seconds"]
    out = {"steps": steps, "step_ms": round(1000 * step_s / max(steps, 1), 2)}
    if after.get("data_plane"):
        dp = {k: after["data_plane"][k] - before["data_plane"][k]
              for k in ("serialize_s", "wait_s", "deserialize_s", "calls")}
        network = dp["serialize_s"] + dp["wait_s"] + dp["deserialize_s"]
        out.update({f"{k[:-2]}_ms_per_step": round(1000 * dp[k] / max(steps, 1), 2)
                    for k in ("serialize_s", "wait_s", "deserialize_s")})
        out["backbone_ms_per_step"] = round(1000 * (step_s - network) / max(steps, 1), 2)
        out["expert_calls_per_step"] = round(dp["calls"] / max(steps, 1), 1)
    return out


def start_server(model: str, workers: int, port: int, extra: dict) -> None:
    from ray import serve

    from deployments.app import build_app
    from deployments.config import app_config
    from deployments.local import start_local_ray

    start_local_ray("127.0.0.1", 8, 1 << 20, _temp_dir=tempfile.mkdtemp(prefix="/tmp/moe-bench-"),
                    log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    cfg = app_config({"model": model, "num_workers": workers, "routers": {"num_cpus": 0.5}, "max_num_seqs": 64,
                      "max_model_len": 512, "worker": {"num_cpus": 0.25, "torch_threads": 1}, **extra})
    serve.run(build_app(cfg), name="moe", route_prefix="/")


def stop_server() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


def in_process(model: str, prompts: list[list[int]], max_tokens: int) -> float:
    engine = LLMEngine.from_pretrained(model, max_num_seqs=len(prompts), max_model_len=512)
    engine.generate(prompts[:2], SamplingParams(max_tokens=4, temperature=0))
    t0 = time.perf_counter()
    engine.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
    return round(len(prompts) * max_tokens / (time.perf_counter() - t0), 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/demo")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--url", default=None, help="a running server (default: start one here)")
    p.add_argument("--port", type=int, default=8123)
    p.add_argument("--serve-env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment for Ray and Serve's processes, e.g. RAY_SERVE_PROXY_USE_GRPC=1 (repeatable)")
    p.add_argument("--app", default="{}", help="extra application config as JSON, e.g. '{\"overlap\": \"on\"}'")
    args = p.parse_args()
    os.environ.update(dict(kv.split("=", 1) for kv in args.serve_env))
    prompts = make_prompts(LLMEngine.from_pretrained(args.model, max_num_seqs=1), args.concurrency)
    url = args.url or f"http://127.0.0.1:{args.port}"
    if not args.url:
        start_server(args.model, args.workers, args.port, json.loads(args.app))
    try:
        asyncio.run(_all_streams(url, prompts[:1], 4))  # warm-up
        served = run_clients(url, prompts, args.max_tokens)
    finally:
        if not args.url:
            stop_server()
    local = in_process(args.model, prompts, args.max_tokens)
    result = {"workload": f"{args.concurrency} concurrent streams x {args.max_tokens} tokens, greedy, "
                          f"{args.workers} expert workers", "serve_env": args.serve_env, "app": json.loads(args.app),
              "distributed": served,
              "in_process_tokens_per_s": local,
              "ratio_distributed_over_in_process": round(served["tokens_per_s"] / local, 2)}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
