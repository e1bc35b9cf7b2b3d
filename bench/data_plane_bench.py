"""The expert data plane alone: the in-process engine with its experts in N standalone worker
processes on this machine (no Ray, no HTTP) vs. the same engine with experts in-process, one run.

    .venv/bin/python bench/data_plane_bench.py [--model models/demo] [--workers 2] [--seqs 64] [--max-tokens 64] \
        [--transport auto|grpc|shm]

The workers count as the router's node, so `auto` picks shared memory; `grpc` forces gRPC.
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from engine_bench import make_prompts  # noqa: E402

from cluster.engine import LLMEngine, SamplingParams  # noqa: E402
from cluster.loader import open_model  # noqa: E402
from cluster.placement import Table, round_robin  # noqa: E402
from deployments.experts import transport  # noqa: E402
from deployments.experts.remote import RemoteExperts  # noqa: E402
from deployments.standalone_worker import start, worker_ref  # noqa: E402

SECRET, HERE = "bench-data-plane-secret", "node-here"  # the workers and this "router" share one node


def timed(engine: LLMEngine, prompts, max_tokens: int) -> float:
    engine.generate(prompts[:2], SamplingParams(max_tokens=4, temperature=0))
    t0 = time.perf_counter()
    engine.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
    return len(prompts) * max_tokens / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/demo")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seqs", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--transport", default="auto", choices=transport.PREFERENCES)
    args = p.parse_args()
    _, _, cfg = open_model(args.model)
    placement = round_robin(cfg.experts(), args.workers)
    procs = [start(args.model, experts, secret=SECRET) for experts in placement.workers]
    try:
        table = Table(1, placement, tuple(worker_ref(proc, HERE) for proc in procs))
        connect = functools.partial(transport.connect, node_id=HERE, device="cpu", secret=SECRET,
                                    prefer=args.transport)
        remote = RemoteExperts(table, connect)
        engine = LLMEngine.from_pretrained(args.model, experts=remote, max_num_seqs=args.seqs, max_model_len=512)
        prompts = make_prompts(engine, args.seqs)
        remote_tps = timed(engine, prompts, args.max_tokens)
        steps = args.max_tokens + 1
        dp = {k: round(1000 * v / steps, 2) for k, v in remote.stats.snapshot().items() if k.endswith("_s")}
        remote.close()
    finally:
        for proc in procs:
            proc.kill()
    local = LLMEngine.from_pretrained(args.model, max_num_seqs=args.seqs, max_model_len=512)
    local_tps = timed(local, prompts, args.max_tokens)
    print(json.dumps({"workload": f"{args.seqs} sequences x {args.max_tokens} tokens, {args.workers} workers",
                      "transport": transport.choose(table.workers[0], node_id=HERE, device="cpu",
                                                    prefer=args.transport),
                      "remote_experts_tokens_per_s": round(remote_tps, 1),
                      "in_process_tokens_per_s": round(local_tps, 1),
                      "ratio": round(remote_tps / local_tps, 2),
                      "data_plane_ms_per_step (approx.)": dp}, indent=1))


if __name__ == "__main__":
    main()
