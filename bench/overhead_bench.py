"""Host overhead per decode step: a tiny qwen3_next vs a tiny qwen3_moe of the same depth and width.

    OMP_NUM_THREADS=1 .venv/bin/python bench/overhead_bench.py [--batches 1,16] [--steps 40] [--repeats 5]

Hidden 64, 8 layers, 8 experts top-2: compute is negligible, so a decode step's wall time is the host's
work (Python, op dispatch, small host->device copies, syncs), which on a GPU is what keeps the kernels
waiting. Qwen3-Next runs gated DeltaNet on 3 layers of 4 (gated attention on the 4th) and a shared expert;
qwen3_moe plain attention everywhere. Prints, per model and batch, the median decode-step wall and CPU time over
`repeats` runs of `steps` steps and the aten ops per step (torch.profiler, every aten:: event, nested ones
included).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_bench import BUILT, _SMALL_VOCAB, built_model  # noqa: E402

from cluster.engine import LLMEngine, SamplingParams  # noqa: E402

_TINY = dict(hidden_size=64, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             moe_intermediate_size=32, intermediate_size=128, num_experts=8, num_experts_per_tok=2,
             norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], rms_norm_eps=1e-6, **_SMALL_VOCAB)
BUILT.update({
    "qwen3_moe-tiny": dict(model_type="qwen3_moe", **_TINY),
    "qwen3_next-tiny": dict(model_type="qwen3_next", full_attention_interval=4, partial_rotary_factor=0.25,
                            linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
                            linear_value_head_dim=16, linear_conv_kernel_dim=4, shared_expert_intermediate_size=32,
                            rope_theta=10000000, **_TINY)})


def decoding_engine(name: str, batch: int) -> LLMEngine:
    """An engine whose `batch` sequences have their prompts done: every later step is a pure decode step."""
    engine = LLMEngine.from_pretrained(built_model(name), max_num_seqs=batch, max_model_len=1024, dtype="float32")
    params = SamplingParams(max_tokens=900, temperature=0, ignore_eos=True)
    for i in range(batch):
        engine.add_request([1 + (7 * i + j) % 4000 for j in range(8 + i % 5)], params)
    for _ in range(4):  # prompts, then a few decode steps of warm-up
        engine.step()
    return engine


def step_ms(engine: LLMEngine, steps: int) -> tuple[float, float]:
    """Wall and this process's CPU time per step, ms: on a shared machine the CPU time moves less with the
    neighbours' load (one thread: CPU time is the work done)."""
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        engine.step()
    return 1000 * (time.perf_counter() - t0) / steps, 1000 * (time.process_time() - c0) / steps


def ops_per_step(engine: LLMEngine, steps: int = 5) -> float:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            engine.step()
    return sum(e.name.startswith("aten::") for e in prof.events()) / steps


def measure(name: str, batch: int, steps: int, repeats: int) -> dict:
    engine = decoding_engine(name, batch)
    walls, cpus = zip(*[step_ms(engine, steps) for _ in range(repeats)])
    return {"model": name, "batch": batch, "step_ms": round(statistics.median(walls), 2),
            "step_cpu_ms": round(statistics.median(cpus), 2), "step_ms_runs": [round(w, 2) for w in walls],
            "aten_ops_per_step": ops_per_step(engine)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="qwen3_moe-tiny,qwen3_next-tiny")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(1)
    for name in args.models.split(","):
        for batch in map(int, args.batches.split(",")):
            print(json.dumps(measure(name, batch, args.steps, args.repeats)), flush=True)


if __name__ == "__main__":
    main()
