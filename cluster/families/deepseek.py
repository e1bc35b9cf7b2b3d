"""DeepSeek-V2 and -V3: multi-head latent attention, shared experts beside many small routed
experts, the first layers dense, and group-limited gating (softmax for V2; sigmoid with a
per-expert selection bias for V3)."""
from __future__ import annotations

from typing import Any

from cluster.config import ModelConfig
from cluster.families.base import QWEN_STYLE_TENSORS, Family, UnsupportedModelError, common_fields, require

_ATTN = "model.layers.{layer}.self_attn."
TENSORS = {
    **{k: v for k, v in QWEN_STYLE_TENSORS.items() if not k.startswith(("shared_", "q_", "k_", "v_"))},
    "q_proj": _ATTN + "q_proj.weight",
    "q_a_proj": _ATTN + "q_a_proj.weight",
    "q_a_norm": _ATTN + "q_a_layernorm.weight",
    "q_b_proj": _ATTN + "q_b_proj.weight",
    "kv_a_proj": _ATTN + "kv_a_proj_with_mqa.weight",
    "kv_a_norm": _ATTN + "kv_a_layernorm.weight",
    "kv_b_proj": _ATTN + "kv_b_proj.weight",
    "router_bias": "model.layers.{layer}.mlp.gate.e_score_correction_bias",
    "shared_gate": "model.layers.{layer}.mlp.shared_experts.gate_proj.weight",
    "shared_up": "model.layers.{layer}.mlp.shared_experts.up_proj.weight",
    "shared_down": "model.layers.{layer}.mlp.shared_experts.down_proj.weight",
}


def _moe_layers(cfg: dict[str, Any], num_layers: int) -> tuple[bool, ...]:
    first_dense = int(cfg.get("first_k_dense_replace") or 0)
    freq = int(cfg.get("moe_layer_freq") or 1)
    return tuple(layer >= first_dense and layer % freq == 0 for layer in range(num_layers))


def _parse(cfg: dict[str, Any], version: int) -> ModelConfig:
    if cfg.get("attention_bias"):
        raise UnsupportedModelError("config.json: attention_bias=true is not supported for DeepSeek models")
    base = common_fields(cfg)
    rope_dim = int(require(cfg, "qk_rope_head_dim"))
    moe_inter = int(require(cfg, "moe_intermediate_size"))
    topk_method = cfg.get("topk_method", "noaux_tc" if version == 3 else "greedy")
    grouped = topk_method in ("group_limited_greedy", "noaux_tc")
    return ModelConfig(
        **{**base, "head_dim": rope_dim, "num_kv_heads": base["num_heads"]},
        num_experts=int(require(cfg, "n_routed_experts")),
        top_k=int(require(cfg, "num_experts_per_tok")),
        expert_intermediate_size=moe_inter,
        norm_topk_prob=bool(cfg.get("norm_topk_prob", version == 3)),
        moe_layers=_moe_layers(cfg, base["num_layers"]),
        dense_intermediate_size=int(require(cfg, "intermediate_size")),
        shared_expert_intermediate_size=moe_inter * int(cfg.get("n_shared_experts") or 0),
        scoring=cfg.get("scoring_func", "sigmoid" if version == 3 else "softmax"),
        n_group=int(cfg.get("n_group") or 1) if grouped else 1,
        topk_group=int(cfg.get("topk_group") or 1) if grouped else 1,
        group_score="top2_sum" if version == 3 else "max",
        routed_scaling_factor=float(cfg.get("routed_scaling_factor") or 1.0),
        attention="mla",
        q_lora_rank=int(cfg.get("q_lora_rank") or 0),
        kv_lora_rank=int(require(cfg, "kv_lora_rank")),
        qk_nope_head_dim=int(require(cfg, "qk_nope_head_dim")),
        qk_rope_head_dim=rope_dim,
        v_head_dim=int(require(cfg, "v_head_dim")),
        # V2 rotates interleaved pairs (complex form); V3 does unless rope_interleave is false.
        rope_interleave=bool(cfg.get("rope_interleave", True)) if version == 3 else True,
    )


V2 = Family("deepseek_v2", lambda cfg: _parse(cfg, 2), TENSORS)
V3 = Family("deepseek_v3", lambda cfg: _parse(cfg, 3), TENSORS)
