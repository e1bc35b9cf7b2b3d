"""Granite-3.x MoE: Llama-style attention whose softmax scale is attention_multiplier, inputs
scaled by embedding_multiplier, every residual branch by residual_multiplier, logits divided by
logits_scaling; top-k logits softmaxed; experts stored fused per layer ([E, 2I, D] gate then up,
[E, D, I] down)."""
from __future__ import annotations

from typing import Any

from cluster.config import ModelConfig
from cluster.families.base import QWEN_STYLE_TENSORS, ExpertLayout, Family, common_fields, require

_MOE = "model.layers.{layer}.block_sparse_moe."
TENSORS = {
    **{k: v for k, v in QWEN_STYLE_TENSORS.items() if not k.startswith(("gate", "expert_", "shared_", "dense_"))},
    "o_bias": "model.layers.{layer}.self_attn.o_proj.bias",
    "gate": _MOE + "router.layer.weight",
    "expert_gate_up": _MOE + "input_linear.weight",
    "expert_down": _MOE + "output_linear.weight",
}


def parse_config(cfg: dict[str, Any]) -> ModelConfig:
    base = common_fields(cfg)
    bias = bool(cfg.get("attention_bias", False))
    return ModelConfig(
        **base,
        qkv_bias=bias,
        o_bias=bias,
        attn_scale=float(cfg.get("attention_multiplier", 1.0)),
        embedding_multiplier=float(cfg.get("embedding_multiplier", 1.0)),
        residual_multiplier=float(cfg.get("residual_multiplier", 1.0)),
        logits_scaling=float(cfg.get("logits_scaling", 1.0)),
        num_experts=int(require(cfg, "num_local_experts")),
        top_k=int(require(cfg, "num_experts_per_tok")),
        expert_intermediate_size=int(require(cfg, "intermediate_size")),
        moe_layers=(True,) * base["num_layers"],
        scoring="topk_softmax",
    )


FAMILY = Family("granitemoe", parse_config, TENSORS, ExpertLayout(fused=True))
