"""The measurements of `make gpu-check` (bench/gpu_check.sh), in one run from the project root; prints JSON.

(a) our engine vs transformers `generate`, both bf16 on the GPU: engine_bench.py's qwen3_moe-1b (random
    weights, ~1B parameters), 32 prompts x 128 new tokens, greedy, EOS ignored;
(b) CUDA graphs on vs off: median decode-step time of the same workload;
(c) served vs in-process on the GPU: `bench/serve_bench.py --device cuda` (router + 2 expert workers sharing
    this GPU through fractional num_gpus, so the same-node transport is CUDA IPC), in a child process;
(d) greedy parity GPU bf16 vs CPU fp32 on the trained demo model (random weights have near-tied logits):
    32 tokens free-running, then teacher-forced top-1 agreement.
--dry-run builds the checkpoints and the CPU reference and prints the plan, stopping before anything touches
CUDA (the test suite runs it). Exit status 1 when a part raised or a check failed: see "problems".
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
import torch  # noqa: E402
from engine_bench import BUILT, built_model, make_prompts, run_transformers  # noqa: E402

from cluster.engine import LLMEngine, SamplingParams  # noqa: E402
from cluster.model.batch import make_batch  # noqa: E402
from cluster.model.cuda_graphs import unsupported  # noqa: E402
from cluster.model.kv_cache import KVCache  # noqa: E402

N, M, SERVED_TOKENS = 32, 128, 64
KV = 4 << 30  # explicit KV bytes, the same for every engine measured
DEMO, PARITY_PROMPT, PARITY_TOKENS = str(ROOT / "models" / "demo"), "def main(", 32
SERVED_APP = {"routers": {"num_cpus": 1, "num_gpus": 0.4}, "worker": {"num_cpus": 1, "num_gpus": 0.2},
              "kv_cache_memory_bytes": 2 << 30}  # router and workers share the GPU; device follows num_gpus


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)


def serve_bench_command(model: str) -> list[str]:
    """Part (c): serve_bench's own CLI; --device puts the served routers/workers and its in-process run there."""
    return [sys.executable, str(ROOT / "bench" / "serve_bench.py"), "--model", model, "--workers", "2",
            "--concurrency", str(N), "--max-tokens", str(SERVED_TOKENS), "--device", "cuda",
            "--app", json.dumps(SERVED_APP)]


def stepped(engine: LLMEngine, prompts, max_tokens: int):
    """The workload through engine.step(): (seconds, per-step seconds, tokens per prompt)."""
    seqs = [engine.scheduler.find(engine.add_request(p, greedy(max_tokens))) for p in prompts]
    steps, t0 = [], time.perf_counter()
    while engine.has_unfinished():
        t = time.perf_counter()
        engine.step()
        steps.append(time.perf_counter() - t)
    seconds = time.perf_counter() - t0
    if any(s.error for s in seqs):
        raise RuntimeError(f"a sequence failed: {next(s.error for s in seqs if s.error)}")
    return seconds, steps, [s.output_ids for s in seqs]


def run_engine(engine: LLMEngine, prompts, max_tokens: int):
    stepped(engine, prompts, max_tokens)  # warm-up with the same shapes: CUDA graphs are captured here
    seconds, steps, tokens = stepped(engine, prompts, max_tokens)
    return {"tokens_per_s": round(len(prompts) * max_tokens / seconds, 1),
            "decode_step_ms_median": round(1000 * statistics.median(steps[1:]), 3)}, tokens


