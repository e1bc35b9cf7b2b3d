"""Attention without repeating K/V per query head, and the choice of attention backend."""
import pytest
import torch

from cluster.engine import LLMEngine, SamplingParams
from cluster.model import attention
from tests.helpers import our_greedy_logits, run_recording_logits
from tests.published_checkpoints import build

PROMPTS = [[5, 17, 33, 2], list(range(3, 40, 2)), [7]]
# gpt-oss slides a 128-token window on every other layer: a prompt past it, so the window masks something.
LONG_PROMPT = [(7 * i + 3) % 250 + 1 for i in range(150)]


# GQA with sinks and a sliding window; GQA with Llama 4's chunked attention (both mask prefill: n > 1 rows fold).
@pytest.mark.parametrize("name", ["gpt-oss-20b", "Llama-4-Scout-17B-16E"])
def test_folded_gqa_equals_attending_per_head(tmp_path, monkeypatch, name):
    """Query heads folded onto their kv head (K/V read once, never repeated) against each query head
    attending on its own: greedy tokens identical, fp32 logits equal to rounding, batched decode too."""
    ours, _ = build(name, tmp_path)
    engine = LLMEngine.from_pretrained(str(ours), dtype="float32", max_num_seqs=4, max_model_len=256)
    prompt = LONG_PROMPT if name.startswith("gpt-oss") else PROMPTS[1] * 2
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    folded, calls = attention._folded, []
    monkeypatch.setattr(attention, "_folded", lambda *a: calls.append(a[0].shape[2]) or folded(*a))
    runs = {}
    for fold in (False, True):  # the folded run last: `calls` keeps its query row counts
        monkeypatch.setattr(attention, "FOLD_GQA", fold)
        runs[fold] = our_greedy_logits(engine, prompt, 4), run_recording_logits(engine, PROMPTS, params)
        assert bool(calls) == fold
    (tokens, logits), (batched, batched_logits) = runs[True]
    (ref_tokens, ref_logits), (ref_batched, ref_batched_logits) = runs[False]
    assert tokens == ref_tokens and batched == ref_batched
    pairs = list(zip(logits, ref_logits)) + [p for xs, ys in zip(batched_logits, ref_batched_logits)
                                              for p in zip(xs, ys)]
    worst = max((a - b).abs().max().item() for a, b in pairs)
    print(f"{name}: folded vs per head, max |logit diff| {worst:.2e}; query rows folded: {sorted(set(calls))}")
    assert worst < 1e-4
    assert 1 in calls and any(n > 1 for n in calls)  # decode and masked prefill went through the folded path
