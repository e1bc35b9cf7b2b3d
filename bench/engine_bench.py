"""Engine benchmark: our in-process engine vs transformers `generate`, same workload, one run.

    .venv/bin/python bench/engine_bench.py [--model models/demo] [--prompts 32] [--max-tokens 128] [--json]

Greedy decoding of N prompts (8-64 tokens of held-out code and prose) for a
fixed number of new tokens each (EOS ignored, so both do the same work).
Transformers runs the whole batch at once (left padding), its fastest mode.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
from demo_corpus import documents  # noqa: E402

from cluster.engine import LLMEngine, SamplingParams  # noqa: E402


def make_prompts(engine: LLMEngine, count: int) -> list[list[int]]:
    docs = documents("code", "heldout") + documents("prose", "heldout")
    prompts = []
    for i in range(count):
        ids = engine.encode(docs[i % len(docs)][200 * (i // len(docs)):])
        prompts.append(ids[: 8 + (i * 7) % 57])
    return prompts


def run_ours(engine: LLMEngine, prompts, max_tokens: int) -> tuple[float, list[list[int]]]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    engine.generate(prompts[:2], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))  # warm-up
    t0 = time.perf_counter()
    outs = engine.generate(prompts, params)
    return time.perf_counter() - t0, [o.token_ids for o in outs]


def run_transformers(model_path: str, prompts, max_tokens: int) -> tuple[float, list[list[int]]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    kw = dict(do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        model.generate(ids[:2], attention_mask=mask[:2], max_new_tokens=4, **kw)  # warm-up
        t0 = time.perf_counter()
        out = model.generate(ids, attention_mask=mask, max_new_tokens=max_tokens, min_new_tokens=max_tokens, **kw)
    return time.perf_counter() - t0, out[:, width:].tolist()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/demo")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    engine = LLMEngine.from_pretrained(args.model, max_num_seqs=args.prompts, max_model_len=512)
    prompts = make_prompts(engine, args.prompts)
    ours_s, ours_tokens = run_ours(engine, prompts, args.max_tokens)
    hf_s, hf_tokens = run_transformers(args.model, prompts, args.max_tokens)
    n = args.prompts * args.max_tokens
    result = {
        "workload": f"{args.prompts} prompts x {args.max_tokens} new tokens, greedy, torch threads "
                    f"{torch.get_num_threads()}",
        "ours_tokens_per_s": round(n / ours_s, 1), "transformers_tokens_per_s": round(n / hf_s, 1),
        "ratio_ours_over_transformers": round(hf_s / ours_s, 2),
        "ours_seconds": round(ours_s, 2), "transformers_seconds": round(hf_s, 2),
        "identical_greedy_sequences": sum(a == b for a, b in zip(ours_tokens, hf_tokens)),
    }
    if args.json:
        print(json.dumps(result))
        return
    for k, v in result.items():
        print(f"{k:32} {v}")


if __name__ == "__main__":
    main()
