"""Serving benchmark: moe-cluster served vs the same engine in process vs `transformers serve`,
same client, same workload, same weights (fp32), in one run.

    .venv/bin/python bench/serve_bench.py [--model models/demo] [--workers 2] [--concurrency 64] [--max-tokens 64]
    .venv/bin/python bench/serve_bench.py --quick                      # 8 streams x 16 tokens, no peers
    .venv/bin/python bench/serve_bench.py --routers 2 --ingress 2 --app '{"stream_interval": 4}'
    .venv/bin/python bench/serve_bench.py --scale-routers              # + 1 vs 2 routers, router-bound
    .venv/bin/python bench/serve_bench.py --device cuda --json out.json

The workload: N concurrent streaming greedy completions of max_tokens each (EOS ignored), text
prompts of held-out code and prose, then one stream at a time (`--single` requests in a row).
One asyncio client (this process) drives every server. Measured:

- throughput (generated tokens ÷ wall time), TTFT and inter-token p50/p99. Served: at the client,
  per SSE event that carries tokens (one per token on both servers). In process: at the consumer of
  `AsyncEngine.generate` (the engine on its own thread, as a router hosts it; no Ray, no HTTP):
  TTFT from the call to the first token's arrival on the consumer's event loop, inter-token the
  gaps between arrivals (tokens that arrive together count one gap of ~0). Its tok/s is the
  ratio's denominator; `LLMEngine.generate` on the main thread is printed too (on a crowded
  machine torch's two intra-op threads on the main thread ran 10-30x slower than on a thread).
- CPU ms per streamed token of each kind of process (router, ingress, Serve proxy, expert workers,
  load generator, transformers-serve, the rest), from the server's process tree, and the CPU
  outside the engine's own compute: ingress + Serve proxy + (router − its engine steps), see
  serve_metrics.outside_engine_ms.
- `--scale-routers`: the router made the bottleneck by a service-time model (each engine step
  sleeps `engine_step_delay_s` first and a router decodes at most `max_num_seqs` sequences, so a
  router is a device of fixed capacity), served tok/s with 1 and with 2 routers and their ratio.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import shutil
import sys
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers  # noqa: E402
import serve_metrics as sm  # noqa: E402
from engine_bench import make_prompts  # noqa: E402

from cluster.engine import LLMEngine, SamplingParams  # noqa: E402
from cluster.engine.async_engine import AsyncEngine  # noqa: E402


# -- the client ---------------------------------------------------------------------------------
async def stream_one(session, url: str, body: dict) -> sm.Stream:
    stream = sm.Stream(sent=time.perf_counter())
    async with session.post(f"{url}/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.content:
            if not line.startswith(b"data: {"):
                continue
            now = time.perf_counter()
            event = json.loads(line[6:])
            if event.get("error"):
                raise RuntimeError(f"stream failed: {event['error']}")
            if event.get("usage"):
                stream.tokens = event["usage"]["completion_tokens"]
            if any(c.get("text") or c.get("token_ids") for c in event.get("choices") or []):
                stream.arrivals.append(now)
    return stream


async def _streams(url: str, bodies: list[dict], concurrent: bool) -> tuple[list[sm.Stream], float]:
    # One asyncio client for all streams: the load generator shares the cores with the servers,
    # and 64 threads of blocking clients would cost it far more CPU.
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=900)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        t0 = time.perf_counter()
        if concurrent:
            out = await asyncio.gather(*(stream_one(session, url, b) for b in bodies))
        else:
            out = [await stream_one(session, url, b) for b in bodies]
        return list(out), time.perf_counter() - t0


def process_table(server: peers.ServerProcess, transformers: bool = False) -> dict[int, tuple[str, float]]:
    """{pid: (role, CPU seconds so far)} of the server's process tree and of this process."""
    import psutil

    me = psutil.Process()
    out = {me.pid: (sm.LOAD_GENERATOR, sum(me.cpu_times()[:2]))}
    for pid in server.pids():
        try:
            p = psutil.Process(pid)
            title = (p.cmdline() or [""])[0]
            out[pid] = (sm.role_of(p.name(), title, transformers=transformers), sum(p.cpu_times()[:2]))
        except psutil.Error:
            continue
    return out


