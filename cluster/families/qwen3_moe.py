"""Qwen3-MoE: per-head RMSNorm on q and k, no shared expert."""
from __future__ import annotations

from typing import Any

from cluster.config import ModelConfig
from cluster.families.base import QWEN_STYLE_TENSORS, Family, common_fields, qwen_moe_fields


def parse_config(cfg: dict[str, Any]) -> ModelConfig:
    base = common_fields(cfg)
    return ModelConfig(
        **base,
        **qwen_moe_fields(cfg, base["num_layers"]),
        qkv_bias=bool(cfg.get("attention_bias", False)),
        qk_norm="head",
    )


FAMILY = Family("qwen3_moe", parse_config, dict(QWEN_STYLE_TENSORS))
