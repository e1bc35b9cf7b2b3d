"""OLMoE: RMSNorm over the whole q and k projections, optional clip_qkv."""
from __future__ import annotations

from typing import Any

from cluster.config import ModelConfig
from cluster.families.base import QWEN_STYLE_TENSORS, Family, common_fields, require

TENSORS = {**QWEN_STYLE_TENSORS, "o_bias": "model.layers.{layer}.self_attn.o_proj.bias"}


def parse_config(cfg: dict[str, Any]) -> ModelConfig:
    base = common_fields(cfg)
    clip = cfg.get("clip_qkv")
    bias = bool(cfg.get("attention_bias", False))
    return ModelConfig(
        **base,
        qkv_bias=bias,
        o_bias=bias,
        qk_norm="full",
        clip_qkv=float(clip) if clip is not None else None,
        num_experts=int(require(cfg, "num_experts", "num_local_experts")),
        top_k=int(require(cfg, "num_experts_per_tok")),
        expert_intermediate_size=int(require(cfg, "intermediate_size")),
        norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
        moe_layers=(True,) * base["num_layers"],
    )


FAMILY = Family("olmoe", parse_config, TENSORS)