def run_workload(server: peers.ServerProcess, kind: str, model_name: str, prompts: list[str], max_tokens: int,
                 concurrent: bool) -> dict:
    bodies = [peers.request_body(kind, model_name, p, max_tokens) for p in prompts]
    stats = kind == "moe-cluster"
    before = requests.get(f"{server.url}/admin/stats", timeout=30).json() if stats else {}
    cpu_before = process_table(server, transformers=kind != "moe-cluster")
    streams, seconds = asyncio.run(_streams(server.url, bodies, concurrent))
    cpu = sm.cpu_by_role(cpu_before, process_table(server, transformers=kind != "moe-cluster"))
    out = sm.latency_figures(streams, seconds)
    out["short_streams"] = sum(s.token_count < max_tokens for s in streams)
    out["cpu_ms_per_token"] = sm.per_token_ms(cpu, out["tokens"])
    out["server_cpu_ms_per_token"] = round(sum(v for k, v in out["cpu_ms_per_token"].items()
                                               if k != sm.LOAD_GENERATOR), 3)
    if stats:
        time.sleep(1.5)  # router counters reach /admin/stats with their next report (every 0.5 s)
        after = requests.get(f"{server.url}/admin/stats", timeout=30).json()
        out["breakdown"] = breakdown(before, after)
        out["stats_before"], out["stats_after"] = _counters(before), _counters(after)
    return out


def _counters(stats: dict) -> dict:
    """The cluster-wide counters the CPU split needs (the full /admin/stats body is large);
    `step_cpu_seconds` summed over the routers where only each router's own stats carry it."""
    out = {k: stats[k] for k in ("steps", "step_seconds", "step_cpu_seconds") if k in stats}
    per_router = [r.get("step_cpu_seconds") for r in (stats.get("routers") or {}).values()]
    if "step_cpu_seconds" not in out and per_router and None not in per_router:
        out["step_cpu_seconds"] = sum(per_router)
    return out


def outside_engine(served_run: dict, in_process_run: dict) -> dict:
    step_ms, how = sm.router_step_ms(served_run["stats_before"], served_run["stats_after"], served_run["tokens"],
                                     served_run["cpu_ms_per_token"], in_process_run["engine_cpu_ms_per_token"])
    return {**sm.outside_engine_ms(served_run["cpu_ms_per_token"], step_ms), "router_step_from": how}


def breakdown(before: dict, after: dict) -> dict:
    steps = after["steps"] - before["steps"]
    step_s = after["step_seconds"] - before["step_seconds"]
    out = {"steps": steps, "step_ms": round(1000 * step_s / max(steps, 1), 2)}
    if after.get("data_plane") and before.get("data_plane"):
        # the router's side of the expert calls: handing out the rows, then waiting for the replies
        # (transport and the workers' compute together: the router cannot tell them apart)
        dp = {k: after["data_plane"][k] - before["data_plane"][k] for k in ("submit_s", "wait_s", "calls")}
        out.update({f"{k[:-2]}_ms_per_step": round(1000 * dp[k] / max(steps, 1), 2) for k in ("submit_s", "wait_s")})
        out["backbone_ms_per_step"] = round(1000 * (step_s - dp["submit_s"] - dp["wait_s"]) / max(steps, 1), 2)
        out["expert_calls_per_step"] = round(dp["calls"] / max(steps, 1), 1)
    return out


def bench_server(server: peers.ServerProcess, kind: str, model_name: str, prompts: list[str], args) -> dict:
    try:
        server.wait_ready(args.start_timeout)
        asyncio.run(_streams(server.url, [peers.request_body(kind, model_name, prompts[0], 4)], True))  # warm-up
        many = run_workload(server, kind, model_name, prompts[:args.concurrency], args.max_tokens, True)
        one = run_workload(server, kind, model_name, prompts[:args.single], args.max_tokens, False)
        return {"many": many, "one": one}
    finally:
        server.stop()


