"""Structured-output benchmark: engine throughput with a JSON schema on N streams vs unconstrained.

    .venv/bin/python bench/structured_bench.py [--model models/demo] [--streams 64] [--max-tokens 32] [--rounds 3]

Both runs: N sampled (temperature 1) streams of the same prompt, batched together in one engine, tokens
per second of wall time over the whole run. The constrained run gives every stream a JSON schema (an
array of at least 50 records: no stream can finish before max_tokens, so both runs generate the same
number of tokens), so each step builds one bitmask for N rows on top of
the forward. Prints the median rate of each side over interleaved rounds and their ratio (the issue's goal: >= 0.8).
"""
from __future__ import annotations

import argparse
import time

from cluster.engine import LLMEngine, SamplingParams
from cluster.engine.grammar import GrammarSpec

SCHEMA = {"type": "object", "properties": {"items": {"type": "array", "minItems": 50, "items": {
    "type": "object", "properties": {"name": {"type": "string"}, "count": {"type": "integer"},
                                     "ok": {"type": "boolean"}}, "required": ["name", "count", "ok"]}}},
          "required": ["items"]}


def rate(engine: LLMEngine, streams: int, max_tokens: int, grammar: GrammarSpec | None) -> tuple[float, int]:
    params = [SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=i, ignore_eos=grammar is None,
                             grammar=grammar) for i in range(streams)]
    start = time.perf_counter()
    outs = engine.generate(["List the items as JSON:"] * streams, params)
    tokens = sum(len(o.token_ids) for o in outs)
    return tokens / (time.perf_counter() - start), tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="models/demo")
    p.add_argument("--streams", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of both runs; medians are printed")
    args = p.parse_args()
    engine = LLMEngine.from_pretrained(args.model, max_num_seqs=args.streams)
    spec = GrammarSpec.json_schema(SCHEMA)
    engine.generate(["warm up"], SamplingParams(max_tokens=2, grammar=spec))  # compile once, outside the timing
    rates = {None: [], spec: []}
    for _ in range(args.rounds):  # interleaved, so a slow moment of the machine falls on both sides
        for grammar in rates:
            rates[grammar].append(rate(engine, args.streams, args.max_tokens, grammar))
    (free, free_tokens), (constrained, constrained_tokens) = (sorted(r)[len(r) // 2] for r in rates.values())
    mask_ms = mask_time(engine, spec, args.streams) * 1e3
    print(f"{args.streams} streams, {args.max_tokens} tokens max: unconstrained {free:.1f} tok/s ({free_tokens} "
          f"tokens), JSON schema {constrained:.1f} tok/s ({constrained_tokens} tokens), ratio "
          f"{constrained / free:.2f} (medians of {args.rounds} interleaved rounds); bitmask for {args.streams} rows {mask_ms:.1f} ms per step")


def mask_time(engine: LLMEngine, spec: GrammarSpec, rows: int, repeats: int = 20) -> float:
    """Seconds to fill and apply one step's bitmask for `rows` fresh matchers (the per-step grammar cost)."""
    import torch

    matchers = [(i, engine.grammars.matcher(spec)) for i in range(rows)]
    logits = torch.zeros(rows, engine.cfg.vocab_size)
    start = time.perf_counter()
    for _ in range(repeats):
        engine.grammars.mask(logits, matchers)
    return (time.perf_counter() - start) / repeats


if __name__ == "__main__":
    main()
