"""The expert data plane alone: the in-process engine with its experts in N gRPC worker processes
(no Ray, no HTTP) vs. the same engine with experts in-process, one run.

    .venv/bin/python bench/data_plane_bench.py [--model models/demo] [--workers 2] [--seqs 64] [--max-tokens 64]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_bench import make_prompts  # noqa: E402

from cluster.engine import LLMEngine, SamplingParams  # noqa: E402
from cluster.loader import open_model  # noqa: E402
from cluster.placement import round_robin  # noqa: E402
from deployments.data_plane import RemoteExperts  # noqa: E402



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
    args = p.parse_args()
    _, _, cfg = open_model(args.model)
    placement = round_robin(cfg.experts(), args.workers)
    procs = [subprocess.Popen([sys.executable, "-m", "deployments.standalone_worker", args.model, json.dumps(slots)],
                              stdout=subprocess.PIPE, text=True) for slots in placement.workers]
    try:
        ports = [int(proc.stdout.readline()) for proc in procs]
        remote = RemoteExperts(placement, lambda w, refresh=False: f"127.0.0.1:{ports[w]}")
        engine = LLMEngine.from_pretrained(args.model, experts=remote, max_num_seqs=args.seqs, max_model_len=512)
        prompts = make_prompts(engine, args.seqs)
        remote_tps = timed(engine, prompts, args.max_tokens)
        steps = args.max_tokens + 1
        dp = {k: round(1000 * v / steps, 2) if k != "calls" else round(v / steps, 1)
              for k, v in remote.timer.snapshot().items()}
    finally:
        for proc in procs:
            proc.kill()
    local = LLMEngine.from_pretrained(args.model, max_num_seqs=args.seqs, max_model_len=512)
    local_tps = timed(local, prompts, args.max_tokens)
    print(json.dumps({"workload": f"{args.seqs} sequences x {args.max_tokens} tokens, {args.workers} workers",
                      "remote_experts_tokens_per_s": round(remote_tps, 1),
                      "in_process_tokens_per_s": round(local_tps, 1),
                      "ratio": round(remote_tps / local_tps, 2),
                      "data_plane_ms_per_step (approx.)": dp}, indent=1))


if __name__ == "__main__":
    main()
