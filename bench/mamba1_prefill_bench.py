"""Jamba's (Mamba-1) prefill: one prompt through the tiny Jamba-1.5-Mini config (its sizes shrunk as the tests
shrink them), fp32 on CPU, the median of a few runs.

    OMP_NUM_THREADS=1 nice -n 15 .venv/bin/python bench/mamba1_prefill_bench.py [--tokens 512] [--repeats 5]

Prints the prompt's tokens, the median prefill time and tokens/s (one line of JSON).
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from cluster.engine import LLMEngine
from tests.helpers import our_greedy_logits
from tests.published_checkpoints import build


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as root:
        path, _ = build("AI21-Jamba-1.5-Mini", Path(root))
        engine = LLMEngine.from_pretrained(str(path), dtype="float32", max_model_len=args.tokens + 16)
        prompt = [(7 * i + 3) % 250 + 1 for i in range(args.tokens)]
        times = []
        with torch.inference_mode():
            our_greedy_logits(engine, prompt, 1)  # warm-up
            for _ in range(args.repeats):
                start = time.perf_counter()
                our_greedy_logits(engine, prompt, 1)  # one forward: the whole prompt, then the first token
                times.append(time.perf_counter() - start)
    median = statistics.median(times)
    print(json.dumps({"tokens": args.tokens, "repeats": args.repeats, "median_s": round(median, 4),
                      "tokens_per_s": round(args.tokens / median, 1)}))


if __name__ == "__main__":
    main()
