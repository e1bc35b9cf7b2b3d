"""Where a decode step's time goes in the in-process engine (cProfile, top functions by own time).

    .venv/bin/python bench/profile_step.py [--model models/demo] [--device cpu|cuda] [--prompts 32] [--max-tokens 128]
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_bench import make_prompts  # noqa: E402

from cluster.engine import LLMEngine, SamplingParams  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/demo")
    p.add_argument("--device", default="cpu")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args()
    engine = LLMEngine.from_pretrained(args.model, max_num_seqs=args.prompts, max_model_len=512, device=args.device)
    prompts = make_prompts(engine, args.prompts)
    engine.generate(prompts[:2], SamplingParams(max_tokens=4, temperature=0))  # warm-up
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    profiler = cProfile.Profile()
    t0 = time.perf_counter()
    profiler.enable()
    engine.generate(prompts, params)
    profiler.disable()
    seconds = time.perf_counter() - t0
    print(f"{args.prompts * args.max_tokens / seconds:.0f} tokens/s under the profiler, "
          f"{1000 * seconds / args.max_tokens:.1f} ms per step")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
