"""Multimodal wrappers served as text models: Kimi-K2.5's text model under `language_model.*` (or
transformers' `model.language_model.*`) is found and loaded with its text_config's INT4
quantization_config; its vision tower and projector are never read; Qwen3.5 is refused naming
what it lacks; Gemma 4's text model is found under model.language_model.* with its per-layer attention
shapes. (Kimi-K2.5 and Gemma 4 against transformers: tests/cluster/test_published.py.)"""
import pytest

from cluster.errors import UnsupportedModelError
from cluster.families import FAMILIES, relocate, resolve
from cluster.families.rope_config import parse_rope
from cluster.loader import load_backbone, load_experts, open_model
from tests.published_checkpoints import build
from tests.published_configs import tiny


def test_kimi_k25_reads_its_text_model_and_not_one_vision_byte(tmp_path):
    ours, _ = build("Kimi-K2.5", tmp_path)
    ckpt, family, cfg = open_model(str(ours))
    assert (cfg.model_type, cfg.quantization.method) == ("kimi_k2", "int4")  # text_config's own quantization
    vision = {n for n in ckpt.tensors if n.startswith(("vision_tower.", "mm_projector."))}
    assert vision and family.tensor_name("embed") == "language_model.model.embed_tokens.weight"
    load_backbone(ckpt, family, cfg)
    load_experts(ckpt, family, cfg, cfg.experts())
    assert ckpt.bytes_read == sum(i.nbytes for n, i in ckpt.tensors.items() if n not in vision)


@pytest.mark.parametrize("stored, embed, lm_head", [
    ("language_model.model.embed_tokens.weight", "language_model.model.embed_tokens.weight",
     "language_model.lm_head.weight"),  # as Kimi-K2.5 ships it
    ("model.language_model.embed_tokens.weight", "model.language_model.embed_tokens.weight",
     "lm_head.weight"),  # as transformers saves a wrapper
])
def test_wrapper_weights_are_found_under_either_prefix(stored, embed, lm_head):
    config = tiny("Kimi-K2.5")
    family = relocate(FAMILIES["kimi_k2"], config, lambda name: name == stored)
    assert (family.tensor_name("embed"), family.tensor_name("lm_head")) == (embed, lm_head)
    assert family.tensor_name("expert_gate", 1, 3).endswith("layers.1.mlp.experts.3.gate_proj.weight")


def test_wrapper_without_its_text_weights_names_the_prefixes():
    with pytest.raises(UnsupportedModelError, match="language_model.model."):
        relocate(FAMILIES["kimi_k2"], tiny("Kimi-K2.5"), lambda name: False)


def test_wrapper_text_config_of_another_model_is_refused():
    config = tiny("Kimi-K2.5")
    config["text_config"]["model_type"] = "qwen3_moe"
    with pytest.raises(UnsupportedModelError, match="text_config.model_type 'qwen3_moe'"):
        resolve(config)


# Qwen3.5's MoE as released (sizes as published): a vision wrapper whose
# text layers are 3 Gated DeltaNet (linear attention) to 1 full attention, M-RoPE on a quarter of each head.
QWEN3_5_MOE = {
    "architectures": ["Qwen3_5MoeForConditionalGeneration"], "image_token_id": 248056, "model_type": "qwen3_5_moe",
    "text_config": {
        "attention_bias": False, "attention_dropout": 0.0, "attn_output_gate": True, "dtype": "bfloat16",
        "eos_token_id": 248044, "full_attention_interval": 4, "head_dim": 256, "hidden_act": "silu",
        "hidden_size": 4096, "initializer_range": 0.02,
        "layer_types": ["linear_attention", "linear_attention", "linear_attention", "full_attention"] * 15,
        "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128, "linear_num_key_heads": 16,
        "linear_num_value_heads": 64, "linear_value_head_dim": 128, "max_position_embeddings": 262144,
        "model_type": "qwen3_5_moe_text", "moe_intermediate_size": 1024, "mtp_num_hidden_layers": 1,
        "num_attention_heads": 32, "num_experts": 512, "num_experts_per_tok": 10, "num_hidden_layers": 60,
        "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "router_aux_loss_coef": 0.001,
        "shared_expert_intermediate_size": 1024, "tie_word_embeddings": False, "vocab_size": 248320,
        "rope_parameters": {"mrope_interleaved": True, "mrope_section": [11, 11, 10], "rope_type": "default",
                            "rope_theta": 10000000, "partial_rotary_factor": 0.25}},
    "tie_word_embeddings": False, "transformers_version": "4.57.0.dev0", "video_token_id": 248057,
    "vision_config": {"deepstack_visual_indexes": [], "depth": 27, "hidden_act": "gelu_pytorch_tanh",
                      "hidden_size": 1152, "in_channels": 3, "intermediate_size": 4304, "model_type": "qwen3_5_moe",
                      "num_heads": 16, "num_position_embeddings": 2304, "out_hidden_size": 4096, "patch_size": 16,
                      "spatial_merge_size": 2, "temporal_patch_size": 2},
    "vision_end_token_id": 248054, "vision_start_token_id": 248053}


