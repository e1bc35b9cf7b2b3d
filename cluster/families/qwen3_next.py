"""Qwen3-Next: three of every four layers are gated DeltaNet linear attention (a recurrent state per
sequence, no KV cache), the fourth gated full attention (q_proj also yields a sigmoid gate on the
output; per-head q/k RMSNorm; rotary on the first quarter of each head). Every RMSNorm but the
DeltaNet's gated one stores w and applies (1 + w). MoE layers: softmax top-k of many small experts
plus a shared expert behind a sigmoid gate. The layer pattern is config.json's layer_types, else
every full_attention_interval-th layer attends (transformers' rule).

Qwen3.5 / Qwen3.6 MoE (`qwen3_5_moe`, served through the multimodal wrapper: text_config's
`qwen3_5_moe_text`, weights under model.language_model.*, the vision tower never read): the same
layers with the DeltaNet's projections stored apart (in_proj_qkv / z / b / a), every layer MoE with
normalised top-k weights, and M-RoPE, which for text alone (the three position streams all equal the
token's position) is plain rotary: mrope_section only says which stream each frequency reads."""
from __future__ import annotations

from dataclasses import replace
from typing import Any

from cluster.config import ModelConfig
from cluster.families.base import QWEN_STYLE_TENSORS, Family, common_fields, qwen_moe_fields, refuse_if, require

_LINEAR = "model.layers.{layer}.linear_attn."
TENSORS = {
    **{k: v for k, v in QWEN_STYLE_TENSORS.items() if not k.endswith("_bias")},
    "linear_qkvz": _LINEAR + "in_proj_qkvz.weight",  # Qwen3-Next: fused, grouped per key head
    "linear_ba": _LINEAR + "in_proj_ba.weight",
    "linear_qkv": _LINEAR + "in_proj_qkv.weight",  # Qwen3.5 / 3.6: one projection each
    "linear_z": _LINEAR + "in_proj_z.weight",
    "linear_b": _LINEAR + "in_proj_b.weight",
    "linear_a": _LINEAR + "in_proj_a.weight",
    "linear_conv": _LINEAR + "conv1d.weight",
    "linear_a_log": _LINEAR + "A_log",
    "linear_dt_bias": _LINEAR + "dt_bias",
    "linear_norm": _LINEAR + "norm.weight",
    "linear_out": _LINEAR + "out_proj.weight",
}
_KINDS = {"linear_attention", "full_attention"}


def linear_layers(cfg: dict[str, Any], num_layers: int) -> tuple[bool, ...]:
    types = cfg.get("layer_types")
    if types is None:
        interval = int(cfg.get("full_attention_interval", 4))
        return tuple((layer + 1) % interval != 0 for layer in range(num_layers))
    odd = sorted(set(types) - _KINDS)
    refuse_if(bool(odd), "layer_types", f"layer type {odd[0] if odd else ''!r}: only linear_attention/full_attention")
    refuse_if(len(types) != num_layers, "layer_types", f"{len(types)} entries for {num_layers} layers")
    return tuple(t == "linear_attention" for t in types)


def parse_config(cfg: dict[str, Any]) -> ModelConfig:
    refuse_if(bool(cfg.get("attention_bias")), "attention_bias", "true: Qwen3-Next's projections have no biases")
    refuse_if(bool(cfg.get("use_sliding_window")), "use_sliding_window", "true: Qwen3-Next attends in full")
    base = common_fields(cfg, default_partial=0.25)
    n = base["num_layers"]
    kernel = int(cfg.get("linear_conv_kernel_dim", 4))
    refuse_if(kernel < 2, "linear_conv_kernel_dim", f"{kernel}: the convolution state needs a kernel of at least 2")
    hk, hv = int(require(cfg, "linear_num_key_heads")), int(require(cfg, "linear_num_value_heads"))
    refuse_if(hv % hk != 0, "linear_num_value_heads", f"{hv} is not a multiple of linear_num_key_heads {hk}")
    shared = int(cfg.get("shared_expert_intermediate_size") or 0)
    return ModelConfig(
        **base,
        **qwen_moe_fields(cfg, n),
        qk_norm="head",
        norm_fp32=True,  # (1 + w) is applied in fp32, as transformers does
        norm_unit_offset=True,
        attn_output_gate=True,
        shared_expert_intermediate_size=shared,
        shared_expert_gate=bool(shared),
        linear_layers=linear_layers(cfg, n),
        linear_num_key_heads=hk,
        linear_num_value_heads=hv,
        linear_key_head_dim=int(require(cfg, "linear_key_head_dim")),
        linear_value_head_dim=int(require(cfg, "linear_value_head_dim")),
        linear_conv_kernel=kernel,
    )


FAMILY = Family("qwen3_next", parse_config, TENSORS)

def parse_qwen3_5(cfg: dict[str, Any]) -> ModelConfig:
    refuse_if(cfg.get("attn_output_gate") is False, "attn_output_gate", "false: transformers' Qwen3.5 always gates")
    # transformers' Qwen3.5 reads no mlp_only_layers / decoder_sparse_step: every layer is MoE
    parsed = parse_config({k: v for k, v in cfg.items() if k not in ("mlp_only_layers", "decoder_sparse_step")})
    return replace(parsed, norm_topk_prob=True, moe_layers=(True,) * parsed.num_layers)


QWEN3_5_MOE = Family("qwen3_5_moe_text", parse_qwen3_5, TENSORS)
