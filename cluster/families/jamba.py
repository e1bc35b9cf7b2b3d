"""Jamba (AI21 Jamba 1.5 / 1.6 / 1.7 Mini and Large): Mamba-1 layers with attention every attn_layer_period-th
layer (at attn_layer_offset; no rotary), and a MoE block every expert_layer_period-th layer (at
expert_layer_offset) where the other layers have a dense gated MLP. Routing: top-k of the softmax over all
experts, the chosen weights not renormalised. Experts stored one tensor per expert and projection."""
from __future__ import annotations

import math
from typing import Any

from cluster.config import ModelConfig
from cluster.families.base import QWEN_STYLE_TENSORS, Family, common_fields, refuse_if, require

_LAYER = "model.layers.{layer}."
_FFN = _LAYER + "feed_forward."
_MAMBA = _LAYER + "mamba."
TENSORS = {
    **{k: v for k, v in QWEN_STYLE_TENSORS.items()
       if not k.endswith(("_bias", "_norm")) and not k.startswith(("gate", "expert_", "shared_", "dense_"))},
    "final_norm": "model.final_layernorm.weight",
    "attn_norm": _LAYER + "input_layernorm.weight",
    "mlp_norm": _LAYER + "pre_ff_layernorm.weight",
    "gate": _FFN + "router.weight",
    "expert_gate": _FFN + "experts.{expert_id}.gate_proj.weight",
    "expert_up": _FFN + "experts.{expert_id}.up_proj.weight",
    "expert_down": _FFN + "experts.{expert_id}.down_proj.weight",
    "dense_gate": _FFN + "gate_proj.weight",
    "dense_up": _FFN + "up_proj.weight",
    "dense_down": _FFN + "down_proj.weight",
    "ssm_in": _MAMBA + "in_proj.weight",
    "ssm_conv": _MAMBA + "conv1d.weight",
    "ssm_conv_bias": _MAMBA + "conv1d.bias",
    "ssm_x_proj": _MAMBA + "x_proj.weight",
    "ssm_dt_norm": _MAMBA + "dt_layernorm.weight",
    "ssm_b_norm": _MAMBA + "b_layernorm.weight",
    "ssm_c_norm": _MAMBA + "c_layernorm.weight",
    "ssm_dt_proj": _MAMBA + "dt_proj.weight",
    "ssm_dt_bias": _MAMBA + "dt_proj.bias",
    "ssm_a_log": _MAMBA + "A_log",
    "ssm_d": _MAMBA + "D",
    "ssm_out": _MAMBA + "out_proj.weight",
}


def _every(cfg: dict[str, Any], what: str, default_period: int, default_offset: int, n: int) -> tuple[bool, ...]:
    period, offset = int(cfg.get(f"{what}_layer_period", default_period)), int(cfg.get(f"{what}_layer_offset",
                                                                                     default_offset))
    refuse_if(not 0 <= offset < period, f"{what}_layer_offset", f"{offset}: must be below {what}_layer_period {period}")
    return tuple(layer % period == offset for layer in range(n))


def parse_config(cfg: dict[str, Any]) -> ModelConfig:
    refuse_if(bool(cfg.get("mamba_proj_bias")), "mamba_proj_bias", "true: not implemented")
    refuse_if(bool(cfg.get("sliding_window")), "sliding_window", "Jamba's attention attends in full")
    base = common_fields(cfg)
    n, hidden = base["num_layers"], base["hidden_size"]
    experts = int(require(cfg, "num_experts"))
    refuse_if(experts < 2, "num_experts", f"{experts}: a Jamba without experts is a dense model")
    rank = cfg.get("mamba_dt_rank", "auto")
    kernel = int(cfg.get("mamba_d_conv", 4))
    refuse_if(kernel < 2, "mamba_d_conv", f"{kernel}: the convolution state needs a kernel of at least 2")
    attention = _every(cfg, "attn", 8, 4, n)
    return ModelConfig(
        **base,
        rope_layers=(False,) * n,  # Jamba's attention has no positions: the Mamba layers carry them
        linear_layers=tuple(not a for a in attention),
        linear_kind="mamba",
        linear_conv_kernel=kernel,
        ssm_inner=int(cfg.get("mamba_expand", 2)) * hidden,
        ssm_state_size=int(cfg.get("mamba_d_state", 16)),
        ssm_dt_rank=math.ceil(hidden / 16) if rank == "auto" else int(rank),
        num_experts=experts,
        top_k=int(require(cfg, "num_experts_per_tok")),
        expert_intermediate_size=int(require(cfg, "intermediate_size")),
        dense_intermediate_size=int(require(cfg, "intermediate_size")),
        moe_layers=_every(cfg, "expert", 2, 1, n),
        norm_topk_prob=False,
    )


FAMILY = Family("jamba", parse_config, TENSORS)
