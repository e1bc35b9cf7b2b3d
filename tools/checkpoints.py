"""Tiny random Hugging Face MoE checkpoints, written with transformers (fp32): the tests' and the benchmarks' models."""
from __future__ import annotations

from pathlib import Path

import torch

COMMON = dict(vocab_size=128, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=512, initializer_range=0.1, tie_word_embeddings=False)

FAMILIES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(intermediate_size=48, num_local_experts=8, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(moe_intermediate_size=32, shared_expert_intermediate_size=48, intermediate_size=96,
                       num_experts=8, num_experts_per_tok=2, mlp_only_layers=[1], decoder_sparse_step=1,
                       norm_topk_prob=False)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(moe_intermediate_size=32, intermediate_size=96, num_experts=8, num_experts_per_tok=2,
                       head_dim=24, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[])),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM",
              dict(intermediate_size=32, num_experts=8, num_experts_per_tok=2, clip_qkv=None,
                   norm_topk_prob=False, eos_token_id=None, pad_token_id=None)),
    # V2: q from one projection, softmax, group-limited by each group's best expert.
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM",
                    dict(num_key_value_heads=4, intermediate_size=96, moe_intermediate_size=24, n_routed_experts=8,
                         num_experts_per_tok=2, n_shared_experts=2, first_k_dense_replace=1, q_lora_rank=None,
                         kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=24,
                         topk_method="group_limited_greedy", n_group=4, topk_group=2, routed_scaling_factor=1.5,
                         norm_topk_prob=False)),
    # V3: low-rank q, sigmoid scores with a selection bias, groups scored by their top-2 sum.
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    dict(num_key_value_heads=4, intermediate_size=96, moe_intermediate_size=24, n_routed_experts=8,
                         num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=48,
                         kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=24, n_group=4,
                         topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True)),
}


def _randomise_router_bias(model) -> None:
    """Random e_score_correction_bias so the tests see it change which experts are chosen."""
    for name, buf in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buf.copy_(torch.randn(buf.shape) * 0.3)


def make_checkpoint(family: str, out: Path, seed: int = 0, **overrides) -> Path:
    import transformers

    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(**{**COMMON, **extra, **overrides})
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        _randomise_router_bias(model)
    model.save_pretrained(out)
    return out