def test_qwen3_5_moe_resolves_to_its_hybrid_text_model():
    family, text = resolve(QWEN3_5_MOE)
    cfg = family.parse_config(text)
    assert family.model_type == "qwen3_5_moe_text" and cfg.linear_layers == (True, True, True, False) * 15
    assert cfg.moe_layers == (True,) * 60 and cfg.norm_topk_prob and cfg.rope.dim == 64


def test_mrope_is_plain_rope_for_text():
    plain = {"max_position_embeddings": 4096, "rope_parameters": {"rope_type": "default", "rope_theta": 1e7}}
    mrope = {"max_position_embeddings": 4096, "rope_parameters": {**plain["rope_parameters"],
                                                                  "mrope_section": [24, 20, 20],
                                                                  "mrope_interleaved": True}}
    assert parse_rope(mrope, 128) == parse_rope(plain, 128)


def test_gemma4_reads_its_text_model_and_not_one_vision_byte(tmp_path):
    ours, _ = build("gemma-4-26B-A4B-it", tmp_path)
    ckpt, family, cfg = open_model(str(ours))
    vision = {n for n in ckpt.tensors if not n.startswith("model.language_model.")}
    assert vision and family.tensor_name("embed") == "model.language_model.embed_tokens.weight"
    assert cfg.layer_head_dims == (16,) * 5 + (32,) and cfg.layer_kv_heads == (2,) * 5 + (1,)
    assert cfg.value_from_key == (False,) * 5 + (True,) and cfg.sliding_windows == (8,) * 5 + (None,)
    load_backbone(ckpt, family, cfg)
    load_experts(ckpt, family, cfg, cfg.experts())
    assert ckpt.bytes_read == sum(i.nbytes for n, i in ckpt.tensors.items() if n not in vision)


@pytest.mark.parametrize("change, field", [
    ({"enable_moe_block": False}, "enable_moe_block"),  # the dense Gemma 4 (31B): no experts to serve
    ({"hidden_size_per_layer_input": 256}, "hidden_size_per_layer_input"),  # E2B / E4B's per-layer embeddings
    ({"num_kv_shared_layers": 2}, "num_kv_shared_layers"),
    ({"use_bidirectional_attention": "all"}, "use_bidirectional_attention"),
    ({"hidden_activation": "silu"}, "hidden_activation"),
    ({"rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}, "rope_parameters"),
])
def test_gemma4_refusals_name_the_field(change, field):
    config = tiny("gemma-4-26B-A4B-it")
    config["text_config"].update(change)
    family, text = resolve(config)
    with pytest.raises(UnsupportedModelError, match=field):
        family.parse_config(text)


def test_proportional_rope_is_transformers():
    """Gemma 4's full layers: 1/4 of the frequencies turn (exponents over the whole head), the rest are 0."""
    import torch
    from transformers import PretrainedConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from cluster.model.rope import inv_freq

    params = {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6}
    ref = PretrainedConfig(head_dim=512, hidden_size=1024, num_attention_heads=2, rope_parameters=params)
    expected, _ = ROPE_INIT_FUNCTIONS["proportional"](ref)
    rope = parse_rope({"max_position_embeddings": 4096, "rope_parameters": params}, 512)
    assert rope.dim == 512 and torch.equal(inv_freq(rope), expected)
    assert (inv_freq(rope)[64:] == 0).all() and (inv_freq(rope)[:64] > 0).all()
