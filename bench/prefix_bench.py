"""Prefix caching and chunked prefill, in-process engine, one run each.

    .venv/bin/python bench/prefix_bench.py [--model models/demo] [--system 512] [--turns 4] [--conversations 8]
                                           [--streams 32] [--long 768] [--chunk 128] [--only chat|long|uniform]
                                           [--rounds 3] [--json]
    .venv/bin/python bench/prefix_bench.py --model qwen3_moe-1b --system 1024 --turns 8 --conversations 16

chat:   `conversations` chats share a system prompt of `system` tokens; each turn appends a
        32-token user message and the previous reply (8 tokens); all chats' turn t run together.
        Time to first token (TTFT) of turns 2.. and the prompt tokens computed, caching on vs off.
long:   `streams` streams decode; a `long`-token prompt arrives. Inter-token latency (step time
        seen by the running streams) p99 while it is prefilled vs before it came, whole-prompt
        prefill vs chunks of `chunk` tokens a step.
uniform: `streams` distinct prompts of 64 tokens, 64 new tokens each, all at once (no shared prefix):
        tokens/s with prefix caching and chunked prefill on (the defaults) vs both off (the engine before
        them), `rounds` interleaved rounds, medians.
Model: the demo model (context 1024: the chat and long prompts must fit it) or a built ~1B model
(`qwen3_moe-1b`, as bench/engine_bench.py builds it once, context 8192); the context is sized to the
longest prompt asked for.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from cluster.engine import LLMEngine, SamplingParams

from engine_bench import BUILT, built_model

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


def uniform(base: LLMEngine, streams: int, rounds: int) -> dict:
    """Tokens/s of `streams` distinct 64-token prompts x 64 new tokens: the features on vs both off."""
    engines = {"on": _engine(base, max_num_seqs=streams),
               "off": _engine(base, max_num_seqs=streams, enable_prefix_caching=False, enable_chunked_prefill=False)}
    params = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    rates = {name: [] for name in engines}
    for r in range(rounds):  # interleaved, so a slow moment of the machine falls on both sides
        for name, engine in engines.items():
            prompts = [_tokens(64, 10_000 * (r + 1) + s) for s in range(streams)]  # never seen before
            t = time.perf_counter()
            outs = engine.generate(prompts, params)
            rates[name].append(sum(len(o.token_ids) for o in outs) / (time.perf_counter() - t))
    on, off = (float(np.median(rates[k])) for k in ("on", "off"))
    return {"streams": streams, "tok_s_on": on, "tok_s_off": off, "ratio_on_off": on / off, "rounds": rates}


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
    ap.add_argument("--only", choices=["chat", "long", "uniform"], default=None)
    ap.add_argument("--rounds", type=int, default=3, help="uniform: interleaved rounds")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    path = built_model(args.model) if args.model in BUILT else args.model
    longest = max(args.system + args.turns * 40, args.long, 128) + 64  # the longest prompt and its reply
    base = LLMEngine.from_pretrained(path, max_num_seqs=1, max_model_len=longest)
    summary = {}
    if args.only in (None, "chat"):
        off, on = (chat(base, args.system, args.turns, args.conversations, c) for c in (False, True))
        summary |= {"chat": [off, on], "ttft_speedup": off["ttft_turns_2_on_mean_s"] / on["ttft_turns_2_on_mean_s"],
                    "prefilled_reduction": 1 - on["computed_prompt_tokens_turns_2_on"]
                    / off["computed_prompt_tokens_turns_2_on"]}
    if args.only in (None, "long"):
        summary["long"] = [long_arrival(base, args.streams, args.long, c) for c in (None, args.chunk)]
    if args.only in (None, "uniform"):
        summary["uniform"] = uniform(base, args.streams, args.rounds)
    print(json.dumps(summary, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
