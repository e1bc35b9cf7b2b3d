"""GLM-4.5 / GLM-4.5-Air: grouped-query attention with q/k/v biases, optional per-head q/k
RMSNorm (use_qk_norm), rotary on the first half of each head (partial_rotary_factor, 0.5 by
default), dense first layers, then DeepSeek-V3-style gating (sigmoid, selection bias, top-2-sum
groups, routed_scaling_factor) and one shared expert."""
from __future__ import annotations

from typing import Any

from cluster.config import ModelConfig
from cluster.families.base import QWEN_STYLE_TENSORS, Family, common_fields, require
from cluster.families.deepseek import MOE_TENSORS, first_dense_layers

TENSORS = {**{k: v for k, v in QWEN_STYLE_TENSORS.items() if not k.startswith("shared_")}, **MOE_TENSORS}


def parse_config(cfg: dict[str, Any]) -> ModelConfig:
    base = common_fields(cfg, default_partial=0.5)
    moe_inter = int(require(cfg, "moe_intermediate_size"))
    return ModelConfig(
        **base,
        qkv_bias=bool(cfg.get("attention_bias", False)),
        qk_norm="head" if cfg.get("use_qk_norm") else "none",
        num_experts=int(require(cfg, "n_routed_experts", "num_local_experts")),
        top_k=int(require(cfg, "num_experts_per_tok")),
        expert_intermediate_size=moe_inter,
        norm_topk_prob=bool(cfg.get("norm_topk_prob", True)),
        moe_layers=first_dense_layers(cfg, base["num_layers"]),
        gate_fp32=True,
        dense_intermediate_size=int(require(cfg, "intermediate_size")),
        shared_expert_intermediate_size=moe_inter * int(cfg.get("n_shared_experts") or 0),
        scoring="sigmoid",
        n_group=int(cfg.get("n_group") or 1),
        topk_group=int(cfg.get("topk_group") or 1),
        group_score="top2_sum",
        routed_scaling_factor=float(cfg.get("routed_scaling_factor") or 1.0),
    )


FAMILY = Family("glm4_moe", parse_config, TENSORS)
