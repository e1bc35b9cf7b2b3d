"""Phi-3.5-MoE: LayerNorms with biases (eps from rms_norm_eps), attention and LM-head biases,
LongRoPE with short/long mscale, and sparsemixer top-2 routing (the best expert, then the best
of the rest, each weighted by a softmax over the logits within router_jitter_noise of it)."""
from __future__ import annotations

from typing import Any

from cluster.config import ModelConfig
from cluster.families.base import Family, common_fields, refuse_if, require, sliding_windows
from cluster.families.mixtral import TENSORS as MIXTRAL_TENSORS

_LAYER = "model.layers.{layer}."
TENSORS = {
    **MIXTRAL_TENSORS,
    "o_bias": _LAYER + "self_attn.o_proj.bias",
    "attn_norm_bias": _LAYER + "input_layernorm.bias",
    "mlp_norm_bias": _LAYER + "post_attention_layernorm.bias",
    "final_norm_bias": "model.norm.bias",
    "lm_head_bias": "lm_head.bias",
}


def parse_config(cfg: dict[str, Any]) -> ModelConfig:
    base = common_fields(cfg, default_theta=1000000.0)
    top_k = int(require(cfg, "num_experts_per_tok"))
    refuse_if(top_k != 2, "num_experts_per_tok", f"{top_k}: sparsemixer routing picks exactly 2 experts")
    bias = bool(cfg.get("attention_bias", False))
    return ModelConfig(
        **base,
        norm="layer",
        qkv_bias=bias,
        o_bias=bias,
        lm_head_bias=bool(cfg.get("lm_head_bias", False)),
        sliding_windows=sliding_windows(cfg, base["num_layers"], lambda layer: True),
        num_experts=int(require(cfg, "num_local_experts")),
        top_k=top_k,
        expert_intermediate_size=int(require(cfg, "intermediate_size")),
        moe_layers=(True,) * base["num_layers"],
        scoring="sparsemixer",
        gate_jitter=float(cfg.get("router_jitter_noise", 0.01)),
    )


FAMILY = Family("phimoe", parse_config, TENSORS)
