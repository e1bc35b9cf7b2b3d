"""config.json of published MoE checkpoints, field for field, and the sizes we shrink them to.

Written here from the released files (no model hub on this machine: recalled, and
checked against public copies of them where the search tools found one: Qwen2-57B-A14B,
GLM-4.5-Air, Kimi-K2, gpt-oss, Phi-3.5-MoE's rope factors, Granite's multipliers; MiniMax-M2 and
Llama-4-Scout from public copies of their config.json, Maverick from TensorRT-LLM's tests, DBRX recalled
and checked against converted copies' nested attn_config / ffn_config).
`tiny(name)` is the published dict with only sizes changed (hidden, heads, layers,
experts, vocab, intermediate sizes, and the lists whose length follows them); those
checkpoints take seconds to build and run.
"""
from __future__ import annotations

import copy

_MIXTRAL = {
    "architectures": ["MixtralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
    "hidden_act": "silu", "initializer_range": 0.02, "model_type": "mixtral", "num_experts_per_tok": 2,
    "num_key_value_heads": 8, "num_local_experts": 8, "output_router_logits": False, "rms_norm_eps": 1e-05,
    "rope_theta": 1000000.0, "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "use_cache": True,
}
_QWEN2 = {
    "architectures": ["Qwen2MoeForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "decoder_sparse_step": 1, "hidden_act": "silu", "initializer_range": 0.02, "model_type": "qwen2_moe",
    "norm_topk_prob": False, "output_router_logits": False, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "router_aux_loss_coef": 0.001, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
    "use_sliding_window": False, "vocab_size": 151936,
}
_QWEN3 = {
    "architectures": ["Qwen3MoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "decoder_sparse_step": 1, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 2048,
    "initializer_range": 0.02, "mlp_only_layers": [], "model_type": "qwen3_moe", "moe_intermediate_size": 768,
    "norm_topk_prob": True, "num_attention_heads": 32, "num_experts": 128, "num_experts_per_tok": 8,
    "num_hidden_layers": 48, "num_key_value_heads": 4, "output_router_logits": False, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.51.0", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
}
_DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                 "AutoModel": "modeling_deepseek.DeepseekV3Model",
                 "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"},
    "aux_loss_alpha": 0.001, "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 3,
    "hidden_act": "silu", "hidden_size": 7168, "initializer_range": 0.02, "intermediate_size": 18432,
    "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v3", "moe_intermediate_size": 2048,
    "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256, "n_shared_experts": 1, "norm_topk_prob": True,
    "num_attention_heads": 128, "num_experts_per_tok": 8, "num_hidden_layers": 61, "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1, "pretraining_tp": 1, "q_lora_rank": 1536, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
    "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1", "use_cache": True, "v_head_dim": 128, "vocab_size": 129280,
}

# Kimi-K2-Thinking's (and K2.5's text_config's) quantization_config: routed experts only.
KIMI_INT4 = {
    "config_groups": {"group_0": {
        "input_activations": None, "output_activations": None, "targets": ["Linear"],
        "weights": {"actorder": None, "block_structure": None, "dynamic": False, "group_size": 32, "num_bits": 4,
                    "observer": "minmax", "observer_kwargs": {}, "strategy": "group", "symmetric": True,
                    "type": "int"}}},
    "format": "pack-quantized",
    "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", "re:.*mlp\\.(gate|up|gate_up|down)_proj.*"],
    "kv_cache_scheme": None, "quant_method": "compressed-tensors", "quantization_status": "compressed"}

