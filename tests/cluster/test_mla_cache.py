"""DeepSeek's compressed KV cache: latent + shared rotary key per token, not full keys and values."""
from cluster.engine import LLMEngine
from cluster.model.kv_cache import KVCache


def test_mla_cache_is_as_small_as_the_design_intends(checkpoint_factory):
    engine = LLMEngine.from_pretrained(str(checkpoint_factory("deepseek_v3")), max_num_seqs=2, max_model_len=64)
    cfg = engine.cfg
    per_token = engine.cache.bytes_per_token
    assert per_token == cfg.num_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4
    # A plain multi-head cache of the same width: full keys (no-rope + rope) and values for every head.
    mha = cfg.num_layers * cfg.num_heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim) * 4
    print(f"deepseek_v3 tiny: {per_token} B/token (MLA) vs {mha} B/token (MHA), {mha / per_token:.1f}x smaller")
    assert per_token * 4 < mha


def test_plain_attention_cache_shape(checkpoint_factory):
    engine = LLMEngine.from_pretrained(str(checkpoint_factory("mixtral")), max_num_seqs=2, max_model_len=64)
    cfg = engine.cfg
    assert engine.cache.bytes_per_token == cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * 4
    assert isinstance(engine.cache, KVCache)


def test_absorbed_decode_equals_expanding_kv_b(checkpoint_factory, monkeypatch):
    """MLA decode with kv_b absorbed into the query and output (DeepSeek's / vLLM's way) against today's
    expansion over the whole context: fp32 logits within 1e-4, greedy tokens identical, batched too."""
    from cluster.engine import SamplingParams
    from cluster.model import mla
    from tests.helpers import our_greedy_logits, run_recording_logits

    engine = LLMEngine.from_pretrained(str(checkpoint_factory("deepseek_v3")), max_num_seqs=4, max_model_len=128)
    prompt, prompts = [3, 14, 15, 92, 65, 35], [[5, 17, 33, 2], list(range(3, 40, 2)), [7]]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    runs = {}
    for absorb in (True, False):
        monkeypatch.setattr(mla, "ABSORB_DECODE", absorb)
        runs[absorb] = our_greedy_logits(engine, prompt, 16), run_recording_logits(engine, prompts, params)
    (tokens, logits), (batched, batched_logits) = runs[True]
    (ref_tokens, ref_logits), (ref_batched, ref_batched_logits) = runs[False]
    assert tokens == ref_tokens and batched == ref_batched
    worst = max((a - b).abs().max().item() for a, b in zip(logits, ref_logits))
    worst = max([worst] + [(a - b).abs().max().item() for xs, ys in zip(batched_logits, ref_batched_logits)
                           for a, b in zip(xs, ys)])
    assert 0 < worst < 1e-4, worst  # two computations (not one path twice), equal to rounding
