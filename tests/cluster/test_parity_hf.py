"""Every family against Hugging Face transformers: logits at every step and greedy tokens."""
import pytest

from cluster.engine import LLMEngine, SamplingParams
from tests.helpers import hf_greedy_logits, load_hf, our_greedy_logits

PROMPTS = [[5, 17, 33, 2, 90, 41, 7], [100], list(range(3, 60, 2))]
NEW_TOKENS = 32


@pytest.mark.parametrize("prompt", PROMPTS, ids=["short", "one-token", "long"])
def test_logits_and_greedy_tokens_match_transformers(family_checkpoint, prompt):
    family, path = family_checkpoint
    engine = LLMEngine.from_pretrained(str(path), max_num_seqs=4)
    hf_tokens, hf_logits = hf_greedy_logits(load_hf(path), prompt, NEW_TOKENS)
    tokens, logits = our_greedy_logits(engine, prompt, NEW_TOKENS)
    worst = max((a - b).abs().max().item() for a, b in zip(logits, hf_logits))
    print(f"{family}: max |logit diff| over {NEW_TOKENS} steps = {worst:.2e}")
    assert worst < 1e-4
    assert tokens == hf_tokens
    [out] = engine.generate([prompt], SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True))
    assert out.token_ids == hf_tokens
