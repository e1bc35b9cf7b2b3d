"""Qwen2-MoE: q/k/v bias, a shared expert with a sigmoid gate, optional dense layers.
With `use_sliding_window`, the sliding layers are those transformers picks (layer_types, or
every other layer below max_window_layers)."""
from __future__ import annotations

from typing import Any

from cluster.config import ModelConfig
from cluster.families.base import QWEN_STYLE_TENSORS, Family, common_fields, qwen_moe_fields, sliding_windows


def _windows(cfg: dict[str, Any], num_layers: int) -> tuple:
    if not cfg.get("use_sliding_window"):
        return ()
    below = int(cfg.get("max_window_layers", 28))
    return sliding_windows(cfg, num_layers, lambda layer: (layer + 1) % 2 == 1 and layer < below)


def parse_config(cfg: dict[str, Any]) -> ModelConfig:
    base = common_fields(cfg)
    return ModelConfig(
        **base,
        **qwen_moe_fields(cfg, base["num_layers"]),
        qkv_bias=bool(cfg.get("qkv_bias", True)),
        shared_expert_intermediate_size=int(cfg.get("shared_expert_intermediate_size") or 0),
        shared_expert_gate=bool(cfg.get("shared_expert_intermediate_size")),
        sliding_windows=_windows(cfg, base["num_layers"]),
    )


FAMILY = Family("qwen2_moe", parse_config, dict(QWEN_STYLE_TENSORS))
