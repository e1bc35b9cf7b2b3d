"""DeepSeek-V2 and -V3 (and Kimi-K2, a DeepSeek-V3 by architecture): multi-head latent attention,
shared experts beside many small routed experts, the first layers dense, and group-limited gating
(softmax for V2; sigmoid with a per-expert selection bias for V3). With YaRN, the attention
softmax scale is multiplied by mscale(factor, mscale_all_dim)² as DeepSeek defines."""
from __future__ import annotations

from typing import Any

from cluster.config import ModelConfig
from cluster.families.base import (QWEN_STYLE_TENSORS, Family, common_fields, refuse_if, require)
from cluster.model.rope import Rope, yarn_mscale

_ATTN, _MLP = "model.layers.{layer}.self_attn.", "model.layers.{layer}.mlp."
# The MoE block's own names beyond the Qwen-style ones: GLM-4.5 stores its gate bias and shared experts alike.
MOE_TENSORS = {
    "gate_bias": _MLP + "gate.e_score_correction_bias",
    "shared_gate": _MLP + "shared_experts.gate_proj.weight",
    "shared_up": _MLP + "shared_experts.up_proj.weight",
    "shared_down": _MLP + "shared_experts.down_proj.weight",
}
TENSORS = {
    **{k: v for k, v in QWEN_STYLE_TENSORS.items() if not k.startswith(("shared_", "q_", "k_", "v_"))},
    "q_proj": _ATTN + "q_proj.weight",
    "q_a_proj": _ATTN + "q_a_proj.weight",
    "q_a_norm": _ATTN + "q_a_layernorm.weight",
    "q_b_proj": _ATTN + "q_b_proj.weight",
    "kv_a_proj": _ATTN + "kv_a_proj_with_mqa.weight",
    "kv_a_norm": _ATTN + "kv_a_layernorm.weight",
    "kv_b_proj": _ATTN + "kv_b_proj.weight",
    **MOE_TENSORS,
}
_TOPK_METHODS = {2: ("greedy", "group_limited_greedy"), 3: ("noaux_tc",)}


def first_dense_layers(cfg: dict[str, Any], num_layers: int) -> tuple[bool, ...]:
    """first_k_dense_replace dense layers, then a MoE layer every moe_layer_freq (DeepSeek, GLM)."""
    first_dense = int(cfg.get("first_k_dense_replace") or 0)
    freq = int(cfg.get("moe_layer_freq") or 1)
    return tuple(layer >= first_dense and layer % freq == 0 for layer in range(num_layers))


def _softmax_scale(rope: Rope, qk_head_dim: int) -> float:
    scale = qk_head_dim ** -0.5
    if rope.kind != "default" and rope.mscale_all_dim:
        scale *= yarn_mscale(rope.factor, rope.mscale_all_dim) ** 2
    return scale


def _parse(cfg: dict[str, Any], version: int) -> ModelConfig:
    refuse_if(bool(cfg.get("attention_bias")), "attention_bias", "DeepSeek attention has no biases here")
    rope_dim = int(require(cfg, "qk_rope_head_dim"))
    base = common_fields(cfg, rope_head_dim=rope_dim)
    moe_inter = int(require(cfg, "moe_intermediate_size"))
    topk_method = cfg.get("topk_method", _TOPK_METHODS[version][0])
    refuse_if(topk_method not in _TOPK_METHODS[version], "topk_method",
              f"{topk_method!r}; this family implements {', '.join(_TOPK_METHODS[version])}")
    scoring = cfg.get("scoring_func", "sigmoid" if version == 3 else "softmax")
    refuse_if(scoring not in ("softmax", "sigmoid"), "scoring_func", f"{scoring!r}: only softmax or sigmoid")
    grouped = topk_method in ("group_limited_greedy", "noaux_tc")
    nope = int(require(cfg, "qk_nope_head_dim"))
    return ModelConfig(
        **{**base, "head_dim": rope_dim, "num_kv_heads": base["num_heads"]},
        num_experts=int(require(cfg, "n_routed_experts")),
        top_k=int(require(cfg, "num_experts_per_tok")),
        expert_intermediate_size=moe_inter,
        norm_topk_prob=bool(cfg.get("norm_topk_prob", version == 3)),
        moe_layers=first_dense_layers(cfg, base["num_layers"]),
        gate_fp32=True,
        dense_intermediate_size=int(require(cfg, "intermediate_size")),
        shared_expert_intermediate_size=moe_inter * int(cfg.get("n_shared_experts") or 0),
        scoring=scoring,
        n_group=int(cfg.get("n_group") or 1) if grouped else 1,
        topk_group=int(cfg.get("topk_group") or 1) if grouped else 1,
        group_score="top2_sum" if version == 3 else "max",
        routed_scaling_factor=float(cfg.get("routed_scaling_factor") or 1.0),
        attention="mla",
        attn_scale=_softmax_scale(base["rope"], nope + rope_dim),
        q_lora_rank=int(cfg.get("q_lora_rank") or 0),
        kv_lora_rank=int(require(cfg, "kv_lora_rank")),
        qk_nope_head_dim=nope,
        qk_rope_head_dim=rope_dim,
        v_head_dim=int(require(cfg, "v_head_dim")),
        # V2 rotates interleaved pairs (complex form); V3 does unless rope_interleave is false.
        rope_interleave=bool(cfg.get("rope_interleave", True)) if version == 3 else True,
    )


def parse_v3(cfg: dict[str, Any]) -> ModelConfig:
    return _parse(cfg, 3)


V2 = Family("deepseek_v2", lambda cfg: _parse(cfg, 2), TENSORS)
V3 = Family("deepseek_v3", parse_v3, TENSORS)
KIMI_K2 = Family("kimi_k2", parse_v3, TENSORS)  # Kimi-K2 ships a DeepSeek-V3 architecture
