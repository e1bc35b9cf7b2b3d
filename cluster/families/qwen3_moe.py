"""Qwen3-MoE: per-head RMSNorm on q and k, no shared expert; `use_sliding_window` slides every layer."""
from __future__ import annotations

from typing import Any

from cluster.config import ModelConfig
from cluster.families.base import (QWEN_STYLE_TENSORS, Family, common_fields, qwen_moe_fields, sliding_windows)

TENSORS = {**QWEN_STYLE_TENSORS, "o_bias": "model.layers.{layer}.self_attn.o_proj.bias"}


def parse_config(cfg: dict[str, Any]) -> ModelConfig:
    base = common_fields(cfg)
    bias = bool(cfg.get("attention_bias", False))
    windows = sliding_windows(cfg, base["num_layers"], lambda layer: True) if cfg.get("use_sliding_window") else ()
    return ModelConfig(
        **base,
        **qwen_moe_fields(cfg, base["num_layers"]),
        qkv_bias=bias,
        o_bias=bias,
        qk_norm="head",
        sliding_windows=windows,
    )


FAMILY = Family("qwen3_moe", parse_config, TENSORS)
