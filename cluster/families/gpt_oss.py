"""gpt-oss: attention with biases and learned sinks, a sliding window on alternate layers
(layer_types), YaRN, a router with a bias whose top-k logits are softmaxed, and experts stored
fused and transposed ([E, in, out], gate/up interleaved) with biases and a clamped SwiGLU
((up + 1) * gate * sigmoid(alpha * gate)). Released as MXFP4 experts (see cluster.quant).
Norm weights stay fp32, as transformers keeps them."""
from __future__ import annotations

from typing import Any

from cluster.config import ModelConfig
from cluster.families.base import (QWEN_STYLE_TENSORS, ExpertLayout, Family, common_fields, require,
                                   sliding_windows)
from cluster.model.weights import ExpertActivation

_ATTN, _MLP = "model.layers.{layer}.self_attn.", "model.layers.{layer}.mlp."
TENSORS = {
    **{k: v for k, v in QWEN_STYLE_TENSORS.items()
       if not k.startswith(("gate", "expert_", "shared_", "dense_", "q_norm", "k_norm"))},
    "o_bias": _ATTN + "o_proj.bias",
    "sinks": _ATTN + "sinks",
    "gate": _MLP + "router.weight",
    "gate_logits_bias": _MLP + "router.bias",
    "expert_gate_up": _MLP + "experts.gate_up_proj",
    "expert_gate_up_bias": _MLP + "experts.gate_up_proj_bias",
    "expert_down": _MLP + "experts.down_proj",
    "expert_down_bias": _MLP + "experts.down_proj_bias",
}
# transformers' GptOssConfig default when config.json names no rope scaling.
_DEFAULT_ROPE = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                 "original_max_position_embeddings": 4096}


def parse_config(cfg: dict[str, Any]) -> ModelConfig:
    if not (cfg.get("rope_scaling") or cfg.get("rope_parameters")):
        cfg = {**cfg, "rope_scaling": _DEFAULT_ROPE}
    base = common_fields(cfg, default_theta=150000.0)
    bias = bool(cfg.get("attention_bias", True))
    return ModelConfig(
        **base,
        qkv_bias=bias,
        o_bias=bias,
        attn_sinks=True,
        sliding_windows=sliding_windows(cfg, base["num_layers"], lambda layer: (layer + 1) % 2 == 1),
        norm_fp32=True,
        num_experts=int(require(cfg, "num_local_experts", "num_experts")),
        top_k=int(require(cfg, "num_experts_per_tok", "experts_per_token")),
        expert_intermediate_size=int(require(cfg, "intermediate_size")),
        expert_bias=True,
        expert_activation=ExpertActivation("clamped_swiglu", float(cfg.get("swiglu_alpha", 1.702)),
                                           float(cfg.get("swiglu_limit", 7.0))),
        moe_layers=(True,) * base["num_layers"],
        gate_logits_bias=True,
        scoring="topk_softmax",
    )


FAMILY = Family("gpt_oss", parse_config, TENSORS, ExpertLayout(fused=True, transposed=True, interleaved=True))
