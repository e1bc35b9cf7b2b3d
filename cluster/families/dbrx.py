"""DBRX: LayerNorms without bias, one fused Wqkv projection clipped to ±clip_qkv, every layer MoE
(softmax → top-k → weights divided by their p-norm, p = moe_normalize_expert_weights), experts
stored as row blocks of three [E * I, D] tensors (w1 gate, v1 up, w2 down transposed).
Its config nests attention and FFN fields in `attn_config` / `ffn_config`."""
from __future__ import annotations

from typing import Any

from cluster.config import ModelConfig
from cluster.families.base import ExpertLayout, Family, common_fields, refuse_if, require

_BLOCK = "transformer.blocks.{layer}."
TENSORS = {
    "embed": "transformer.wte.weight",
    "final_norm": "transformer.norm_f.weight",
    "lm_head": "lm_head.weight",
    "attn_norm": _BLOCK + "norm_attn_norm.norm_1.weight",
    "mlp_norm": _BLOCK + "norm_attn_norm.norm_2.weight",
    "qkv_proj": _BLOCK + "norm_attn_norm.attn.Wqkv.weight",
    "o_proj": _BLOCK + "norm_attn_norm.attn.out_proj.weight",
    "gate": _BLOCK + "ffn.router.layer.weight",
    "expert_gate": _BLOCK + "ffn.experts.mlp.w1",
    "expert_up": _BLOCK + "ffn.experts.mlp.v1",
    "expert_down": _BLOCK + "ffn.experts.mlp.w2",
}


def _flat(cfg: dict[str, Any]) -> dict[str, Any]:
    """The nested DBRX fields under the names common_fields reads."""
    attn, ffn = cfg.get("attn_config") or {}, cfg.get("ffn_config") or {}
    act = (ffn.get("ffn_act_fn") or {"name": "silu"})
    refuse_if(set(act) - {"name"} != set(), "ffn_config.ffn_act_fn", f"{act!r}: arguments not implemented")
    flat = {**cfg, "hidden_size": require(cfg, "d_model"), "num_hidden_layers": require(cfg, "n_layers"),
            "num_attention_heads": require(cfg, "n_heads"), "num_key_value_heads": attn.get("kv_n_heads", 1),
            "max_position_embeddings": cfg.get("max_seq_len", 2048), "hidden_act": act.get("name"),
            "rms_norm_eps": 1e-5}  # nn.LayerNorm's default eps, which DBRX uses
    if "rope_theta" in attn:
        flat["rope_theta"] = attn["rope_theta"]
    return flat


def parse_config(cfg: dict[str, Any]) -> ModelConfig:
    ffn = cfg.get("ffn_config") or {}
    p = ffn.get("moe_normalize_expert_weights", 1.0)
    refuse_if(p not in (None, 1, 1.0), "ffn_config.moe_normalize_expert_weights",
              f"{p!r}: only 1 (weights summing to 1) or null")
    refuse_if(bool(ffn.get("uniform_expert_assignment")), "ffn_config.uniform_expert_assignment",
              "a training-time routing override")
    base = common_fields(_flat(cfg))
    clip = (cfg.get("attn_config") or {}).get("clip_qkv")
    return ModelConfig(
        **base,
        norm="layer",
        norm_bias=False,
        clip_qkv=float(clip) if clip is not None else None,
        num_experts=int(require(ffn, "moe_num_experts")),
        top_k=int(require(ffn, "moe_top_k")),
        expert_intermediate_size=int(require(ffn, "ffn_hidden_size")),
        norm_topk_prob=p is not None,
        moe_layers=(True,) * base["num_layers"],
    )


FAMILY = Family("dbrx", parse_config, TENSORS, ExpertLayout(row_blocks=True))