PUBLISHED: dict[str, dict] = {
    "Mixtral-8x7B-Instruct-v0.1": {
        **_MIXTRAL, "hidden_size": 4096, "intermediate_size": 14336, "max_position_embeddings": 32768,
        "num_attention_heads": 32, "num_hidden_layers": 32, "router_aux_loss_coef": 0.02,
        "transformers_version": "4.36.0.dev0", "vocab_size": 32000},
    "Mixtral-8x22B-Instruct-v0.1": {
        **_MIXTRAL, "hidden_size": 6144, "intermediate_size": 16384, "max_position_embeddings": 65536,
        "num_attention_heads": 48, "num_hidden_layers": 56, "router_aux_loss_coef": 0.001, "router_jitter_noise": 0.0,
        "transformers_version": "4.38.0", "vocab_size": 32768},
    "Qwen1.5-MoE-A2.7B-Chat": {
        **_QWEN2, "eos_token_id": 151645, "hidden_size": 2048, "intermediate_size": 5632,
        "max_position_embeddings": 8192, "max_window_layers": 21, "moe_intermediate_size": 1408,
        "num_attention_heads": 16, "num_experts": 60, "num_experts_per_tok": 4, "num_hidden_layers": 24,
        "num_key_value_heads": 16, "shared_expert_intermediate_size": 5632, "sliding_window": 32768,
        "transformers_version": "4.39.0.dev0"},
    "Qwen2-57B-A14B": {
        **_QWEN2, "eos_token_id": 151643, "hidden_size": 3584, "intermediate_size": 18944,
        "max_position_embeddings": 131072, "max_window_layers": 28, "moe_intermediate_size": 2560,
        "num_attention_heads": 28, "num_experts": 64, "num_experts_per_tok": 8, "num_hidden_layers": 28,
        "num_key_value_heads": 4, "shared_expert_intermediate_size": 20480, "sliding_window": 131072,
        "transformers_version": "4.40.1"},
    "Qwen3-30B-A3B": {
        **_QWEN3, "bos_token_id": 151643, "intermediate_size": 6144, "max_position_embeddings": 40960,
        "max_window_layers": 48, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001},
    "Qwen3-Coder-30B-A3B-Instruct": {
        **_QWEN3, "intermediate_size": 5472, "max_position_embeddings": 262144, "max_window_layers": 28,
        "qkv_bias": False, "rope_theta": 10000000, "router_aux_loss_coef": 0.0, "shared_expert_intermediate_size": 0,
        "use_qk_norm": True},
    "OLMoE-1B-7B-0125": {
        "architectures": ["OlmoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "clip_qkv": None,
        "eos_token_id": 50279, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
        "intermediate_size": 1024, "max_position_embeddings": 4096, "model_type": "olmoe", "norm_topk_prob": False,
        "num_attention_heads": 16, "num_experts": 64, "num_experts_per_tok": 8, "num_hidden_layers": 16,
        "num_key_value_heads": 16, "output_router_logits": False, "pad_token_id": 1, "rms_norm_eps": 1e-05,
        "rope_scaling": None, "rope_theta": 10000.0, "router_aux_loss_coef": 0.01, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "transformers_version": "4.47.0.dev0", "use_cache": True, "vocab_size": 50304},
    "DeepSeek-V2-Lite-Chat": {
        **{k: v for k, v in _DEEPSEEK_V3.items() if k not in ("ep_size", "num_nextn_predict_layers",
                                                             "quantization_config")},
        "architectures": ["DeepseekV2ForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV2Config",
                     "AutoModel": "modeling_deepseek.DeepseekV2Model",
                     "AutoModelForCausalLM": "modeling_deepseek.DeepseekV2ForCausalLM"},
        "bos_token_id": 100000, "eos_token_id": 100001, "first_k_dense_replace": 1, "hidden_size": 2048,
        "intermediate_size": 10944, "model_type": "deepseek_v2", "moe_intermediate_size": 1408, "n_group": 1,
        "n_routed_experts": 64, "n_shared_experts": 2, "norm_topk_prob": False, "num_attention_heads": 16,
        "num_experts_per_tok": 6, "num_hidden_layers": 27, "num_key_value_heads": 16, "q_lora_rank": None,
        "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                         "original_max_position_embeddings": 4096, "type": "yarn"},
        "routed_scaling_factor": 1.0, "scoring_func": "softmax", "topk_group": 1, "topk_method": "greedy",
        "transformers_version": "4.39.3", "vocab_size": 102400},
    "DeepSeek-V3": _DEEPSEEK_V3,
    # The BF16 DeepSeek-V3 as the community publishes it (DeepSeek's fp8_cast_bf16.py): no quantization_config.
    "DeepSeek-V3-BF16": {k: v for k, v in _DEEPSEEK_V3.items() if k != "quantization_config"},
    "DeepSeek-R1": {**_DEEPSEEK_V3, "transformers_version": "4.46.3"},
    "Kimi-K2-Instruct": {
        **{k: v for k, v in _DEEPSEEK_V3.items() if k != "ep_size"},
        "bos_token_id": 163584, "eos_token_id": 163585, "first_k_dense_replace": 1, "max_position_embeddings": 131072,
        "model_type": "kimi_k2", "n_group": 1, "n_routed_experts": 384, "num_attention_heads": 64,
        "num_key_value_heads": 64, "num_nextn_predict_layers": 0,
        "rope_scaling": {"beta_fast": 1.0, "beta_slow": 1.0, "factor": 32.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                         "original_max_position_embeddings": 4096, "type": "yarn"},
        "rope_theta": 50000.0, "routed_scaling_factor": 2.827, "topk_group": 1, "transformers_version": "4.48.3",
        "vocab_size": 163840},
    # Kimi-K2-Thinking: Kimi-K2 with its routed experts in compressed-tensors INT4 (group 32, symmetric).
    "Kimi-K2-Thinking": {
        **{k: v for k, v in _DEEPSEEK_V3.items() if k != "ep_size"},
        "bos_token_id": 163584, "eos_token_id": 163586, "first_k_dense_replace": 1,
        "max_position_embeddings": 262144, "model_type": "kimi_k2", "n_group": 1, "n_routed_experts": 384,
        "num_attention_heads": 64, "num_key_value_heads": 64, "num_nextn_predict_layers": 0,
        "quantization_config": KIMI_INT4,
        "rope_scaling": {"beta_fast": 1.0, "beta_slow": 1.0, "factor": 64.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                         "original_max_position_embeddings": 4096, "type": "yarn"},
        "rope_theta": 50000.0, "routed_scaling_factor": 2.827, "topk_group": 1, "transformers_version": "4.56.2",
        "vocab_size": 163840},
    # Kimi-K2.5: a vision tower and projector around Kimi-K2-Thinking's text model (text_config, INT4 experts).
    "Kimi-K2.5": {
        "architectures": ["KimiK25ForConditionalGeneration"],
        "auto_map": {"AutoConfig": "configuration_kimi_k25.KimiK25Config",
                     "AutoModel": "modeling_kimi_k25.KimiK25ForConditionalGeneration",
                     "AutoModelForCausalLM": "modeling_kimi_k25.KimiK25ForConditionalGeneration"},
        "bos_token_id": 163584, "dtype": "bfloat16", "eos_token_id": 163585, "ignore_index": -100,
        "media_placeholder_token_id": 163605, "model_type": "kimi_k25", "pad_token_id": 163839,
        "text_config": None,  # below: Kimi-K2-Thinking's, its quantization_config ignoring the vision modules too
        "tie_word_embeddings": False, "transformers_version": "4.57.1", "use_unified_vision_chunk": True,
        "video_placeholder": "<|kimi_k25_video_placeholder|>",
        "vision_config": {
            "_attn_implementation": "flash_attention_2", "init_pos_emb_height": 64, "init_pos_emb_time": 4,
            "init_pos_emb_width": 64, "merge_kernel_size": [2, 2], "merge_type": "sd2_tpool", "mm_hidden_size": 1152,
            "mm_projector_type": "patchmerger", "model_type": "", "patch_size": 14, "projector_hidden_act": "gelu",
            "projector_ln_eps": 1e-05, "pos_emb_type": "divided_fixed", "text_hidden_size": 7168,
            "video_attn_type": "spatial_temporal", "vt_hidden_size": 1152, "vt_intermediate_size": 4304,
            "vt_num_attention_heads": 16, "vt_num_hidden_layers": 27}},
    # GLM-4.7-Flash: DeepSeek-V3's MLA and gating as glm4_moe_lite.
    "GLM-4.7-Flash": {
        "architectures": ["Glm4MoeLiteForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "pad_token_id": 154820, "eos_token_id": [154820, 154827, 154829], "hidden_act": "silu", "hidden_size": 2048,
        "intermediate_size": 10240, "max_position_embeddings": 202752, "model_type": "glm4_moe_lite",
        "moe_intermediate_size": 1536, "topk_method": "noaux_tc", "norm_topk_prob": True, "num_attention_heads": 20,
        "n_group": 1, "topk_group": 1, "n_routed_experts": 64, "n_shared_experts": 1, "routed_scaling_factor": 1.8,
        "num_experts_per_tok": 4, "first_k_dense_replace": 1, "num_hidden_layers": 47, "num_key_value_heads": 20,
        "num_nextn_predict_layers": 1, "partial_rotary_factor": 1.0, "rms_norm_eps": 1e-05, "rope_scaling": None,
        "rope_theta": 1000000, "tie_word_embeddings": False, "dtype": "bfloat16", "transformers_version": "5.0.0.dev0",
        "q_lora_rank": 768, "kv_lora_rank": 512, "qk_nope_head_dim": 192, "qk_rope_head_dim": 64, "v_head_dim": 256,
        "vocab_size": 154880, "use_cache": True},
    # DeepSeek-V3.2: DeepSeek-V3 plus the DSA lightning indexer (FP8 with UE8M0 scales, as V3.1).
    "DeepSeek-V3.2": {
        **{k: v for k, v in _DEEPSEEK_V3.items() if k != "auto_map"},
        "architectures": ["DeepseekV32ForCausalLM"], "index_head_dim": 128, "index_n_heads": 64, "index_topk": 2048,
        "model_type": "deepseek_v32",
        "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                "scale_fmt": "ue8m0", "weight_block_size": [128, 128]},
        "transformers_version": "4.44.2"},
    # GLM-5: MLA with a DSA indexer (interleaved rotary), V3-style gating, GLM's sizes.
    "GLM-5": {
        "architectures": ["GlmMoeDsaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "dtype": "bfloat16", "eos_token_id": [154820, 154827, 154829], "ep_size": 1, "first_k_dense_replace": 3,
        "hidden_act": "silu", "head_dim": 64, "hidden_size": 6144, "index_head_dim": 128, "index_n_heads": 32,
        "index_topk": 2048, "indexer_rope_interleave": True, "initializer_range": 0.02, "intermediate_size": 12288,
        "kv_lora_rank": 512, "max_position_embeddings": 202752, "model_type": "glm_moe_dsa",
        "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 256,
        "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 64, "num_experts_per_tok": 8,
        "num_hidden_layers": 78, "num_key_value_heads": 64, "num_nextn_predict_layers": 1, "pad_token_id": 154820,
        "q_lora_rank": 2048, "qk_head_dim": 256, "qk_nope_head_dim": 192, "qk_rope_head_dim": 64,
        "rms_norm_eps": 1e-05, "rope_interleave": True,
        "rope_parameters": {"rope_theta": 1000000, "rope_type": "default"}, "routed_scaling_factor": 2.5,
        "scoring_func": "sigmoid", "tie_word_embeddings": False, "topk_group": 1, "topk_method": "noaux_tc",
        "transformers_version": "5.0.2.dev0", "use_cache": True, "v_head_dim": 256, "vocab_size": 154880},
    "GLM-4.5-Air": {
        "architectures": ["Glm4MoeForCausalLM"], "attention_bias": True, "attention_dropout": 0.0,
        "pad_token_id": 151329, "eos_token_id": [151329, 151336, 151338], "head_dim": 128, "hidden_act": "silu",
        "hidden_size": 4096, "partial_rotary_factor": 0.5, "initializer_range": 0.02, "intermediate_size": 10944,
        "max_position_embeddings": 131072, "model_type": "glm4_moe", "moe_intermediate_size": 1408,
        "norm_topk_prob": True, "num_attention_heads": 96, "n_group": 1, "topk_group": 1, "n_routed_experts": 128,
        "n_shared_experts": 1, "routed_scaling_factor": 1.0, "num_experts_per_tok": 8, "first_k_dense_replace": 1,
        "num_hidden_layers": 46, "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_scaling": None,
        "rope_theta": 1000000, "num_nextn_predict_layers": 1, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.54.0", "use_cache": True, "use_qk_norm": False, "vocab_size": 151552},
    "gpt-oss-20b": {
        "architectures": ["GptOssForCausalLM"], "attention_bias": True, "attention_dropout": 0.0,
        "eos_token_id": 200002, "experts_per_token": 4, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2880,
        "initial_context_length": 4096, "initializer_range": 0.02, "intermediate_size": 2880,
        "layer_types": ["sliding_attention", "full_attention"] * 12, "max_position_embeddings": 131072,
        "model_type": "gpt_oss", "num_attention_heads": 64, "num_experts_per_tok": 4, "num_hidden_layers": 24,
        "num_key_value_heads": 8, "num_local_experts": 32, "output_router_logits": False, "pad_token_id": 199999,
        "quantization_config": {"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                           "model.embed_tokens", "lm_head"],
                                "quant_method": "mxfp4"},
        "rms_norm_eps": 1e-05,
        "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0, "original_max_position_embeddings": 4096,
                         "rope_type": "yarn", "truncate": False},
        "rope_theta": 150000, "router_aux_loss_coef": 0.9, "sliding_window": 128, "swiglu_limit": 7.0,
        "tie_word_embeddings": False, "transformers_version": "4.55.0.dev0", "use_cache": True, "vocab_size": 201088},
    "Phi-3.5-MoE-instruct": {
        "architectures": ["PhiMoEForCausalLM"], "attention_bias": True, "attention_dropout": 0.0,
        "auto_map": {"AutoConfig": "configuration_phimoe.PhiMoEConfig",
                     "AutoModelForCausalLM": "modeling_phimoe.PhiMoEForCausalLM"},
        "bos_token_id": 1, "eos_token_id": 32000, "hidden_act": "silu", "hidden_dropout": 0.0, "hidden_size": 4096,
        "initializer_range": 0.02, "input_jitter_noise": 0.01, "intermediate_size": 6400, "lm_head_bias": True,
        "max_position_embeddings": 131072, "model_type": "phimoe", "num_attention_heads": 32,
        "num_experts_per_tok": 2, "num_hidden_layers": 32, "num_key_value_heads": 8, "num_local_experts": 16,
        "original_max_position_embeddings": 4096, "output_router_logits": False, "rms_norm_eps": 1e-05,
        # 64 factors each in the release (head_dim 128); tiny() keeps the first head_dim / 2 of them.
        "rope_scaling": {"long_factor": [1.0199999809265137, 1.0299999713897705, 1.0399999618530273,
                                         1.0499999523162842, 1.0499999523162842, 1.0499999523162842,
                                         1.059999942779541, 1.059999942779541],
                         "long_mscale": 1.243163121016122, "original_max_position_embeddings": 4096,
                         "short_factor": [1.0, 1.0399999618530273, 1.0399999618530273, 1.0399999618530273,
                                          1.0499999523162842, 1.0499999523162842, 1.0499999523162842,
                                          1.0499999523162842],
                         "short_mscale": 1.243163121016122, "type": "longrope"},
        "rope_theta": 10000.0, "router_aux_loss_coef": 0.0, "router_jitter_noise": 0.01, "sliding_window": 131072,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.43.3", "use_cache": True,
        "vocab_size": 32064},
    "granite-3.1-3b-a800m-instruct": {
        "architectures": ["GraniteMoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.1,
        "attention_multiplier": 0.015625, "bos_token_id": 0, "embedding_multiplier": 12.0, "eos_token_id": 0,
        "hidden_act": "silu", "hidden_size": 1536, "initializer_range": 0.02, "intermediate_size": 512,
        "logits_scaling": 6.0, "max_position_embeddings": 131072, "model_type": "granitemoe",
        "num_attention_heads": 24, "num_experts_per_tok": 8, "num_hidden_layers": 32, "num_key_value_heads": 8,
        "num_local_experts": 40, "output_router_logits": False, "pad_token_id": 0, "residual_multiplier": 0.22,
        "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 10000000.0, "router_aux_loss_coef": 0.001,
        "tie_word_embeddings": True, "torch_dtype": "bfloat16", "transformers_version": "4.46.0.dev0",
        "use_cache": True, "vocab_size": 49155},
    "MiniMax-M2": {
        "architectures": ["MiniMaxM2ForCausalLM"], "attn_type_list": [1] * 62,
        "auto_map": {"AutoConfig": "configuration_minimax_m2.MiniMaxM2Config",
                     "AutoModelForCausalLM": "modeling_minimax_m2.MiniMaxM2ForCausalLM"},
        "head_dim": 128, "hidden_act": "silu", "hidden_size": 3072, "intermediate_size": 1536,
        "max_position_embeddings": 196608, "model_type": "minimax_m2", "mtp_transformer_layers": 1,
        "num_attention_heads": 48, "num_experts_per_tok": 8, "num_hidden_layers": 62, "num_key_value_heads": 8,
        "num_local_experts": 256, "num_mtp_modules": 3, "qk_norm_type": "per_layer",
        "quantization_config": {"activation_scheme": "dynamic", "fmt": "float8_e4m3fn", "quant_method": "fp8",
                                "weight_block_size": [128, 128],
                                "modules_to_not_convert": ["gate", "e_score_correction_bias", "lm_head"]},
        "rms_norm_eps": 1e-06, "rope_theta": 5000000, "rotary_dim": 64, "scoring_func": "sigmoid",
        "shared_intermediate_size": 0, "tie_word_embeddings": False, "transformers_version": "4.46.1",
        "use_cache": True, "use_mtp": True, "use_qk_norm": True, "use_routing_bias": True, "vocab_size": 200064,
        "torch_dtype": "bfloat16"},
    "dbrx-instruct": {
        "architectures": ["DbrxForCausalLM"],
        "attn_config": {"clip_qkv": 8, "kv_n_heads": 8, "model_type": "", "rope_theta": 500000},
        "d_model": 6144, "emb_pdrop": 0.0,
        "ffn_config": {"ffn_hidden_size": 10752, "model_type": "", "moe_jitter_eps": 0, "moe_loss_weight": 0.05,
                       "moe_num_experts": 16, "moe_top_k": 4},
        "initializer_range": 0.02, "max_seq_len": 32768, "model_type": "dbrx", "n_heads": 48, "n_layers": 40,
        "output_router_logits": False, "resid_pdrop": 0.0, "router_aux_loss_coef": 0.05,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.40.0.dev0",
        "use_cache": True, "vocab_size": 100352},
    # As a public copy prints it (moe_layers / no_rope_layers written out as transformers fills them).
    "Llama-4-Scout-17B-16E": {
        "architectures": ["Llama4ForConditionalGeneration"], "boi_token_index": 200080, "eoi_token_index": 200081,
        "image_token_index": 200092, "model_type": "llama4",
        "text_config": {
            "attention_bias": False, "attention_chunk_size": 8192, "attention_dropout": 0.0, "attn_scale": 0.1,
            "attn_temperature_tuning": 4, "bos_token_id": 200000, "eos_token_id": [200001, 200007, 200008],
            "floor_scale": 8192, "for_llm_compressor": False, "head_dim": 128, "hidden_act": "silu",
            "hidden_size": 5120, "initializer_range": 0.02, "interleave_moe_layer_step": 1,
            "intermediate_size": 8192, "intermediate_size_mlp": 16384, "max_position_embeddings": 262144,
            "model_type": "llama4_text", "moe_layers": list(range(48)), "no_rope_layers": [1, 1, 1, 0] * 12,
            "num_attention_heads": 40, "num_experts_per_tok": 1, "num_hidden_layers": 48, "num_key_value_heads": 8,
            "num_local_experts": 16, "output_router_logits": False, "pad_token_id": 200018, "rms_norm_eps": 1e-05,
            "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                             "original_max_position_embeddings": 8192, "rope_type": "llama3"},
            "rope_theta": 500000.0, "router_aux_loss_coef": 0.001, "router_jitter_noise": 0.0,
            "torch_dtype": "bfloat16", "use_cache": True, "use_qk_norm": True, "vocab_size": 202048},
        "tie_word_embeddings": False, "transformers_version": "4.51.0",
        "vision_config": {
            "attention_dropout": 0.0, "hidden_act": "gelu", "hidden_size": 1408, "image_size": 336,
            "initializer_range": 0.02, "intermediate_size": 5632, "model_type": "llama4_vision_model",
            "multi_modal_projector_bias": False, "norm_eps": 1e-05, "num_attention_heads": 16, "num_channels": 3,
            "num_hidden_layers": 34, "patch_size": 14, "pixel_shuffle_ratio": 0.5, "projector_dropout": 0.0,
            "projector_input_dim": 4096, "projector_output_dim": 4096, "rope_theta": 10000,
            "vision_feature_layer": -1, "vision_feature_select_strategy": "default", "vision_output_dim": 4096}},
    # Maverick's text_config as TensorRT-LLM's tests vendor it (a 4.51.0.dev0 config: no moe_layers /
    # no_rope_layers lists, so transformers' interleave_moe_layer_step and no_rope_layer_interval rules apply).
    "Llama-4-Maverick-17B-128E-Instruct": {
        "architectures": ["Llama4ForConditionalGeneration"], "boi_token_index": 200080, "eoi_token_index": 200081,
        "image_token_index": 200092, "model_type": "llama4",
        "text_config": {
            "attention_bias": False, "attention_chunk_size": 8192, "attention_dropout": 0.0, "bos_token_id": 200000,
            "eos_token_id": [200001, 200007, 200008], "for_llm_compressor": False, "head_dim": 128,
            "hidden_act": "silu", "hidden_size": 5120, "initializer_range": 0.02, "interleave_moe_layer_step": 2,
            "intermediate_size": 8192, "intermediate_size_mlp": 16384, "max_position_embeddings": 1048576,
            "model_type": "llama4_text", "num_attention_heads": 40, "num_experts_per_tok": 1,
            "num_hidden_layers": 48, "num_key_value_heads": 8, "num_local_experts": 128,
            "output_router_logits": False, "pad_token_id": 200018, "rms_norm_eps": 1e-05, "rope_scaling": None,
            "rope_theta": 500000.0, "router_aux_loss_coef": 0.001, "router_jitter_noise": 0.0,
            "torch_dtype": "bfloat16", "use_cache": True, "use_qk_norm": False, "vocab_size": 202048},
        "torch_dtype": "bfloat16", "transformers_version": "4.51.0.dev0",
        "vision_config": {
            "attention_dropout": 0.0, "hidden_act": "gelu", "hidden_size": 1408, "image_size": 336,
            "initializer_range": 0.02, "intermediate_size": 5632, "model_type": "llama4_vision_model",
            "multi_modal_projector_bias": False, "norm_eps": 1e-05, "num_attention_heads": 16, "num_channels": 3,
            "num_hidden_layers": 34, "patch_size": 14, "pixel_shuffle_ratio": 0.5, "projector_dropout": 0.0,
            "projector_input_dim": 4096, "projector_output_dim": 4096, "rope_theta": 10000,
            "vision_feature_layer": -1, "vision_feature_select_strategy": "default", "vision_output_dim": 4096}},
    # Recalled (no public copy of its config.json found by the search tools); transformers' defaults agree.
    "Qwen3-Next-80B-A3B-Instruct": {
        "architectures": ["Qwen3NextForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 151643, "decoder_sparse_step": 1, "eos_token_id": 151645, "full_attention_interval": 4,
        "head_dim": 256, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
        "intermediate_size": 5120, "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128,
        "linear_num_key_heads": 16, "linear_num_value_heads": 32, "linear_value_head_dim": 128,
        "max_position_embeddings": 262144, "mlp_only_layers": [], "model_type": "qwen3_next",
        "moe_intermediate_size": 512, "norm_topk_prob": True, "num_attention_heads": 16, "num_experts": 512,
        "num_experts_per_tok": 10, "num_hidden_layers": 48, "num_key_value_heads": 2, "output_router_logits": False,
        "partial_rotary_factor": 0.25, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 10000000,
        "router_aux_loss_coef": 0.001, "shared_expert_intermediate_size": 512, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "transformers_version": "4.57.0.dev0", "use_cache": True,
        "use_sliding_window": False, "vocab_size": 151936},
    # Qwen3.5-35B-A3B (Qwen3.6-35B-A3B ships the same config.json): recalled; its text_config's layers, heads and
    # state sizes checked against public copies quoting them.
    "Qwen3.5-35B-A3B": {
        "architectures": ["Qwen3_5MoeForConditionalGeneration"], "image_token_id": 248056, "model_type": "qwen3_5_moe",
        "text_config": {
            "attention_bias": False, "attention_dropout": 0.0, "attn_output_gate": True, "dtype": "bfloat16",
            "eos_token_id": 248044, "full_attention_interval": 4, "head_dim": 256, "hidden_act": "silu",
            "hidden_size": 2048, "initializer_range": 0.02,
            "layer_types": ["linear_attention", "linear_attention", "linear_attention", "full_attention"] * 10,
            "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128, "linear_num_key_heads": 16,
            "linear_num_value_heads": 32, "linear_value_head_dim": 128, "max_position_embeddings": 262144,
            "model_type": "qwen3_5_moe_text", "moe_intermediate_size": 512, "mtp_num_hidden_layers": 1,
            "mtp_use_dedicated_embeddings": False, "num_attention_heads": 16, "num_experts": 256,
            "num_experts_per_tok": 8, "num_hidden_layers": 40, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
            "router_aux_loss_coef": 0.001, "shared_expert_intermediate_size": 512, "use_cache": True,
            "vocab_size": 248320,
            "rope_parameters": {"mrope_interleaved": True, "mrope_section": [11, 11, 10], "rope_type": "default",
                                "rope_theta": 10000000, "partial_rotary_factor": 0.25}},
        "tie_word_embeddings": False, "transformers_version": "4.57.0.dev0", "video_token_id": 248057,
        "vision_config": {"deepstack_visual_indexes": [], "depth": 27, "hidden_act": "gelu_pytorch_tanh",
                          "hidden_size": 1152, "in_channels": 3, "intermediate_size": 4304, "model_type": "qwen3_5_moe",
                          "num_heads": 16, "num_position_embeddings": 2304, "out_hidden_size": 2048, "patch_size": 16,
                          "spatial_merge_size": 2, "temporal_patch_size": 2},
        "vision_end_token_id": 248054, "vision_start_token_id": 248053},
    # gemma-4-26B-A4B-it: recalled, its text_config checked field by field against public copies quoting it
    # (geometry, experts, rope_parameters, layer_types, k_eq_v, softcapping; a tower-sharing sibling's
    # vision_config); the top-level token ids are transformers' Gemma4Config defaults.
    "gemma-4-26B-A4B-it": {
        "architectures": ["Gemma4ForConditionalGeneration"], "audio_config": None, "audio_token_id": 258881,
        "boa_token_id": 256000, "boi_token_id": 255999, "dtype": "bfloat16", "eoa_token_index": 258883,
        "eoi_token_id": 258882, "image_token_id": 258880, "initializer_range": 0.02, "model_type": "gemma4",
        "text_config": {
            "attention_bias": False, "attention_dropout": 0.0, "attention_k_eq_v": True, "bos_token_id": 2,
            "dtype": "bfloat16", "enable_moe_block": True, "eos_token_id": 1, "final_logit_softcapping": 30.0,
            "global_head_dim": 512, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 2816,
            "hidden_size_per_layer_input": 0, "initializer_range": 0.02, "intermediate_size": 2112,
            "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 5, "max_position_embeddings": 262144,
            "model_type": "gemma4_text", "moe_intermediate_size": 704, "num_attention_heads": 16,
            "num_experts": 128, "num_global_key_value_heads": 2, "num_hidden_layers": 30, "num_key_value_heads": 8,
            "num_kv_shared_layers": 0, "pad_token_id": 0, "rms_norm_eps": 1e-06,
            "rope_parameters": {
                "full_attention": {"partial_rotary_factor": 0.25, "rope_theta": 1000000.0, "rope_type": "proportional"},
                "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"}},
            "sliding_window": 1024, "tie_word_embeddings": True, "top_k_experts": 8,
            "use_bidirectional_attention": "vision", "use_cache": True, "use_double_wide_mlp": False,
            "vocab_size": 262144, "vocab_size_per_layer_input": 262144},
        "tie_word_embeddings": True, "transformers_version": "5.5.0.dev0", "video_token_id": 258884,
        "vision_config": {
            "attention_bias": False, "attention_dropout": 0.0, "default_output_length": 280, "dtype": "bfloat16",
            "head_dim": 72, "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 1152, "initializer_range": 0.02,
            "intermediate_size": 4304, "max_position_embeddings": 131072, "model_type": "gemma4_vision",
            "num_attention_heads": 16, "num_hidden_layers": 27, "num_key_value_heads": 16, "patch_size": 16,
            "pooling_kernel_size": 3, "position_embedding_size": 10240, "rms_norm_eps": 1e-06,
            "rope_parameters": {"rope_theta": 100.0, "rope_type": "default"}, "standardize": True,
            "use_clipped_linears": False},
        "vision_soft_tokens_per_image": 280},
}
# NVIDIA-Nemotron-3-Nano-30B-A3B-BF16: from public copies of its config.json (verbatim in several repositories'
# tests and notes; they agree field for field). Its attention layers have no rotary (rope_theta and
# partial_rotary_factor are read by nothing in transformers' model).
PUBLISHED["NVIDIA-Nemotron-3-Nano-30B-A3B-BF16"] = {
    "architectures": ["NemotronHForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_nemotron_h.NemotronHConfig",
                 "AutoModel": "modeling_nemotron_h.NemotronHForCausalLM",
                 "AutoModelForCausalLM": "modeling_nemotron_h.NemotronHForCausalLM"},
    "bos_token_id": 1, "chunk_size": 128, "conv_kernel": 4, "eos_token_id": 2, "expand": 2, "head_dim": 128,
    "hidden_dropout": 0.0, "hidden_size": 2688,
    "hybrid_override_pattern": "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME", "initializer_range": 0.02,
    "intermediate_size": 1856, "layer_norm_epsilon": 1e-05, "mamba_head_dim": 64, "mamba_hidden_act": "silu",
    "mamba_num_heads": 64, "mamba_proj_bias": False, "mamba_ssm_cache_dtype": "float32",
    "max_position_embeddings": 262144, "mlp_bias": False, "mlp_hidden_act": "relu2", "model_type": "nemotron_h",
    "moe_intermediate_size": 1856, "moe_shared_expert_intermediate_size": 3712, "n_group": 1, "n_groups": 8,
    "n_routed_experts": 128, "n_shared_experts": 1, "norm_eps": 1e-05, "norm_topk_prob": True,
    "num_attention_heads": 32, "num_experts_per_tok": 6, "num_hidden_layers": 52, "num_key_value_heads": 2,
    "num_logits_to_keep": 1, "pad_token_id": 0, "partial_rotary_factor": 1.0, "rescale_prenorm_residual": True,
    "residual_in_fp32": False, "rope_theta": 10000, "routed_scaling_factor": 2.5, "sliding_window": None,
    "ssm_state_size": 128, "tie_word_embeddings": False, "time_step_floor": 0.0001, "time_step_max": 0.1,
    "time_step_min": 0.001, "topk_group": 1, "torch_dtype": "bfloat16", "transformers_version": "4.55.4",
    "use_bias": False, "use_cache": True, "use_conv_bias": True, "use_mamba_kernels": True, "vocab_size": 131072}
# NVIDIA-Nemotron-3-Super-120B-A12B-BF16: from a public copy of the release's config.json (a C++ test fixture that
# reproduces the NVFP4 release's config.json field for field, its quantization_config aside: the BF16 release has
# none); its pattern, sizes, expert counts and latent size agree with two more public copies (a parameter-count
# test citing huggingface.co/nvidia/NVIDIA-Nemotron-3-Super-120B-A12B-BF16, and an MLX conversion check). Beside
# Nano: moe_latent_size (the routed experts work at 1024 of the 4096 hidden), 512 experts top 22, a routed
# scaling of 5, and one multi-token-prediction layer (`mtp.*`, read by neither transformers nor us).
PUBLISHED["NVIDIA-Nemotron-3-Super-120B-A12B-BF16"] = {
    "architectures": ["NemotronHForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_nemotron_h.NemotronHConfig",
                 "AutoModelForCausalLM": "modeling_nemotron_h.NemotronHForCausalLM"},
    "bos_token_id": 1, "chunk_size": 128, "conv_kernel": 4, "dtype": "bfloat16", "eos_token_id": 2, "expand": 2,
    "head_dim": 128, "hidden_dropout": 0.0, "hidden_size": 4096,
    "hybrid_override_pattern": "MEMEMEM*EMEMEMEM*EMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*EMEMEMEM*EMEMEMEME",
    "initializer_range": 0.02, "intermediate_size": 2688, "layer_norm_epsilon": 1e-05, "mamba_head_dim": 64,
    "mamba_hidden_act": "silu", "mamba_num_heads": 128, "mamba_proj_bias": False, "mamba_ssm_cache_dtype": "float32",
    "max_position_embeddings": 262144, "mlp_bias": False, "mlp_hidden_act": "relu2", "model_type": "nemotron_h",
    "moe_intermediate_size": 2688, "moe_latent_size": 1024, "moe_shared_expert_intermediate_size": 5376,
    "moe_shared_expert_overlap": False, "mtp_hybrid_override_pattern": "*E", "n_group": 1, "n_groups": 8,
    "n_routed_experts": 512, "n_shared_experts": 1, "norm_eps": 1e-05, "norm_topk_prob": True,
    "num_attention_heads": 32, "num_experts_per_tok": 22, "num_hidden_layers": 88, "num_key_value_heads": 2,
    "num_logits_to_keep": 1, "num_nextn_predict_layers": 1, "pad_token_id": 0, "partial_rotary_factor": 1.0,
    "rescale_prenorm_residual": True, "residual_in_fp32": False, "rope_theta": 10000, "routed_scaling_factor": 5.0,
    "sliding_window": None, "ssm_state_size": 128, "tie_word_embeddings": False, "time_step_floor": 0.0001,
    "time_step_max": 0.1, "time_step_min": 0.001, "topk_group": 1, "transformers_version": "4.57.6",
    "use_bias": False, "use_cache": True, "use_conv_bias": True, "use_mamba_kernels": True, "vocab_size": 131072}
# ibm-granite/granite-4.0-h-small: recalled. Its sizes, expert counts, shared_intermediate_size, tied embeddings,
# vocabulary and the 36 Mamba / 4 attention layer types checked against public partial copies of its config.json;
# the multipliers, the attention layers' positions and the token ids from memory (no full public copy found).
_GRANITE_H_TYPES = ["mamba"] * 5 + ["attention"] + (["mamba"] * 9 + ["attention"]) * 3 + ["mamba"] * 4
PUBLISHED["granite-4.0-h-small"] = {
    "architectures": ["GraniteMoeHybridForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "attention_multiplier": 0.0078125, "bos_token_id": 100257, "embedding_multiplier": 12, "eos_token_id": 100257,
    "hidden_act": "silu", "hidden_size": 4096, "init_method": "mup", "initializer_range": 0.1,
    "intermediate_size": 768, "layer_types": _GRANITE_H_TYPES, "logits_scaling": 16, "mamba_chunk_size": 256,
    "mamba_conv_bias": True, "mamba_d_conv": 4, "mamba_d_head": 64, "mamba_d_state": 128, "mamba_expand": 2,
    "mamba_n_groups": 1, "mamba_n_heads": 128, "mamba_proj_bias": False, "max_position_embeddings": 131072,
    "model_type": "granitemoehybrid", "normalization_function": "rmsnorm", "num_attention_heads": 32,
    "num_experts_per_tok": 10, "num_hidden_layers": 40, "num_key_value_heads": 8, "num_local_experts": 72,
    "output_router_logits": False, "pad_token_id": 100256, "position_embedding_type": "nope",
    "residual_multiplier": 0.22, "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 10000,
    "router_aux_loss_coef": 0.0, "shared_intermediate_size": 1536, "tie_word_embeddings": True,
    "torch_dtype": "bfloat16", "transformers_version": "4.56.0", "use_cache": True, "vocab_size": 100352}
# AI21-Jamba-1.5-Mini: from a public copy of its config.json (a converter's test fixture, field for field; that
# copy sets use_mamba_kernels false for its own run, the release true).
PUBLISHED["AI21-Jamba-1.5-Mini"] = {
    "architectures": ["JambaForCausalLM"], "attention_dropout": 0.0, "attn_layer_offset": 4, "attn_layer_period": 8,
    "bos_token_id": 1, "eos_token_id": [2, 518], "expert_layer_offset": 1, "expert_layer_period": 2,
    "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
    "mamba_conv_bias": True, "mamba_d_conv": 4, "mamba_d_state": 16, "mamba_dt_rank": 256, "mamba_expand": 2,
    "mamba_proj_bias": False, "max_position_embeddings": 262144, "model_type": "jamba", "num_attention_heads": 32,
    "num_experts": 16, "num_experts_per_tok": 2, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "num_logits_to_keep": 1, "output_router_logits": False, "pad_token_id": 0, "rms_norm_eps": 1e-06,
    "router_aux_loss_coef": 0.001, "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.40.2", "use_cache": True, "use_mamba_kernels": True, "vocab_size": 65536}
PUBLISHED["Kimi-K2.5"]["text_config"] = {
    **PUBLISHED["Kimi-K2-Thinking"], "eos_token_id": 163585, "transformers_version": "4.57.1",
    "quantization_config": {**KIMI_INT4, "ignore": [*KIMI_INT4["ignore"], "re:.*vision_tower.*", "re:.*mm_projector.*"]}}
# What Qwen3's model card tells users to add to config.json for 128K contexts.
QWEN3_YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
PUBLISHED["Qwen3-30B-A3B+YaRN"] = {**PUBLISHED["Qwen3-30B-A3B"], "rope_scaling": QWEN3_YARN}

_MHA = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
        "vocab_size": 256}
_MLA_FP8 = {  # every FP8 matrix at least one 128x128 block; kv_a (160 rows) ends in a partial block
    "hidden_size": 256, "num_attention_heads": 4, "num_key_value_heads": 4, "num_hidden_layers": 4,
    "vocab_size": 256, "intermediate_size": 384, "moe_intermediate_size": 128, "n_routed_experts": 32,
    "q_lora_rank": 128, "kv_lora_rank": 128, "qk_nope_head_dim": 32, "qk_rope_head_dim": 32, "v_head_dim": 32}
_SIZES_DEEPSEEK_BF16 = {  # INT4 groups of 32 columns: every expert's input dim a multiple of 32
    **_MHA, "num_hidden_layers": 4, "num_key_value_heads": 4, "intermediate_size": 96, "moe_intermediate_size": 32,
    "n_routed_experts": 32, "q_lora_rank": 48, "kv_lora_rank": 32, "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 16, "v_head_dim": 16}
_SIZES: dict[str, dict] = {
    "Mixtral-8x7B-Instruct-v0.1": {**_MHA, "intermediate_size": 96},
    "Mixtral-8x22B-Instruct-v0.1": {**_MHA, "intermediate_size": 96},
    "Qwen1.5-MoE-A2.7B-Chat": {**_MHA, "num_key_value_heads": 4, "num_experts": 8, "moe_intermediate_size": 32,
                               "shared_expert_intermediate_size": 64, "intermediate_size": 96},
    "Qwen2-57B-A14B": {**_MHA, "num_experts": 16, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 64,
                       "intermediate_size": 96},
    "Qwen3-30B-A3B": {**_MHA, "head_dim": 16, "num_experts": 16, "moe_intermediate_size": 32,
                      "intermediate_size": 96},
    "OLMoE-1B-7B-0125": {**_MHA, "num_key_value_heads": 4, "num_experts": 16, "intermediate_size": 32},
    "DeepSeek-V2-Lite-Chat": {
        **_MHA, "num_hidden_layers": 3, "num_key_value_heads": 4, "intermediate_size": 96, "moe_intermediate_size": 32,
        "n_routed_experts": 16, "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 16, "v_head_dim": 16},
    "DeepSeek-V3": _MLA_FP8,
    "DeepSeek-V3-BF16": _SIZES_DEEPSEEK_BF16,
    "DeepSeek-R1": _MLA_FP8,
    "Kimi-K2-Instruct": {**_MLA_FP8, "num_hidden_layers": 2},
    "Kimi-K2-Thinking": {**_SIZES_DEEPSEEK_BF16, "num_hidden_layers": 2},
    "Kimi-K2.5": {"text_config": {**_SIZES_DEEPSEEK_BF16, "num_hidden_layers": 2}},
    "DeepSeek-V3.2": {**_SIZES_DEEPSEEK_BF16, "num_hidden_layers": 3, "index_head_dim": 32, "index_n_heads": 8},
    "GLM-5": {
        **_MHA, "num_hidden_layers": 3, "first_k_dense_replace": 1, "num_key_value_heads": 4, "head_dim": 16,
        "intermediate_size": 96, "moe_intermediate_size": 32, "n_routed_experts": 16, "q_lora_rank": 48,
        "kv_lora_rank": 32, "qk_head_dim": 40, "qk_nope_head_dim": 24, "qk_rope_head_dim": 16, "v_head_dim": 32,
        "index_head_dim": 32, "index_n_heads": 8, "vocab_size": 154880},
    "GLM-4.7-Flash": {
        **_MHA, "num_hidden_layers": 3, "num_key_value_heads": 4, "intermediate_size": 96, "moe_intermediate_size": 32,
        "n_routed_experts": 16, "q_lora_rank": 48, "kv_lora_rank": 32, "qk_nope_head_dim": 24, "qk_rope_head_dim": 16,
        "v_head_dim": 32, "vocab_size": 154880},
    # vocab stays above pad_token_id (151329, 199999): nn.Embedding needs the padding row.
    "GLM-4.5-Air": {**_MHA, "hidden_size": 32, "head_dim": 16, "intermediate_size": 96, "moe_intermediate_size": 32,
                    "n_routed_experts": 16, "vocab_size": 151552},
    "gpt-oss-20b": {**_MHA, "hidden_size": 32, "head_dim": 16, "num_hidden_layers": 4, "intermediate_size": 64,
                    "num_local_experts": 8, "layer_types": ["sliding_attention", "full_attention"] * 2,
                    "vocab_size": 201088},
    "Phi-3.5-MoE-instruct": {**_MHA, "intermediate_size": 64},
    "granite-3.1-3b-a800m-instruct": {**_MHA, "num_local_experts": 16, "intermediate_size": 32},
}
# Qwen3-Next: 4 layers (3 gated DeltaNet, 1 gated attention), 2 key heads serving 4 value heads, rotary on 4 of
# 16 head dims, 16 of 512 experts top 10 as released.
_SIZES["Qwen3-Next-80B-A3B-Instruct"] = {
    **_MHA, "num_hidden_layers": 4, "head_dim": 16, "intermediate_size": 64, "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32, "num_experts": 16, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
    "linear_num_key_heads": 2, "linear_num_value_heads": 4}
_SIZES["Qwen3.5-35B-A3B"] = {"text_config": {
    "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 4, "head_dim": 16,
    "vocab_size": 256, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32, "num_experts": 16,
    "linear_key_head_dim": 16, "linear_value_head_dim": 16, "linear_num_key_heads": 2, "linear_num_value_heads": 4,
    "layer_types": ["linear_attention", "linear_attention", "linear_attention", "full_attention"],
    # M-RoPE's sections cover the rotary half-dimension (2 of 16 x 0.25 = 4): shrunk with it
    "rope_parameters": {"mrope_interleaved": True, "mrope_section": [1, 1, 0], "rope_type": "default",
                        "rope_theta": 10000000, "partial_rotary_factor": 0.25}}}
# Nemotron 3 Nano: the released pattern's first 7 blocks (Mamba-2, MoE, Mamba-2, MoE, Mamba-2, attention, MoE),
# 16 Mamba heads in the released 8 groups (2 heads a group), 16 of 128 experts top 6, chunks of 32 (the
# 150-token prompt crosses four).
_SIZES["NVIDIA-Nemotron-3-Nano-30B-A3B-BF16"] = {
    **_MHA, "head_dim": 16, "num_hidden_layers": 7, "hybrid_override_pattern": "MEMEM*E", "intermediate_size": 32,
    "mamba_num_heads": 16, "mamba_head_dim": 8, "ssm_state_size": 16, "chunk_size": 32, "n_routed_experts": 16,
    "moe_intermediate_size": 32, "moe_shared_expert_intermediate_size": 64}
# Nemotron 3 Super: the released pattern's first 9 blocks (Mamba-2 and MoE alternating, attention, MoE), the
# latent a quarter of the hidden size as released (16 of 64: the rows the workers get are that narrow), 64 of 512
# experts top 22 as released, chunks of 32 (the 150-token prompt crosses four).
_SIZES["NVIDIA-Nemotron-3-Super-120B-A12B-BF16"] = {
    **_SIZES["NVIDIA-Nemotron-3-Nano-30B-A3B-BF16"], "num_hidden_layers": 9, "hybrid_override_pattern": "MEMEMEM*E",
    "moe_latent_size": 16, "n_routed_experts": 64}
# Granite 4.0-H Small: 4 layers (Mamba-2, Mamba-2, attention, Mamba-2), 16 Mamba heads of 8 in the released one
# group, 16 of 72 experts top 10, chunks of 32; the vocabulary as released (pad_token_id 100256 must index it).
_SIZES["granite-4.0-h-small"] = {
    **_MHA, "vocab_size": 100352, "num_hidden_layers": 4, "layer_types": ["mamba", "mamba", "attention", "mamba"],
    "intermediate_size": 32, "shared_intermediate_size": 64, "num_local_experts": 16, "mamba_n_heads": 16,
    "mamba_d_head": 8, "mamba_d_state": 16, "mamba_chunk_size": 32}
# Jamba 1.5 Mini: 6 layers (attention on layer 4 and MoE on the odd layers, the released periods), Mamba-1 of
# 2 x 64 channels with the released 16 states and a dt rank of 8.
_SIZES["AI21-Jamba-1.5-Mini"] = {**_MHA, "num_hidden_layers": 6, "intermediate_size": 32, "mamba_dt_rank": 8}
_SIZES["Qwen3-Coder-30B-A3B-Instruct"] = _SIZES["Qwen3-30B-A3B+YaRN"] = _SIZES["Qwen3-30B-A3B"]
# MiniMax-M2: rotary on the first quarter of each head as released (64 of 128), 8 of 16 experts.
_SIZES["MiniMax-M2"] = {**_MHA, "head_dim": 16, "rotary_dim": 4, "intermediate_size": 32, "num_local_experts": 16,
                        "attn_type_list": [1, 1]}
# DBRX nests its sizes (clip_qkv 8 as released: it does not bite on these small weights; OLMoE's tests cover it).
_SIZES["dbrx-instruct"] = {
    "d_model": 64, "n_heads": 4, "n_layers": 2, "vocab_size": 256,
    "attn_config": {**PUBLISHED["dbrx-instruct"]["attn_config"], "kv_n_heads": 2},
    "ffn_config": {**PUBLISHED["dbrx-instruct"]["ffn_config"], "ffn_hidden_size": 32}}
# Llama 4's sizes are in text_config. Chunks of 8 positions and a floor_scale of 4 make the chunked
# attention and the NoPE layers' query temperature act within the test's 26 tokens; the vocabulary stays
# above pad_token_id (200018).
_SIZES["Llama-4-Scout-17B-16E"] = {"text_config": {
    **PUBLISHED["Llama-4-Scout-17B-16E"]["text_config"], "hidden_size": 64, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16, "num_hidden_layers": 4, "intermediate_size": 32,
    "intermediate_size_mlp": 64, "moe_layers": [0, 1, 2, 3], "no_rope_layers": [1, 1, 1, 0],
    "attention_chunk_size": 8, "floor_scale": 4}}
# Maverick: 4 layers = dense, MoE, dense, MoE (interleave step 2), the fourth NoPE (default interval 4).
_SIZES["Llama-4-Maverick-17B-128E-Instruct"] = {"text_config": {
    **PUBLISHED["Llama-4-Maverick-17B-128E-Instruct"]["text_config"], "hidden_size": 64, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16, "num_hidden_layers": 4, "intermediate_size": 32,
    "intermediate_size_mlp": 64, "num_local_experts": 16, "attention_chunk_size": 8}}

# Gemma 4: 6 layers (five sliding, one full, as released), sliding heads of 16 and full heads of 32 (one kv head,
# values from the keys), 16 of 128 experts top 8 as released, a window of 8 positions that the test's 26 tokens
# cross.
_SIZES["gemma-4-26B-A4B-it"] = {"text_config": {
    "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "num_global_key_value_heads": 1,
    "head_dim": 16, "global_head_dim": 32, "num_hidden_layers": 6, "intermediate_size": 48,
    "moe_intermediate_size": 32, "num_experts": 16, "vocab_size": 256, "vocab_size_per_layer_input": 256,
    "sliding_window": 8, "layer_types": ["sliding_attention"] * 5 + ["full_attention"]}}


def tiny(name: str) -> dict:
    """The published config with only its sizes shrunk (a deep copy: transformers edits nested dicts);
    a multimodal wrapper's sizes are its text_config's."""
    cfg, sizes = copy.deepcopy(PUBLISHED[name]), copy.deepcopy(_SIZES[name])
    cfg.update({k: v for k, v in sizes.items() if k != "text_config"})
    if "text_config" in sizes:
        cfg["text_config"].update(sizes["text_config"])
    return cfg
