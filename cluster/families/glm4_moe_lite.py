"""GLM-4.7-Flash (`glm4_moe_lite`): DeepSeek-V3's multi-head latent attention and gating (sigmoid,
selection bias, noaux_tc groups, a shared expert) under GLM's name, with the MoE/dense pattern
given per layer by `mlp_layer_types` when config.json has it (first_k_dense_replace otherwise)."""
from __future__ import annotations

from dataclasses import replace
from typing import Any

from cluster.config import ModelConfig
from cluster.families.base import Family, refuse_if
from cluster.families.deepseek import TENSORS, parse_v3


def moe_layer_types(cfg: dict[str, Any], parsed: ModelConfig) -> ModelConfig:
    """transformers' `mlp_layer_types` ("dense" / "sparse" per layer) overrides first_k_dense_replace."""
    types = cfg.get("mlp_layer_types")
    if types is None:
        return parsed
    refuse_if(len(types) != parsed.num_layers or not set(types) <= {"dense", "sparse"}, "mlp_layer_types",
              f"{types!r}: one of 'dense' / 'sparse' per layer")
    return replace(parsed, moe_layers=tuple(t == "sparse" for t in types))


def parse_config(cfg: dict[str, Any]) -> ModelConfig:
    return moe_layer_types(cfg, parse_v3(cfg))


FAMILY = Family("glm4_moe_lite", parse_config, TENSORS)
