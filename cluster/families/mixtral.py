"""Mixtral: every layer MoE, softmax → top-k → always renormalised; `sliding_window`, when set,
applies to every layer."""
from __future__ import annotations

from typing import Any

from cluster.config import ModelConfig
from cluster.families.base import QWEN_STYLE_TENSORS, Family, common_fields, require, sliding_windows

TENSORS = {
    **{k: v for k, v in QWEN_STYLE_TENSORS.items() if not k.startswith(("gate", "expert_", "shared_", "dense_"))},
    "gate": "model.layers.{layer}.block_sparse_moe.gate.weight",
    "expert_gate": "model.layers.{layer}.block_sparse_moe.experts.{expert_id}.w1.weight",
    "expert_down": "model.layers.{layer}.block_sparse_moe.experts.{expert_id}.w2.weight",
    "expert_up": "model.layers.{layer}.block_sparse_moe.experts.{expert_id}.w3.weight",
}


def parse_config(cfg: dict[str, Any]) -> ModelConfig:
    base = common_fields(cfg)
    return ModelConfig(
        **base,
        num_experts=int(require(cfg, "num_local_experts", "num_experts")),
        top_k=int(require(cfg, "num_experts_per_tok")),
        expert_intermediate_size=int(require(cfg, "intermediate_size")),
        norm_topk_prob=True,
        moe_layers=(True,) * base["num_layers"],
        sliding_windows=sliding_windows(cfg, base["num_layers"], lambda layer: True),
    )


FAMILY = Family("mixtral", parse_config, TENSORS)
