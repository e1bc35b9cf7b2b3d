"""Qwen3-MoE: per-head RMSNorm on q and k, no shared expert."""
from __future__ import annotations

from typing import Any

from cluster.config import ModelConfig
from cluster.families.base import QWEN_STYLE_TENSORS, Family, common_fields, require, sparse_layers


def parse_config(cfg: dict[str, Any]) -> ModelConfig:
    base = common_fields(cfg)
    return ModelConfig(
        **base,
        qkv_bias=bool(cfg.get("attention_bias", False)),
        qk_norm="head",
        num_experts=int(require(cfg, "num_experts", "num_local_experts")),
        top_k=int(require(cfg, "num_experts_per_tok")),
        expert_intermediate_size=int(require(cfg, "moe_intermediate_size")),
        norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
        moe_layers=sparse_layers(cfg, base["num_layers"]),
        dense_intermediate_size=int(cfg.get("intermediate_size") or 0),
    )


FAMILY = Family("qwen3_moe", parse_config, dict(QWEN_STYLE_TENSORS))
