"""Qwen2-MoE: q/k/v bias, a shared expert with a sigmoid gate, optional dense layers."""
from __future__ import annotations

from typing import Any

from cluster.config import ModelConfig
from cluster.families.base import QWEN_STYLE_TENSORS, Family, common_fields, require, sparse_layers


def parse_config(cfg: dict[str, Any]) -> ModelConfig:
    base = common_fields(cfg)
    return ModelConfig(
        **base,
        qkv_bias=bool(cfg.get("qkv_bias", True)),
        num_experts=int(require(cfg, "num_experts", "num_local_experts")),
        top_k=int(require(cfg, "num_experts_per_tok")),
        expert_intermediate_size=int(require(cfg, "moe_intermediate_size")),
        norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
        moe_layers=sparse_layers(cfg, base["num_layers"]),
        dense_intermediate_size=int(cfg.get("intermediate_size") or 0),
        shared_expert_intermediate_size=int(cfg.get("shared_expert_intermediate_size") or 0),
        shared_expert_gate=bool(cfg.get("shared_expert_intermediate_size")),
    )


FAMILY = Family("qwen2_moe", parse_config, dict(QWEN_STYLE_TENSORS))