def part_ab(out: dict, path: str, problems: list[str]) -> None:
    kw = dict(device="cuda", max_num_seqs=N, max_model_len=64 + M + 8, kv_cache_memory_bytes=KV)
    on = LLMEngine.from_pretrained(path, **kw)  # dtype and CUDA graphs auto, as a user gets them
    out["engine_memory"] = on.memory
    paged = on.model.paged_attention  # attention_backend auto: FlashInfer when the gpu extra installed
    out["attention_backend"] = "sdpa" if paged is None else type(paged).__name__
    if on.memory["dtype"] != "bfloat16" or on.model.weights.embed.device.type != "cuda":
        problems.append(f"weights are {on.memory['dtype']} on {on.model.weights.embed.device}, not bf16 on the GPU")
    if on.graphs is None:
        problems.append(f"CUDA graphs are off by default: {unsupported(on.model)}")
    prompts = make_prompts(on, N)
    g_on, tok_on = run_engine(on, prompts, M)
    g = on.graphs
    out["graphs"] = None if g is None else {"buckets": sorted(g.graphs), "replays": g.replays, "failed": g.failed}
    if paged is not None:
        out["flashinfer_layer_calls"] = dict(paged.calls)
    if g is not None and (g.failed or not g.replays):
        problems.append(f"CUDA graphs did not replay: {g.failed}")
    del on, g
    torch.cuda.empty_cache()
    off = LLMEngine.from_pretrained(path, cuda_graphs=False, **kw)
    g_off, tok_off = run_engine(off, prompts, M)
    del off
    torch.cuda.empty_cache()
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to("cuda").eval()
    hf_s, tok_hf = run_transformers(hf, prompts, [M] * N, N)  # one batch, left-padded, with its own warm-up
    del hf
    torch.cuda.empty_cache()
    hf_tps = N * M / hf_s
    out["a_engine_vs_transformers"] = {
        "workload": f"{N} prompts x {M} tokens, greedy, bf16 both", "ours_tokens_per_s": g_on["tokens_per_s"],
        "transformers_tokens_per_s": round(hf_tps, 1), "ratio_ours_over_transformers": round(g_on["tokens_per_s"] / hf_tps, 2),
        "identical_greedy_sequences": f"{sum(a == b for a, b in zip(tok_on, tok_hf))}/{N} (random weights: near-ties)"}
    out["b_cuda_graphs"] = {
        "on": g_on, "off": g_off,
        "decode_step_speedup": round(g_off["decode_step_ms_median"] / g_on["decode_step_ms_median"], 2),
        "identical_sequences_on_vs_off": f"{sum(a == b for a, b in zip(tok_on, tok_off))}/{N}"}


