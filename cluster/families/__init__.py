"""Model families: a family maps a Hugging Face config.json to ModelConfig and
names every checkpoint tensor in one table."""
from __future__ import annotations

from cluster.families import (dbrx, deepseek, deepseek_dsa, deepseek_v4, gemma4, glm4_moe, glm4_moe_lite, gpt_oss,
                              granitemoe, granitemoehybrid, jamba, llama4, minimax_m2, mixtral, nemotron_h, olmoe,
                              phimoe, qwen2_moe, qwen3_moe, qwen3_next)
from cluster.families.base import Family, UnsupportedModelError
from cluster.families.wrappers import relocate, text_config

FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    mixtral.FAMILY, qwen2_moe.FAMILY, qwen3_moe.FAMILY, olmoe.FAMILY, deepseek.V2, deepseek.V3, deepseek.KIMI_K2,
    glm4_moe.FAMILY, glm4_moe_lite.FAMILY, deepseek_dsa.V32, deepseek_dsa.GLM_DSA, gpt_oss.FAMILY, phimoe.FAMILY,
    granitemoe.FAMILY, minimax_m2.FAMILY, dbrx.FAMILY, llama4.FAMILY, deepseek_v4.FAMILY, qwen3_next.FAMILY,
    qwen3_next.QWEN3_5_MOE, gemma4.FAMILY, nemotron_h.FAMILY, granitemoehybrid.FAMILY, jamba.FAMILY)}


def get_family(model_type: str | None) -> Family:
    if model_type not in FAMILIES:
        known = ", ".join(sorted(FAMILIES))
        raise UnsupportedModelError(f"unsupported model_type {model_type!r} in config.json (supported: {known})")
    return FAMILIES[model_type]


def resolve(config: dict) -> tuple[Family, dict]:
    """The family of a config.json and the config it parses: the text model's, for a multimodal wrapper."""
    text = text_config(config)
    return get_family(text.get("model_type")), text


__all__ = ["FAMILIES", "Family", "UnsupportedModelError", "get_family", "relocate", "resolve"]
