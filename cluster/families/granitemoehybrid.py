"""Granite 4.0-H (`granitemoehybrid`): Granite's MoE layers (top-k logits softmaxed, experts fused per layer,
the embedding / residual / attention / logits multipliers) beside a shared MLP on every layer, under a
mixer that is Mamba-2 or attention per `layer_types` ("mamba" / "attention", or transformers 5's
"linear_attention" / "full_attention"). Attention has no rotary unless position_embedding_type is "rope"."""
from __future__ import annotations

from dataclasses import replace
from typing import Any

from cluster.config import ModelConfig
from cluster.families import granitemoe
from cluster.families.base import ExpertLayout, Family, refuse_if, require

_LAYER = "model.layers.{layer}."
TENSORS = {
    **granitemoe.TENSORS,
    "shared_gate_up": _LAYER + "shared_mlp.input_linear.weight",
    "shared_down": _LAYER + "shared_mlp.output_linear.weight",
    "ssm_in": _LAYER + "mamba.in_proj.weight",
    "ssm_conv": _LAYER + "mamba.conv1d.weight",
    "ssm_conv_bias": _LAYER + "mamba.conv1d.bias",
    "ssm_a_log": _LAYER + "mamba.A_log",
    "ssm_dt_bias": _LAYER + "mamba.dt_bias",
    "ssm_d": _LAYER + "mamba.D",
    "ssm_norm": _LAYER + "mamba.norm.weight",
    "ssm_out": _LAYER + "mamba.out_proj.weight",
}
_LINEAR, _ATTENTION = {"mamba", "linear_attention"}, {"attention", "full_attention"}


def linear_layers(cfg: dict[str, Any], num_layers: int) -> tuple[bool, ...]:
    types = cfg.get("layer_types") or ["mamba"] * num_layers  # transformers' default: every layer Mamba
    odd = sorted(set(types) - _LINEAR - _ATTENTION)
    refuse_if(bool(odd), "layer_types", f"layer type {odd[0] if odd else ''!r}: only mamba / attention")
    refuse_if(len(types) != num_layers, "layer_types", f"{len(types)} entries for {num_layers} layers")
    return tuple(t in _LINEAR for t in types)


def _mamba_fields(cfg: dict[str, Any], hidden: int) -> dict[str, Any]:
    heads, inner = int(cfg.get("mamba_n_heads", 128)), int(cfg.get("mamba_expand", 2)) * hidden
    head_dim = cfg.get("mamba_d_head", "auto")
    head_dim = inner // heads if head_dim == "auto" else int(head_dim)
    refuse_if(head_dim * heads != inner, "mamba_d_head", f"{head_dim} x {heads} heads != mamba_expand x hidden_size")
    groups = int(cfg.get("mamba_n_groups", 1))
    refuse_if(heads % groups != 0, "mamba_n_groups", f"{groups} does not divide mamba_n_heads {heads}")
    kernel = int(cfg.get("mamba_d_conv", 4))
    refuse_if(kernel < 2, "mamba_d_conv", f"{kernel}: the convolution state needs a kernel of at least 2")
    low, high = cfg.get("time_step_limit") or (0.0, float("inf"))
    return dict(linear_kind="mamba2", linear_conv_kernel=kernel, ssm_heads=heads, ssm_head_dim=head_dim,
                ssm_groups=groups, ssm_state_size=int(cfg.get("mamba_d_state", 256)),
                ssm_chunk=int(cfg.get("mamba_chunk_size", 256)), ssm_dt_min=float(low),
                ssm_dt_max=float(high) if isinstance(high, (int, float)) else float("inf"))  # saved inf: a dict


def parse_config(cfg: dict[str, Any]) -> ModelConfig:
    refuse_if(bool(cfg.get("mamba_proj_bias")), "mamba_proj_bias", "true: not implemented")
    refuse_if(not cfg.get("num_local_experts"), "num_local_experts",
              "0: a dense Granite 4.0-H model has no experts for the workers (serve it with a dense engine)")
    parsed = granitemoe.parse_config(cfg)
    n = parsed.num_layers
    return replace(
        parsed,
        shared_expert_intermediate_size=int(require(cfg, "shared_intermediate_size")),
        rope_layers=(cfg.get("position_embedding_type") == "rope",) * n,
        linear_layers=linear_layers(cfg, n),
        **_mamba_fields(cfg, parsed.hidden_size),
    )


FAMILY = Family("granitemoehybrid", parse_config, TENSORS, ExpertLayout(fused=True))
