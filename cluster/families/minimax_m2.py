"""MiniMax-M2 (M2 … M2.7): grouped-query attention whose q and k are RMS-normalised over the whole
projection, all heads at once (`qk_norm_type: per_layer`), rotary on the first `rotary_dim` features
of each head, every layer MoE with sigmoid scores, the e_score_correction_bias steering the choice
(no groups, weights renormalised), experts stored Mixtral-style (w1 gate, w3 up, w2 down).
Released as FP8 blocks (`fmt: float8_e4m3fn`); the MTP modules it carries are not read."""
from __future__ import annotations

from typing import Any

from cluster.config import ModelConfig
from cluster.families.base import QWEN_STYLE_TENSORS, Family, common_fields, refuse_if, require

_MOE = "model.layers.{layer}.block_sparse_moe."
TENSORS = {
    **{k: v for k, v in QWEN_STYLE_TENSORS.items() if not k.startswith(("gate", "expert_", "shared_", "dense_"))},
    "gate": _MOE + "gate.weight",
    "gate_bias": _MOE + "e_score_correction_bias",
    "expert_gate": _MOE + "experts.{expert_id}.w1.weight",
    "expert_down": _MOE + "experts.{expert_id}.w2.weight",
    "expert_up": _MOE + "experts.{expert_id}.w3.weight",
}


def _refusals(cfg: dict[str, Any]) -> None:
    refuse_if(cfg.get("scoring_func", "sigmoid") != "sigmoid", "scoring_func",
              f"{cfg.get('scoring_func')!r}: MiniMax-M2 routes with sigmoid scores")
    refuse_if(cfg.get("qk_norm_type", "per_layer") != "per_layer", "qk_norm_type",
              f"{cfg.get('qk_norm_type')!r}: only 'per_layer' (one RMSNorm over all heads)")
    refuse_if(cfg.get("use_qk_norm") is False, "use_qk_norm", "false: MiniMax-M2 always normalises q and k")
    refuse_if(bool(cfg.get("shared_intermediate_size")), "shared_intermediate_size",
              f"{cfg.get('shared_intermediate_size')}: MiniMax-M2 has no shared expert")
    odd = sorted(set(cfg.get("attn_type_list") or [1]) - {1})
    refuse_if(bool(odd), "attn_type_list", f"attention type {odd[0] if odd else ''}: only 1 (softmax attention; "
              "0 is MiniMax-01's lightning attention)")


def parse_config(cfg: dict[str, Any]) -> ModelConfig:
    _refusals(cfg)
    head_dim = int(require(cfg, "head_dim"))
    if cfg.get("rotary_dim") and "partial_rotary_factor" not in cfg:  # transformers reads rotary_dim so
        cfg = {**cfg, "partial_rotary_factor": int(cfg["rotary_dim"]) / head_dim}
    base = common_fields(cfg, default_theta=5000000.0, default_partial=1.0)
    return ModelConfig(
        **base,
        qk_norm="full",
        num_experts=int(require(cfg, "num_local_experts")),
        top_k=int(require(cfg, "num_experts_per_tok")),
        expert_intermediate_size=int(require(cfg, "intermediate_size")),
        norm_topk_prob=True,
        moe_layers=(True,) * base["num_layers"],
        scoring="sigmoid",
    )


FAMILY = Family("minimax_m2", parse_config, TENSORS)
