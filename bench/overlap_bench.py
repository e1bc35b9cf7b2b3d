"""Overlap on vs off against real expert workers: a step as two micro-batches in ping-pong, or as one.

    MOE_CLUSTER_DATA_PLANE_SECRET=... .venv/bin/python bench/overlap_bench.py [--model models/demo] \
        [--workers 2] [--seqs 32] [--max-tokens 32] [--service-time-per-token auto|SECONDS] [--rounds 2] \
        [--threads N]

The experts run in standalone worker processes (deployments/standalone_worker.py, the gRPC data
plane; the secret comes from MOE_CLUSTER_DATA_PLANE_SECRET, one is made up for the run when it is
unset) started with --service-time-per-token: each call holds its worker at least that long per
row, one call at a time, so a worker behaves like a device of fixed capacity whatever the router's
cores are doing. auto: the value that makes the expert time per step about the backbone time,
estimated from the in-process engine (the case where overlap gains most and hides least easily).

Per decode step (every sequence decoding; the modes alternate `--rounds` times; lower quartiles
of the per-step figures, as other processes on a shared machine only ever add time):
- overlap off: step time, and `wait`, the time the router waits on the workers with nothing else
  to do: expert time = wait, backbone time = step - wait (attention, gating, dispatch, sending);
- overlap on: step time, and the wait that is left.
Goal: step time with overlap ≤ 1.2 × max(backbone, expert), against their sum without.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_bench import make_prompts  # noqa: E402

from cluster.engine import LLMEngine, SamplingParams  # noqa: E402
from cluster.loader import open_model  # noqa: E402
from cluster.placement import Table, round_robin  # noqa: E402
from deployments import standalone_worker  # noqa: E402
from deployments.experts.auth import ENV  # noqa: E402
from deployments.experts.remote import RemoteExperts  # noqa: E402
from deployments.experts.transport.grpc import GrpcTransport  # noqa: E402


def decode_steps(engine: LLMEngine, prompts, max_tokens: int, wait_s) -> tuple[list[float], list[float], list]:
    """(step seconds, wait seconds) of each step where every sequence decodes, and the tokens."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in prompts]
    seqs = [engine.scheduler.find(rid) for rid in ids]
    steps, waits = [], []
    while engine.has_unfinished():
        decoding = all(s.prefilled for s in engine.scheduler.running) and not engine.scheduler.waiting
        w0, t0 = wait_s(), time.perf_counter()
        engine.step()
        if decoding and engine.scheduler.running:
            steps.append(time.perf_counter() - t0)
            waits.append(wait_s() - w0)
    return steps, waits, [s.output_ids for s in seqs]


def service_time(args, prompts, cfg) -> float:
    """Seconds per row that make a worker's time per step about the backbone's: the in-process engine's
    step time less the time its experts took."""
    local = LLMEngine.from_pretrained(args.model, max_num_seqs=args.seqs, max_model_len=512)
    experts, run = [0.0], local.model.experts.run

    def timed_run(*a):
        t0 = time.perf_counter()
        out = run(*a)
        experts[0] += time.perf_counter() - t0
        return out

    local.model.experts.run = timed_run
    steps, expert_s, _ = decode_steps(local, prompts, 12, lambda: experts[0])
    backbone = statistics.quantiles([s - e for s, e in zip(steps, expert_s)], n=4)[0]
    rows_per_worker = args.seqs * cfg.top_k / args.workers  # per MoE layer
    return backbone / (len(cfg.moe_layer_ids) * rows_per_worker)


def start_workers(args, placement, secret: str, per_row: float) -> list[subprocess.Popen]:
    return [standalone_worker.start(args.model, experts, f"w{i}", "--service-time-per-token", str(per_row),
                                    secret=secret) for i, experts in enumerate(placement.workers)]


def measure(engine: LLMEngine, remote: RemoteExperts, prompts, args) -> dict:
    wait_s = lambda: remote.stats.snapshot()["wait_s"]  # noqa: E731
    runs = {False: ([], []), True: ([], [])}
    tokens = {}
    engine.generate(prompts[:2], SamplingParams(max_tokens=4, temperature=0))  # warm-up
    for _ in range(args.rounds):
        for overlap in (False, True):
            engine.model.overlap = overlap
            steps, waits, tokens[overlap] = decode_steps(engine, prompts, args.max_tokens, wait_s)
            runs[overlap][0].extend(steps)
            runs[overlap][1].extend(waits)
    q1 = lambda xs: 1000 * statistics.quantiles(xs, n=4)[0]  # noqa: E731
    steps_off, waits_off = runs[False]
    backbone, expert = q1([s - w for s, w in zip(steps_off, waits_off)]), q1(waits_off)
    step_off, step_on, wait_on = q1(steps_off), q1(runs[True][0]), q1(runs[True][1])
    return {"backbone_ms": round(backbone, 1), "expert_ms": round(expert, 1),
            "step_without_overlap_ms": round(step_off, 1), "step_with_overlap_ms": round(step_on, 1),
            "wait_with_overlap_ms": round(wait_on, 1),
            "with_overlap_over_max": round(step_on / max(backbone, expert), 2),
            "without_overlap_over_sum": round(step_off / (backbone + expert), 2),
            "speedup": round(step_off / step_on, 2), "identical_greedy_tokens": tokens[False] == tokens[True],
            "decode_steps_timed": {"off": len(runs[False][0]), "on": len(runs[True][0])}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/demo")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seqs", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--service-time-per-token", default="auto")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="the router's torch threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    _, _, cfg = open_model(args.model)
    secret = os.environ.get(ENV) or secrets.token_hex(16)
    placement = round_robin(cfg.experts(), args.workers)
    probe = LLMEngine.from_pretrained(args.model, max_num_seqs=1, max_model_len=64)
    prompts = make_prompts(probe, args.seqs)
    auto = args.service_time_per_token == "auto"
    per_row = service_time(args, prompts, cfg) if auto else float(args.service_time_per_token)
    procs = start_workers(args, placement, secret, per_row)
    try:
        refs = tuple(standalone_worker.worker_ref(proc, node="") for proc in procs)  # gRPC, as across nodes
        remote = RemoteExperts(Table(1, placement, refs), lambda ref: GrpcTransport(ref.address, secret))
        engine = LLMEngine.from_pretrained(args.model, experts=remote, max_num_seqs=args.seqs, max_model_len=512)
        result = {"workload": f"{args.seqs} sequences decoding, {args.workers} workers, "
                              f"{1e6 * per_row:.0f} us per row{' (auto)' if auto else ''}, "
                              f"{torch.get_num_threads()} router threads",
                  **measure(engine, remote, prompts, args)}
        remote.close()
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
