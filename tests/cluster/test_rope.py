"""RoPE scaling and sliding windows: our frequencies against transformers' ROPE_INIT_FUNCTIONS, and
whole models against transformers with the scaling / window a config turns on."""
import math

import pytest
import torch

from cluster.engine import LLMEngine
from cluster.errors import UnsupportedModelError
from cluster.families.rope_config import parse_rope
from cluster.model.rope import attention_factor, inv_freq
from tests.helpers import hf_greedy_logits, load_hf, our_greedy_logits
from tests.published_checkpoints import build

HEAD_DIM, MAX_POS = 64, 4096
SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024},
    "yarn-gpt-oss": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                     "original_max_position_embeddings": 1024},
    "yarn-deepseek": {"type": "yarn", "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707, "beta_fast": 32,
                      "beta_slow": 1, "original_max_position_embeddings": 128},
    "yarn-attention-factor": {"rope_type": "yarn", "factor": 8.0, "attention_factor": 0.9,
                              "original_max_position_embeddings": 512},
    "yarn-partial": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024,
                     "partial_rotary_factor": 0.5},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 512},
    "longrope": {"rope_type": "longrope", "short_factor": [1.0 + i / 40 for i in range(32)],
                 "long_factor": [1.5 + i / 10 for i in range(32)], "original_max_position_embeddings": 1024},
}


def _transformers(scaling: dict, seq_len: int | None):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = LlamaConfig(hidden_size=HEAD_DIM * 4, num_attention_heads=4, head_dim=HEAD_DIM,
                         max_position_embeddings=MAX_POS, rope_parameters={**scaling, "rope_theta": 10000.0})
    kind = scaling.get("rope_type", scaling.get("type"))
    return ROPE_INIT_FUNCTIONS[kind](config, "cpu", seq_len=seq_len)


@pytest.mark.parametrize("seq_len", [None, 100, 3000, 9000])
@pytest.mark.parametrize("kind", sorted(SCALINGS))
def test_frequencies_and_attention_factor_match_transformers(kind, seq_len):
    scaling = SCALINGS[kind]
    rope = parse_rope({"rope_scaling": scaling, "max_position_embeddings": MAX_POS}, HEAD_DIM, default_partial=1.0)
    expected, expected_factor = _transformers(scaling, seq_len)
    torch.testing.assert_close(inv_freq(rope, seq_len), expected, rtol=1e-6, atol=0)
    assert attention_factor(rope, seq_len) == pytest.approx(expected_factor, rel=1e-9)


def test_both_spellings_read_alike():
    scaling = {"rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024},
               "rope_theta": 5e5, "max_position_embeddings": MAX_POS}
    params = {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024,
                                  "rope_theta": 5e5}, "max_position_embeddings": MAX_POS}
    assert parse_rope(scaling, HEAD_DIM) == parse_rope(params, HEAD_DIM)


@pytest.mark.parametrize("cfg,field", [
    ({"rope_scaling": {"rope_type": "su", "factor": 2.0}}, "rope_scaling.rope_type 'su'"),
    ({"rope_parameters": {"rope_type": "mrope", "mrope_section": [1]}}, "rope_parameters.rope_type 'mrope'"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0, "mrope_section": [8]}}, "rope_scaling.mrope_section"),
    ({"rope_scaling": {"rope_type": "linear"}}, "rope_scaling.factor"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
])
def test_unknown_rope_settings_are_refused_naming_the_field(cfg, field):
    with pytest.raises(UnsupportedModelError, match=field.replace(".", r"\.")):
        parse_rope({**cfg, "model_type": "mixtral"}, HEAD_DIM)


# (published config, overrides, prompt length): each turns on one scaling or window.
MODELS = {
    "linear": ("Mixtral-8x7B-Instruct-v0.1", {"rope_scaling": {"type": "linear", "factor": 4.0}}, 10),
    # beyond max_position_embeddings dynamic NTK recomputes the base from the sequence's length (Qwen3: transformers'
    # dynamic and yarn need config.head_dim set, which Mixtral's config leaves None)
    "dynamic": ("Qwen3-30B-A3B",
                {"rope_scaling": {"type": "dynamic", "factor": 2.0}, "max_position_embeddings": 32}, 40),
    "llama3": ("Mixtral-8x7B-Instruct-v0.1", {"rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}}, 10),
    "yarn-rope_parameters": ("Qwen3-30B-A3B", {"rope_scaling": None, "rope_parameters": {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768, "rope_theta": 1e6}}, 10),
    "mixtral-sliding": ("Mixtral-8x7B-Instruct-v0.1", {"sliding_window": 8}, 20),
    "qwen2_moe-sliding": ("Qwen1.5-MoE-A2.7B-Chat", {"use_sliding_window": True, "sliding_window": 8,
                                                     "max_window_layers": 1}, 20),
    "qwen3_moe-sliding": ("Qwen3-30B-A3B", {"use_sliding_window": True, "sliding_window": 8}, 20),
}


@pytest.mark.parametrize("case", sorted(MODELS))
def test_scaled_or_windowed_model_matches_transformers(case, tmp_path):
    name, overrides, length = MODELS[case]
    ours, reference = build(name, tmp_path, overrides=overrides)
    prompt = [(11 * i + 5) % 250 + 1 for i in range(length)]
    engine = LLMEngine.from_pretrained(str(ours), dtype="float32", max_num_seqs=2, max_model_len=256)
    if "sliding" in case:
        assert any(w == 8 for w in engine.cfg.sliding_windows)
    tokens, logits = our_greedy_logits(engine, prompt, 16)
    hf_tokens, hf_logits = hf_greedy_logits(load_hf(reference), prompt, 16)
    worst = max((a - b).abs().max().item() for a, b in zip(logits, hf_logits))
    print(f"{case}: max |logit diff| {worst:.2e}")
    assert tokens == hf_tokens and worst < 1e-4


def test_context_limit_follows_the_scaling():
    cfg = {"max_position_embeddings": 40960, "rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                                              "original_max_position_embeddings": 32768}}
    assert parse_rope(cfg, 128).context_limit() == 131072  # Qwen3 with its model card's YaRN block
    assert parse_rope({"max_position_embeddings": 2048, "rope_scaling": {"type": "linear", "factor": 4}},
                      128).context_limit() == 8192
    assert math.isclose(attention_factor(parse_rope(cfg, 128)), 0.1 * math.log(4) + 1)
