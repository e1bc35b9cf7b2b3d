"""DeepSeek Sparse Attention with index_topk shrunk below the context, so the lightning indexer really
selects: DeepSeek-V3.2 (FP8, indexer rotating halves) and GLM-5 (interleaved), against transformers,
in prefill (each query its own selection) and in decode (the indexer keys read back from the paged cache)."""
import pytest

from cluster.engine import LLMEngine
from cluster.model.kv_cache import KVCache
from tests.cluster.helpers import PROMPT, STEPS, TOLERANCE
from tests.helpers import hf_greedy_logits, load_hf, our_greedy_logits
from tests.published_checkpoints import build

TOPK = 4  # keys per query, against a context of 10 prompt tokens growing to 26


@pytest.mark.parametrize("name", ["DeepSeek-V3.2", "GLM-5"])
def test_indexer_selects_as_transformers(name, tmp_path):
    ours, reference = build(name, tmp_path, overrides={"index_topk": TOPK})
    engine = LLMEngine.from_pretrained(str(ours), dtype="float32", max_num_seqs=2, max_model_len=256)
    assert engine.cfg.index_topk == TOPK < len(PROMPT)
    hf_tokens, hf_logits = hf_greedy_logits(load_hf(reference), PROMPT, STEPS)
    tokens, logits = our_greedy_logits(engine, PROMPT, STEPS)
    worst = max((a - b).abs().max().item() for a, b in zip(logits, hf_logits))
    print(f"{name} index_topk={TOPK}: max |logit diff| {worst:.2e}, tokens identical: {tokens == hf_tokens}")
    assert tokens == hf_tokens
    assert worst < TOLERANCE


def test_indexer_keys_live_in_the_paged_cache():
    """The indexer's key is part of each cached token's row: budgeted and paged with the latent."""
    from cluster.families import get_family
    from tests.published_configs import tiny

    cfg = get_family("deepseek_v32").parse_config(tiny("DeepSeek-V3.2"))
    cache = KVCache.for_model(cfg, num_blocks=2, block_size=4)
    assert cache.v.shape[-1] == cfg.qk_rope_head_dim + cfg.index_head_dim
    assert cache.bytes_per_token == cfg.num_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim + cfg.index_head_dim) * 4


def test_past_the_released_index_topk_as_transformers(tmp_path):
    """DeepSeek-V3.2 as released (index_topk 2048) on a 2060-token prompt: the last queries of the prefill
    and every decode step keep 2048 of more cached tokens."""
    ours, reference = build("DeepSeek-V3.2", tmp_path)
    prompt = [(7 * i + 3) % 250 + 1 for i in range(2060)]
    engine = LLMEngine.from_pretrained(str(ours), dtype="float32", max_num_seqs=1, max_model_len=2100)
    assert engine.cfg.index_topk == 2048 < len(prompt)
    hf_tokens, hf_logits = hf_greedy_logits(load_hf(reference), prompt, 3)
    tokens, logits = our_greedy_logits(engine, prompt, 3)
    assert tokens == hf_tokens
    assert max((a - b).abs().max().item() for a, b in zip(logits, hf_logits)) < TOLERANCE
