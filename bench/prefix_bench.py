"""Prefix caching and chunked prefill, in-process engine, one run each.

    .venv/bin/python bench/prefix_bench.py [--model models/demo] [--system 512] [--turns 4] [--conversations 8]
                                           [--streams 32] [--long 768] [--chunk 128] [--json]

chat:   `conversations` chats share a system prompt of `system` tokens; each turn appends a
        32-token user message and the previous reply (8 tokens); all chats' turn t run together.
        Time to first token (TTFT) of turns 2.. and the prompt tokens computed, caching on vs off.
long:   `streams` streams decode; a `long`-token prompt arrives. Inter-token latency (step time
        seen by the running streams) p99 while it is prefilled vs before it came, whole-prompt
        prefill vs chunks of `chunk` tokens a step.
Model defaults: the demo model (context 1024, so the figures use shorter prompts than the issue's
1,024-token system prompt and 4,096-token arrival; pass --model for a longer one).
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from cluster.engine import LLMEngine, SamplingParams

REPLY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


def _tokens(n: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    return rng.integers(5, 4000, n).tolist()


def _engine(base: LLMEngine, **kw) -> LLMEngine:
    return LLMEngine(base.cfg, base.model, base.tokenizer, max_model_len=base.max_model_len, **kw)


def _first_tokens(engine: LLMEngine, prompts: list[list[int]]) -> tuple[list[float], list[list[int]]]:
    """TTFT of each prompt submitted together, and the replies."""
    t0 = time.perf_counter()
    ids = [engine.add_request(p, REPLY) for p in prompts]
    ttft, replies = {}, {i: [] for i in ids}
    while engine.has_unfinished():
        for o in engine.step():
            ttft.setdefault(o.request_id, time.perf_counter() - t0)
            if o.token_id is not None:
                replies[o.request_id].append(o.token_id)
    return [ttft[i] for i in ids], [replies[i] for i in ids]


def chat(base: LLMEngine, system: int, turns: int, conversations: int, caching: bool) -> dict:
    engine = _engine(base, max_num_seqs=conversations, enable_prefix_caching=caching)
    sys_prompt = _tokens(system, 0)
    chats = [list(sys_prompt) for _ in range(conversations)]
    later_ttft, computed, total = [], 0, 0
    for t in range(turns):
        for c, conv in enumerate(chats):
            conv += _tokens(32, 100 * c + t)
        hits_before = engine.scheduler.prefix_stats.hit_tokens
        ttft, replies = _first_tokens(engine, chats)
        prompt_tokens = sum(map(len, chats))
        if t > 0:
            later_ttft += ttft
            total += prompt_tokens
            computed += prompt_tokens - (engine.scheduler.prefix_stats.hit_tokens - hits_before)
        for conv, reply in zip(chats, replies):
            conv += reply
    return {"caching": caching, "ttft_turns_2_on_mean_s": float(np.mean(later_ttft)),
            "prompt_tokens_turns_2_on": total, "computed_prompt_tokens_turns_2_on": computed}


def long_arrival(base: LLMEngine, streams: int, long: int, chunk: int | None) -> dict:
    kw = {"max_num_batched_tokens": chunk} if chunk else {"enable_chunked_prefill": False}
    engine = _engine(base, max_num_seqs=streams + 1, enable_prefix_caching=False, **kw)
    params = SamplingParams(max_tokens=base.max_model_len - 16, temperature=0, ignore_eos=True)
    for s in range(streams):
        engine.add_request(_tokens(16, 1000 + s), params)
    for _ in range(3):  # all streams in and decoding
        engine.step()
    steady = _step_times(engine, 12)
    long_id = engine.add_request(_tokens(long, 7), SamplingParams(max_tokens=1, temperature=0))
    during = []
    while engine.scheduler.find(long_id) is not None:
        during += _step_times(engine, 1)
    return {"chunk": chunk, "steady_p99_s": float(np.percentile(steady, 99)),
            "during_p99_s": float(np.percentile(during, 99)), "steps_to_prefill": len(during),
            "ratio": float(np.percentile(during, 99) / np.percentile(steady, 99))}


def _step_times(engine: LLMEngine, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        engine.step()
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/demo")
    ap.add_argument("--system", type=int, default=512)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--conversations", type=int, default=8)
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--long", type=int, default=768)
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--only", choices=["chat", "long"], default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    base = LLMEngine.from_pretrained(args.model, max_num_seqs=1, max_model_len=1024)
    summary = {}
    if args.only in (None, "chat"):
        off, on = (chat(base, args.system, args.turns, args.conversations, c) for c in (False, True))
        summary |= {"chat": [off, on], "ttft_speedup": off["ttft_turns_2_on_mean_s"] / on["ttft_turns_2_on_mean_s"],
                    "prefilled_reduction": 1 - on["computed_prompt_tokens_turns_2_on"]
                    / off["computed_prompt_tokens_turns_2_on"]}
    if args.only in (None, "long"):
        summary["long"] = [long_arrival(base, args.streams, args.long, c) for c in (None, args.chunk)]
    print(json.dumps(summary, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
