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