def logits_at_every_position(engine: LLMEngine, ids: list[int]) -> torch.Tensor:
    """One prefill of `ids` through the engine's model, logits of every position [len(ids), V] on the CPU."""
    cache = KVCache.for_model(engine.cfg, len(ids) // 16 + 1, 16, engine.kv_dtype, engine.device)
    batch = make_batch([(cache.allocate(cache.num_blocks), ids, 0)], 16, engine.device)
    logits, _ = engine.model.forward(batch, cache, rows=torch.arange(len(ids), device=engine.device))
    return logits.float().cpu()


def cpu_reference() -> tuple[LLMEngine, list[int], list[int]]:
    """Part (d)'s CPU fp32 side: the demo model, the prompt and its greedy tokens."""
    cpu = LLMEngine.from_pretrained(DEMO, max_model_len=256)  # auto: fp32 on a CPU
    prompt = cpu.encode(PARITY_PROMPT)
    [c] = cpu.generate([prompt], greedy(PARITY_TOKENS))
    return cpu, prompt, c.token_ids


def part_d(out: dict, problems: list[str]) -> None:
    cpu, prompt, cpu_tokens = cpu_reference()
    gpu = LLMEngine.from_pretrained(DEMO, device="cuda", max_model_len=256, kv_cache_memory_bytes=256 << 20)
    [g] = gpu.generate([prompt], greedy(PARITY_TOKENS))
    same = next((i for i, (a, b) in enumerate(zip(cpu_tokens, g.token_ids)) if a != b), PARITY_TOKENS)
    ids = prompt + cpu_tokens
    lc, lg = logits_at_every_position(cpu, ids), logits_at_every_position(gpu, ids)
    pos = slice(len(prompt) - 1, len(ids) - 1)  # the positions that predict the generated tokens
    agree = (lc[pos].argmax(-1) == lg[pos].argmax(-1)).float().mean().item()
    out["d_parity"] = {
        "model": "models/demo", "prompt": PARITY_PROMPT, "tokens": PARITY_TOKENS,
        "dtypes": [cpu.memory["dtype"], gpu.memory["dtype"]], "identical_greedy_prefix": same,
        "teacher_forced_top1_agreement": round(agree, 3), "max_abs_logit_diff": round((lc - lg).abs().max().item(), 4),
        "logit_scale": round(lc.abs().max().item(), 2), "gpu_graph_replays": gpu.graphs.replays if gpu.graphs else None}
    if same == 0 or agree < 0.9:
        problems.append(f"GPU bf16 vs CPU fp32: first {same} tokens equal, teacher-forced agreement {agree:.2f}")


def part_c(out: dict, path: str, problems: list[str]) -> None:
    """serve_bench in a child process: Ray and its GPU memory come and go with it."""
    proc = subprocess.run(serve_bench_command(path), capture_output=True, text=True, timeout=300, cwd=ROOT)
    sys.stderr.write(proc.stderr[-4000:])
    if proc.returncode:
        raise RuntimeError(f"serve_bench exited {proc.returncode}: {proc.stderr[-600:]}")
    text = proc.stdout[proc.stdout.rindex("\n{"):] if "\n{" in proc.stdout else proc.stdout
    out["c_served_vs_in_process"] = result = json.loads(text)
    ratio = result.get("ratio_distributed_over_in_process")
    if ratio is None:
        problems.append("served: serve_bench reported no ratio")


def tests_summary(out_dir: str, rc: int, problems: list[str]) -> dict:
    try:
        cases = list(ET.parse(os.path.join(out_dir, "pytest.xml")).getroot().iter("testcase"))
    except (OSError, ET.ParseError) as e:
        problems.append(f"CUDA tests: no report ({e}); pytest exit {rc}")
        return {"exit": rc}
    outcome = {f"{c.get('classname')}::{c.get('name')}":
               next((x.tag for x in c if x.tag in ("failure", "error", "skipped")), "passed") for c in cases}
    isolated_path = os.path.join(out_dir, "isolated.txt")
    isolated = dict(line.split()[::-1] for line in open(isolated_path) if line.strip()) \
        if os.path.exists(isolated_path) else {}
    bad = {k: v for k, v in outcome.items() if v != "passed"}
    if rc or bad:
        problems.append(f"CUDA tests: pytest exit {rc}; not passed: {bad}")  # a skip on a GPU is a failure too
    return {"exit": rc, "passed": sum(v == "passed" for v in outcome.values()), "not_passed": bad,
            "failures_rerun_alone": isolated}


def dry_run(model: str) -> dict:
    """Everything up to CUDA: the checkpoints built and loadable, the CPU reference, the served command."""
    path = built_model(model) if model in BUILT else model
    engine = LLMEngine.from_pretrained(path, max_num_seqs=2, max_model_len=64 + M + 8)
    _, prompt, tokens = cpu_reference()
    return {"dry_run": True, "model": path, "model_type": engine.cfg.model_type, "prompts": len(make_prompts(engine, N)),
            "parity_prompt_ids": prompt, "parity_cpu_tokens": len(tokens),
            "served_command": serve_bench_command(path)[1:], "cuda_initialized": torch.cuda.is_initialized()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="tmp/gpu-check")
    p.add_argument("--model", default="qwen3_moe-1b", help=f"a checkpoint directory or one of {sorted(BUILT)}")
    p.add_argument("--tests-rc", type=int, default=0, help="the CUDA tests' pytest exit status")
    p.add_argument("--dry-run", action="store_true", help="build the models, stop before CUDA")
    args = p.parse_args(argv)
    if args.dry_run:
        print(json.dumps(dry_run(args.model), indent=1))
        return 0
    problems: list[str] = []
    path = built_model(args.model) if args.model in BUILT else args.model
    out: dict = {"gpu": torch.cuda.get_device_name(), "capability": torch.cuda.get_device_capability(),
                 "torch": torch.__version__, "cuda": torch.version.cuda,
                 "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
                 "tests": tests_summary(args.out, args.tests_rc, problems), "seconds": {}}
    parts = (("a+b", lambda: part_ab(out, path, problems)), ("d", lambda: part_d(out, problems)),
             ("c", lambda: part_c(out, path, problems)))
    for name, part in parts:
        t = time.perf_counter()
        try:
            part()
        except Exception as e:  # noqa: BLE001 - record it, run the other parts, fail at the end
            traceback.print_exc()
            problems.append(f"part {name}: {type(e).__name__}: {e}"[:600])
        out["seconds"][name] = round(time.perf_counter() - t, 1)
        gc.collect()
        torch.cuda.empty_cache()  # the next part (the served child process above all) gets the GPU back
    out["problems"] = problems
    text = json.dumps(out, indent=1, default=str)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        f.write(text + "\n")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
