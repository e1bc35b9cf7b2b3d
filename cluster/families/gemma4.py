"""Gemma 4 MoE (gemma-4-26B-A4B), served as a text model from its multimodal release (`gemma4`, whose
text_config is `gemma4_text`; weights under model.language_model.*, the vision tower never read).

Every layer runs a dense GELU-tanh MLP and 128 routed experts in parallel, each branch with its own
norms (cluster.model.parallel); the router scores the weightless-RMS-normed residual times `scale`
and 1/sqrt(hidden), softmaxes over all experts, renormalises the top-k and multiplies each chosen
weight by its `per_expert_scale`. Experts are fused ([E, 2I, D] gate rows then up, [E, D, I] down).
Attention: q, k RMS-normed per head, v RMS-normed without a weight, softmax scale 1. Sliding layers
(layer_types) use head_dim, num_key_value_heads and default rope; full layers global_head_dim,
num_global_key_value_heads, proportional rope, and with attention_k_eq_v take v from k's projection.
Embeddings scaled by sqrt(hidden), tied LM head, logits soft-capped, each layer's output times
layer_scalar. Refused: per-layer input embeddings (the E2B/E4B models), KV sharing across layers,
bidirectional attention over all tokens, and a config without the MoE block (the dense 31B)."""
from __future__ import annotations

from typing import Any

from cluster.config import ModelConfig
from cluster.families.base import (QWEN_STYLE_TENSORS, ExpertLayout, Family, common_fields, refuse_if, require,
                                   sliding_windows)
from cluster.families.rope_config import parse_rope
from cluster.model.weights import ExpertActivation

_L = "model.layers.{layer}."
TENSORS = {
    **{k: v for k, v in QWEN_STYLE_TENSORS.items()
       if not k.startswith(("gate", "expert_", "shared_", "q_bias", "k_bias", "v_bias"))},
    "mlp_norm": _L + "pre_feedforward_layernorm.weight",
    "post_attn_norm": _L + "post_attention_layernorm.weight",
    "dense_out_norm": _L + "post_feedforward_layernorm_1.weight",
    "moe_in_norm": _L + "pre_feedforward_layernorm_2.weight",
    "moe_out_norm": _L + "post_feedforward_layernorm_2.weight",
    "post_mlp_norm": _L + "post_feedforward_layernorm.weight",
    "layer_scalar": _L + "layer_scalar",
    "gate": _L + "router.proj.weight",
    "router_scale": _L + "router.scale",
    "expert_scale": _L + "router.per_expert_scale",
    "expert_gate_up": _L + "experts.gate_up_proj",
    "expert_down": _L + "experts.down_proj",
}
GELU_TANH = ExpertActivation("gelu_tanh")
_KINDS = ("sliding_attention", "full_attention")


def _refusals(cfg: dict[str, Any]) -> None:
    act = cfg.get("hidden_activation", "gelu_pytorch_tanh")
    refuse_if(act not in ("gelu_pytorch_tanh", "gelu_tanh"), "hidden_activation", f"{act!r}: only gelu_pytorch_tanh")
    refuse_if(not cfg.get("enable_moe_block"), "enable_moe_block", "false: a dense Gemma 4 has no experts to serve")
    refuse_if(bool(cfg.get("hidden_size_per_layer_input")), "hidden_size_per_layer_input",
              "per-layer input embeddings (Gemma 4 E2B/E4B) are not implemented")
    refuse_if(bool(cfg.get("num_kv_shared_layers")), "num_kv_shared_layers", "layers reusing another layer's KV")
    refuse_if(bool(cfg.get("use_double_wide_mlp")), "use_double_wide_mlp", "only with KV-shared layers")
    refuse_if(cfg.get("use_bidirectional_attention") == "all", "use_bidirectional_attention",
              "'all': bidirectional attention over text ('vision' is causal for text-only requests)")
    refuse_if(bool(cfg.get("attention_bias")), "attention_bias", "true: not in the released Gemma 4")


def _ropes(cfg: dict[str, Any], types: list[str], dims: dict[str, int]) -> dict:
    """Each layer type's rope, from rope_parameters keyed by layer type (transformers' defaults when absent)."""
    params = cfg.get("rope_parameters") or {
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1000000.0}}
    missing = sorted(set(types) - set(params))
    refuse_if(bool(missing), "rope_parameters", f"no entry for layer type {missing[0] if missing else ''!r}")
    plain = {k: v for k, v in cfg.items() if k not in ("rope_parameters", "rope_scaling", "partial_rotary_factor")}
    return {kind: parse_rope({**plain, "rope_parameters": params[kind]}, dims[kind]) for kind in set(types)}


def parse_config(cfg: dict[str, Any]) -> ModelConfig:
    _refusals(cfg)
    n = int(require(cfg, "num_hidden_layers"))
    types = list(cfg.get("layer_types") or ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(n)])
    types[-1] = "full_attention"  # transformers forces the last layer to full attention
    odd = sorted(set(types) - set(_KINDS))
    refuse_if(bool(odd), "layer_types", f"layer type {odd[0] if odd else ''!r}: only sliding/full attention")
    dims = {"sliding_attention": int(require(cfg, "head_dim")),
            "full_attention": int(cfg.get("global_head_dim") or 512)}
    kv = int(require(cfg, "num_key_value_heads"))
    k_eq_v = bool(cfg.get("attention_k_eq_v", False))
    heads = {"sliding_attention": kv,
             "full_attention": int(cfg.get("num_global_key_value_heads") or kv) if k_eq_v else kv}
    ropes = _ropes(cfg, types, dims)
    plain = {k: v for k, v in cfg.items() if k not in ("final_logit_softcapping", "rope_parameters", "layer_types")}
    base = common_fields({**plain, "rope_parameters": {"rope_type": "default"}})
    hidden = base["hidden_size"]
    full = [t == "full_attention" for t in types]
    return ModelConfig(
        **{**base, "rope": ropes[types[0]]},
        norm_fp32=True,  # Gemma's RMSNorm scales in fp32, then casts
        qk_norm="head",
        v_norm=True,
        attn_scale=1.0,
        sliding_windows=sliding_windows({**cfg, "layer_types": types}, n, lambda layer: False),
        layer_head_dims=tuple(dims[t] for t in types),
        layer_kv_heads=tuple(heads[t] for t in types),
        layer_ropes=tuple(ropes[t] for t in types),
        value_from_key=tuple(f and k_eq_v for f in full),
        embedding_multiplier=hidden ** 0.5,
        final_logit_softcapping=float(cfg["final_logit_softcapping"]) if cfg.get("final_logit_softcapping") else None,
        num_experts=int(require(cfg, "num_experts")),
        top_k=int(require(cfg, "top_k_experts")),
        expert_intermediate_size=int(require(cfg, "moe_intermediate_size")),
        expert_activation=GELU_TANH,
        norm_topk_prob=True,
        moe_layers=(True,) * n,
        parallel_dense=True,
        dense_intermediate_size=int(require(cfg, "intermediate_size")),
        dense_activation=GELU_TANH,
    )


FAMILY = Family("gemma4_text", parse_config, TENSORS, ExpertLayout(fused=True))