# -- moe-cluster ------------------------------------------------------------------------------------
def app_args(args, routers: int, extra: dict) -> dict:
    """The application config of a run: the benchmark's defaults, the device, then --app."""
    cuda = args.device == "cuda"
    share = math.floor(100 / (routers + max(args.workers, 1))) / 100 if cuda else 0.0  # one GPU, shared
    base = {"num_workers": args.workers, "dtype": "float32", "max_num_seqs": max(64, args.concurrency),
            "max_model_len": 512, "policy_file": None,
            "routers": {"num_cpus": 0.5, "device": args.device, "num_gpus": share},
            "ingress": {"replicas": args.ingress},
            "worker": {"num_cpus": 0.25, "torch_threads": 1, "num_gpus": share}}
    return deep_merge(base, extra)


def deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def served(args, prompts: list[str], routers: int, extra: dict) -> dict:
    tmp = peers.scratch_dir()
    try:
        env = dict(kv.split("=", 1) for kv in args.serve_env)
        server = peers.moe_cluster(args.model, args.port, app_args(args, routers, extra), routers, tmp, env)
        return bench_server(server, "moe-cluster", Path(args.model).name, prompts, args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def scale_routers(args, prompts: list[str]) -> dict:
    """Served tok/s with 1 and 2 routers when a router is a fixed-capacity device (see the docstring)."""
    model = {"engine_step_delay_s": args.scale_step_delay, "max_num_seqs": args.scale_max_num_seqs}
    quick = argparse.Namespace(**{**vars(args), "single": 1, "max_tokens": args.scale_max_tokens})
    out = {"service_time_model": model, "max_tokens": args.scale_max_tokens}
    for n in (1, 2):
        out[f"routers_{n}"] = served(quick, prompts, n, deep_merge(json.loads(args.app), model))["many"]
    out["ratio_2_over_1"] = sm.ratio(out["routers_2"]["tokens_per_s"], out["routers_1"]["tokens_per_s"])
    return out


# -- in process ----------------------------------------------------------------------------------------
def in_process(args, prompt_ids: list[list[int]]) -> dict:
    """The same workload through the engine as a router hosts it (AsyncEngine: the engine on its own
    thread, an asyncio consumer per stream): tok/s, per-stream TTFT/ITL and CPU per token (this
    process's CPU time, engine and consumers). Also `LLMEngine.generate` on the main thread
    (`engine_generate_tokens_per_s`, the figure earlier runs divided by)."""
    engine = LLMEngine.from_pretrained(args.model, device=args.device, dtype="float32",
                                       max_num_seqs=max(64, args.concurrency), max_model_len=512)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    engine.generate(prompt_ids[:2], SamplingParams(max_tokens=4, temperature=0))  # warm-up
    t0 = time.perf_counter()
    engine.generate(prompt_ids[:args.concurrency], params)
    generate_tok_s = round(args.concurrency * args.max_tokens / (time.perf_counter() - t0), 1)
    host = AsyncEngine(engine)
    try:
        asyncio.run(_async_streams(host, prompt_ids[:1], SamplingParams(max_tokens=4, temperature=0), False))
        out = {}
        for w, prompts, concurrent in (("many", prompt_ids[:args.concurrency], True),
                                       ("one", prompt_ids[:args.single], False)):
            c0 = time.process_time()
            run = asyncio.run(_async_streams(host, prompts, params, concurrent))
            cpu = round(1000 * (time.process_time() - c0) / max(run["tokens"], 1), 3)
            out[w] = {**run, "engine_cpu_ms_per_token": cpu, "server_cpu_ms_per_token": cpu}
    finally:
        host.shutdown()
    out["many"]["engine_generate_tokens_per_s"] = generate_tok_s
    return out


async def _consume(host: AsyncEngine, prompt: list[int], params: SamplingParams) -> sm.Stream:
    stream = sm.Stream(sent=time.perf_counter(), tokens=0)
    async for batch in host.generate(prompt, params):
        now = time.perf_counter()
        tokens = sum(o.token_id is not None for o in batch)
        stream.arrivals.extend([now] * tokens)  # tokens that arrive together: gaps of 0
        stream.tokens += tokens
    return stream


async def _async_streams(host: AsyncEngine, prompts, params, concurrent: bool) -> dict:
    t0 = time.perf_counter()
    if concurrent:
        streams = await asyncio.gather(*(_consume(host, p, params) for p in prompts))
    else:
        streams = [await _consume(host, p, params) for p in prompts]
    return sm.latency_figures(list(streams), time.perf_counter() - t0)


# -- report ----------------------------------------------------------------------------------------------
def summary(result: dict) -> dict:
    ours, local, peer = result["moe_cluster"], result["in_process"], result.get("transformers_serve")
    s = {"served_over_in_process": {w: sm.ratio(ours[w]["tokens_per_s"], local[w]["tokens_per_s"])
                                    for w in ("many", "one")},
         "goal_one_stream_ttft_p50": sm.within(ours["one"]["ttft_ms_p50"], local["one"]["ttft_ms_p50"]),
         "goal_one_stream_itl_p50": sm.within(ours["one"]["itl_ms_p50"], local["one"]["itl_ms_p50"]),
         "goal_itl_p99_within_2x_p50": ours["many"]["itl_ms_p99"] <= 2 * ours["many"]["itl_ms_p50"],
         "outside_engine_cpu_ms_per_token": ours["many"]["outside_engine_cpu_ms_per_token"]["total_ms"]}
    if peer:
        s["moe_cluster_over_transformers_serve"] = {w: sm.ratio(ours[w]["tokens_per_s"], peer[w]["tokens_per_s"])
                                                    for w in ("many", "one")}
    return s


def table(result: dict) -> str:
    n, m = result["concurrency"], result["max_tokens"]
    rows = [("moe-cluster (served)", result["moe_cluster"]), ("in-process engine", result["in_process"])]
    if result.get("transformers_serve"):
        rows.append(("transformers serve", result["transformers_serve"]))
    head = (f"| server | tok/s, {n} streams | TTFT p50 / p99 ms | ITL p50 / p99 ms | server CPU ms/token "
            f"| 1 stream tok/s | 1 stream TTFT p50 ms | 1 stream ITL p50 / p99 ms |\n"
            f"|---|---:|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for name, r in rows:
        a, b = r["many"], r["one"]
        cpu = a.get("server_cpu_ms_per_token", "")
        lines.append(f"| {name} | {a['tokens_per_s']:,} | {a['ttft_ms_p50']} / {a['ttft_ms_p99']} | "
                     f"{a['itl_ms_p50']} / {a['itl_ms_p99']} | {cpu} | {b['tokens_per_s']:,} | {b['ttft_ms_p50']} | "
                     f"{b['itl_ms_p50']} / {b['itl_ms_p99']} |")
    s = result["summary"]
    lines.append(f"\nworkload: {n} streams x {m} tokens (and {result['single']} single streams), greedy, fp32, "
                 f"{result['workers']} expert workers, {result['routers']} router(s), {result['ingress']} ingress, "
                 f"device {result['device']}")
    lines.append(f"served / in-process: {s['served_over_in_process']['many']} ({n} streams), "
                 f"{s['served_over_in_process']['one']} (1 stream)")
    lines.append(f"in process, LLMEngine.generate on the main thread: "
                 f"{result['in_process']['many'].get('engine_generate_tokens_per_s')} tok/s ({n} streams)")
    if "moe_cluster_over_transformers_serve" in s:
        r = s["moe_cluster_over_transformers_serve"]
        lines.append(f"moe-cluster / transformers serve: {r['many']} ({n} streams), {r['one']} (1 stream)")
    lines.append(f"goals: 1-stream TTFT p50 within 1.2x in-process + 2 ms: {s['goal_one_stream_ttft_p50']}; "
                 f"ITL p50: {s['goal_one_stream_itl_p50']}; ITL p99 <= 2x p50 at {n} streams: "
                 f"{s['goal_itl_p99_within_2x_p50']}")
    lines.append("\nCPU ms per streamed token, by kind of process:")
    for name, r in rows:
        cpu = r["many"].get("cpu_ms_per_token") or {"the engine (one process)": r["many"]["engine_cpu_ms_per_token"]}
        lines.append(f"  {name}: " + ", ".join(f"{k} {v}" for k, v in cpu.items()))
    o = result["moe_cluster"]["many"]["outside_engine_cpu_ms_per_token"]
    lines.append(f"outside the engine's compute: {o['total_ms']} ms/token = edge (ingress + proxy) {o['edge_ms']} "
                 f"+ router messaging {o['router_messaging_ms']} (router minus engine steps {o['router_step_ms']}; "
                 f"steps from: {o['router_step_from']})")
    if result.get("scale_routers"):
        sc = result["scale_routers"]
        lines.append(f"routers 1 vs 2 (service-time model {sc['service_time_model']}): "
                     f"{sc['routers_1']['tokens_per_s']} vs {sc['routers_2']['tokens_per_s']} tok/s, "
                     f"ratio {sc['ratio_2_over_1']}")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/demo")
    p.add_argument("--workers", type=int, default=2, help="expert workers (0: experts in the router)")
    p.add_argument("--routers", type=int, default=1)
    p.add_argument("--ingress", type=int, default=1, help="ingress (API) replicas")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--single", type=int, default=4, help="one-stream requests, one after the other")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="routers, expert workers, the in-process engine and transformers serve")
    p.add_argument("--port", type=int, default=8123, help="HTTP port (gRPC: port + 1; transformers serve: port + 2)")
    p.add_argument("--serve-env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment of the server's processes (Ray, Serve), e.g. RAY_SERVE_FREEZE_GC_ON_STARTUP=1 "
                        "(repeatable)")
    p.add_argument("--app", default="{}", help="extra application config as JSON, e.g. '{\"stream_interval\": 4}'")
    p.add_argument("--peers", action=argparse.BooleanOptionalAction, default=None,
                   help="also run transformers serve (default: on, off with --quick)")
    p.add_argument("--scale-routers", action="store_true", help="also measure 1 vs 2 routers, router-bound")
    p.add_argument("--scale-step-delay", type=float, default=0.2,
                   help="engine_step_delay_s of the scale runs (well above a step's own time, so the router binds)")
    p.add_argument("--scale-max-num-seqs", type=int, default=None,
                   help="max_num_seqs per router in the scale runs (default: concurrency / 4, so even two "
                        "routers leave streams waiting)")
    p.add_argument("--scale-max-tokens", type=int, default=16)
    p.add_argument("--quick", action="store_true", help="8 streams x 16 tokens, 2 single streams, no peers")
    p.add_argument("--start-timeout", type=float, default=600)
    p.add_argument("--json", default=None, metavar="PATH", help="also write every figure as JSON")
    args = p.parse_args(argv)
    if args.quick:
        args.concurrency, args.max_tokens, args.single = 8, 16, 2
    if args.peers is None:
        args.peers = not args.quick
    if args.scale_max_num_seqs is None:
        args.scale_max_num_seqs = max(1, args.concurrency // 4)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    engine = LLMEngine.from_pretrained(args.model, max_num_seqs=1)
    # Text prompts (both servers tokenise them with the checkpoint's tokenizer); the in-process
    # engine gets the same text's ids.
    texts = [engine.tokenizer.decode(p) for p in make_prompts(engine, max(args.concurrency, args.single))]
    ids = [engine.encode(t) for t in texts]
    del engine
    result = {"model": args.model, "device": args.device, "workers": args.workers, "routers": args.routers,
              "ingress": args.ingress, "concurrency": args.concurrency, "max_tokens": args.max_tokens,
              "single": args.single, "app": json.loads(args.app), "serve_env": args.serve_env}
    result["moe_cluster"] = served(args, texts, args.routers, json.loads(args.app))
    print(f"moe-cluster: {json.dumps(result['moe_cluster'])}", file=sys.stderr, flush=True)
    if args.peers:
        tmp = peers.scratch_dir()
        try:
            server = peers.transformers_serve(args.model, args.port + 2, args.device, tmp)
            result["transformers_serve"] = bench_server(server, "transformers", args.model, texts, args)
        except Exception as e:  # noqa: BLE001 - a peer that fails must not lose our own figures
            result["transformers_serve_error"] = f"{type(e).__name__}: {e}"
            print(f"transformers serve failed: {result['transformers_serve_error']}", file=sys.stderr)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    result["in_process"] = in_process(args, ids)
    for w in ("many", "one"):
        result["moe_cluster"][w]["outside_engine_cpu_ms_per_token"] = outside_engine(result["moe_cluster"][w],
                                                                                     result["in_process"][w])
    if args.scale_routers:
        result["scale_routers"] = scale_routers(args, texts)
    result["summary"] = summary(result)
    print(table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
