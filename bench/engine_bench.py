"""Engine benchmark: our in-process engine vs transformers `generate`, same workloads, one run.

    .venv/bin/python bench/engine_bench.py [--model models/demo] [--prompts 32] [--max-tokens 128] [--json]
    .venv/bin/python bench/engine_bench.py --model qwen3_moe-1b --prompts 16 --max-tokens 32
    .venv/bin/python bench/engine_bench.py --model qwen3_next-1b --decode-batches 1,8 --max-tokens 16
    .venv/bin/python bench/engine_bench.py --model qwen3_next-1b --device cuda --linear-attention-backend fla ...

`--model qwen3_moe-1b`: a random ~1B-parameter qwen3_moe checkpoint (16 layers, 64 experts,
top-8, hidden 1024) that the script builds once under tmp/bench-models/ (saved in bf16 as real
checkpoints are, with the demo model's tokenizer). Both sides run in the same dtype on the same
device: `--dtype auto` is ours (fp32 on a CPU, bf16 for this checkpoint on a GPU), and transformers
is loaded in whatever that resolved to. `--model qwen3_next-1b`: the same for a ~1B Qwen3-Next-shaped
model (8 layers, gated DeltaNet on 3 of 4, 64 experts top-8, hidden 1024); `--decode-batches 1,8`
measures plain decoding at those batch sizes instead of the two workloads below.

Greedy decoding of prompts of 8-64 tokens of held-out code and prose, EOS
ignored so both sides generate exactly the same tokens. Two workloads:

- uniform: N prompts x M new tokens. Transformers runs them as one batch
  (left padding): its best case, every sequence ends on the same step.
- mixed:   2N requests whose max_tokens spread evenly over 16..2M, as in real
  traffic, at most N at a time on both sides. Transformers runs static batches
  of N (each lasts as long as its longest request); our engine refills a slot
  as soon as a request finishes (continuous batching).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
from demo_corpus import documents  # noqa: E402

from cluster.engine import LLMEngine, SamplingParams  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
_SMALL_VOCAB = dict(vocab_size=4096, max_position_embeddings=8192, tie_word_embeddings=False, bos_token_id=0,
                   eos_token_id=0, pad_token_id=0)  # the demo model's tokenizer
BUILT = {"qwen3_moe-1b": dict(model_type="qwen3_moe", hidden_size=1024, num_hidden_layers=16, num_attention_heads=16,
                              num_key_value_heads=4, head_dim=64, moe_intermediate_size=288, intermediate_size=2816,
                              num_experts=64, num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1,
                              mlp_only_layers=[], **_SMALL_VOCAB),
         # Qwen3-Next-80B-A3B's config shrunk to ~1B: 8 layers, gated DeltaNet on 3 of 4 (full attention every
         # 4th), gated attention with partial rotary, 64 experts top-8 with a sigmoid-gated shared expert.
         "qwen3_next-1b": dict(model_type="qwen3_next", hidden_size=1024, num_hidden_layers=8, full_attention_interval=4,
                               num_attention_heads=8, num_key_value_heads=2, head_dim=128, partial_rotary_factor=0.25,
                               linear_num_key_heads=8, linear_num_value_heads=16, linear_key_head_dim=64,
                               linear_value_head_dim=64, linear_conv_kernel_dim=4, moe_intermediate_size=576,
                               shared_expert_intermediate_size=576, intermediate_size=2816, num_experts=64,
                               num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                               rope_theta=10000000, rms_norm_eps=1e-6, **_SMALL_VOCAB)}


def built_model(name: str) -> str:
    """The checkpoint directory of a model this script builds (once), e.g. qwen3_moe-1b."""
    out = ROOT / "tmp" / "bench-models" / name
    if not (out / "config.json").exists():
        from transformers import AutoConfig, AutoModelForCausalLM

        torch.manual_seed(0)
        kwargs = dict(BUILT[name])
        config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        print(f"built {name}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters", file=sys.stderr)
        model.save_pretrained(out)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(ROOT / "models" / "demo" / f, out / f)
    return str(out)


def make_prompts(engine: LLMEngine, count: int, length: int | None = None) -> list[list[int]]:
    """`count` prompts of 8-64 tokens, or all of `length` tokens (no padding on transformers' side)."""
    docs = documents("code", "heldout") + documents("prose", "heldout")
    prompts = []
    for i in range(count):
        ids = engine.encode(docs[i % len(docs)][200 * (i // len(docs)):])
        prompts.append(ids[: length or 8 + (i * 7) % 57])
    assert length is None or all(len(p) == length for p in prompts), "held-out documents too short"
    return prompts


def run_ours(engine: LLMEngine, prompts, max_tokens: list[int]) -> tuple[float, list[list[int]]]:
    params = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in max_tokens]
    # warm-up at the timed batch's width: kernels compiled or autotuned per shape (Triton's) are built here
    engine.generate(prompts, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    t0 = time.perf_counter()
    outs = engine.generate(prompts, params)
    return time.perf_counter() - t0, [o.token_ids for o in outs]


def _hf_batch(model, prompts, max_tokens: list[int]) -> list[list[int]]:
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=model.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device)
    longest = max(max_tokens)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=longest, min_new_tokens=longest,
                         do_sample=False, pad_token_id=0)
    return [row[width:width + m] for row, m in zip(out.tolist(), max_tokens)]


def run_transformers(model, prompts, max_tokens: list[int], batch: int) -> tuple[float, list[list[int]]]:
    """Static batches of `batch` requests, in arrival order; each batch runs to its longest request."""
    with torch.inference_mode():
        _hf_batch(model, prompts[:batch], [4] * len(prompts[:batch]))  # warm-up at the timed batch's width
        t0, tokens = time.perf_counter(), []
        for i in range(0, len(prompts), batch):
            tokens += _hf_batch(model, prompts[i:i + batch], max_tokens[i:i + batch])
    return time.perf_counter() - t0, tokens


def compare(engine, hf_model, prompts, max_tokens: list[int], batch: int) -> dict:
    ours_s, ours_tokens = run_ours(engine, prompts, max_tokens)
    hf_s, hf_tokens = run_transformers(hf_model, prompts, max_tokens, batch)
    n = sum(max_tokens)
    return {"requests": len(prompts), "new_tokens": n,
            "ours_tokens_per_s": round(n / ours_s, 1), "transformers_tokens_per_s": round(n / hf_s, 1),
            "ratio_ours_over_transformers": round(hf_s / ours_s, 2),
            "identical_greedy_sequences": sum(a == b for a, b in zip(ours_tokens, hf_tokens))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/demo", help=f"a checkpoint directory, or one of {sorted(BUILT)}")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--device", default="cpu", help="cpu or cuda (both sides run there)")
    p.add_argument("--dtype", default="auto", help="auto, bfloat16, float16 or float32 (both sides)")
    p.add_argument("--decode-batches", default=None,
                   help="e.g. 1,8: instead of the two workloads, decode at each batch size (prompts of "
                        "--prompt-len tokens, --max-tokens new each; both sides one batch)")
    p.add_argument("--prompt-len", type=int, default=32, help="with --decode-batches")
    p.add_argument("--linear-attention-backend", default="auto", choices=("auto", "torch", "fla"),
                   help="ours: the gated DeltaNet kernels (auto: flash-linear-attention on a GPU when it imports)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    from transformers import AutoModelForCausalLM

    batches = [int(b) for b in args.decode_batches.split(",")] if args.decode_batches else []
    n, m = max(batches) if batches else args.prompts, args.max_tokens
    path = built_model(args.model) if args.model in BUILT else args.model
    t0 = time.perf_counter()
    engine = LLMEngine.from_pretrained(path, max_num_seqs=n, max_model_len=64 + 2 * m + 8, device=args.device,
                                       dtype=args.dtype, linear_attention_backend=args.linear_attention_backend)
    t1 = time.perf_counter()
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=engine.dtype).to(args.device).eval()  # same as ours
    print(f"loaded in {t1 - t0:.1f} s (ours), {time.perf_counter() - t1:.1f} s (transformers)", file=sys.stderr)
    result = {"model": args.model, "threads": torch.get_num_threads(), "device": args.device,
              "dtype": str(engine.dtype).removeprefix("torch."),
              "linear_attention_backend": engine.model.delta_rule.name}
    if batches:
        prompts = make_prompts(engine, n, args.prompt_len)
        for b in batches:
            result[f"batch {b}"] = compare(engine, hf_model, prompts[:b], [m] * b, b)
            print(f"batch {b}: {result[f'batch {b}']}", file=sys.stderr, flush=True)  # a long run's partial figures
    else:
        prompts = make_prompts(engine, 2 * n)
        mixed = [16 + (2 * m - 16) * ((i * 37) % (2 * n)) // (2 * n - 1) for i in range(2 * n)]
        result.update({"uniform": compare(engine, hf_model, prompts[:n], [m] * n, n),
                       "mixed": compare(engine, hf_model, prompts, mixed, n)})
    if args.json:
        print(json.dumps(result))
        return
    print(f"model: {args.model}, device: {args.device}, dtype: {result['dtype']} (both sides), "
          f"torch threads: {result['threads']}, ours' linear attention: {result['linear_attention_backend']}")
    for name in [k for k in result if isinstance(result[k], dict)]:
        print(f"[{name}]")
        for k, v in result[name].items():
            print(f"  {k:32} {v}")


if __name__ == "__main__":
    main()
