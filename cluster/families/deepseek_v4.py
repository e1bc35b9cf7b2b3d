"""DeepSeek-V4 (Flash, Pro): a new attention and a new residual, DeepSeek-V3-style experts.

Attention: a low-rank query (q_a, normed, q_b, then each head RMS-normed without weight), one K=V head
of head_dim (kv normed), interleaved rotary on the trailing qk_rope_head_dim features, learned sinks,
a sliding window, and per layer a compression ratio (`compress_ratios`, or `layer_types` with
`compress_rates`): 0 attends the window only; the CSA ratio (4) adds compressed entries of overlapping
windows that a lightning indexer selects (index_topk per query); the HCA ratio (128) adds all of them.
Compressed layers rotate with compress_rope_theta and the YaRN rope_scaling (cos/sin unscaled), sliding
ones with rope_theta. The output is un-rotated at the query position, then projected by o_groups
groups to o_lora_rank each, then mixed. The residual is hc_mult streams (hyper-connections).
MoE on every layer: sqrtsoftplus scores, the first num_hash_layers routed by a fixed token id -> experts
table (`tid2eid`), the rest top-k with a selection bias; a shared expert; SwiGLU clamped at swiglu_limit.
Tensor names are the release's (`layers.N.attn.wq_a`, `layers.N.ffn.experts.E.w1`, `hc_head_fn`, ...);
the MTP layers (`mtp.*`) are never read."""
from __future__ import annotations

from dataclasses import replace
from typing import Any

from cluster.config import ModelConfig
from cluster.families.base import Family, common_fields, refuse_if, require
from cluster.families.rope_config import parse_rope
from cluster.model.rope import Rope
from cluster.model.weights import ExpertActivation

_L, _A, _F = "layers.{layer}.", "layers.{layer}.attn.", "layers.{layer}.ffn."
TENSORS = {
    "embed": "embed.weight",
    "final_norm": "norm.weight",
    "lm_head": "head.weight",
    "hc_head_fn": "hc_head_fn",
    "hc_head_base": "hc_head_base",
    "hc_head_scale": "hc_head_scale",
    "attn_norm": _L + "attn_norm.weight",
    "mlp_norm": _L + "ffn_norm.weight",
    **{f"{block}_hc_{part}": _L + f"hc_{name}_{part}" for block, name in (("attn", "attn"), ("mlp", "ffn"))
       for part in ("fn", "base", "scale")},
    "q_a_proj": _A + "wq_a.weight",
    "q_a_norm": _A + "q_norm.weight",
    "q_b_proj": _A + "wq_b.weight",
    "kv_proj": _A + "wkv.weight",
    "kv_norm": _A + "kv_norm.weight",
    "o_a_proj": _A + "wo_a.weight",
    "o_b_proj": _A + "wo_b.weight",
    "sinks": _A + "attn_sink",
    **{f"{ours}_{part}": _A + f"{where}.{name}" for ours, where in (("compressor", "compressor"),
                                                                     ("index_compressor", "indexer.compressor"))
       for part, name in (("kv", "wkv.weight"), ("gate", "wgate.weight"), ("ape", "ape"), ("norm", "norm.weight"))},
    "index_q": _A + "indexer.wq_b.weight",
    "index_weights": _A + "indexer.weights_proj.weight",
    "gate": _F + "gate.weight",
    "gate_bias": _F + "gate.bias",
    "hash_table": _F + "gate.tid2eid",
    "expert_gate": _F + "experts.{expert_id}.w1.weight",
    "expert_up": _F + "experts.{expert_id}.w3.weight",
    "expert_down": _F + "experts.{expert_id}.w2.weight",
    "shared_gate": _F + "shared_experts.w1.weight",
    "shared_up": _F + "shared_experts.w3.weight",
    "shared_down": _F + "shared_experts.w2.weight",
}
_CSA, _HCA = "compressed_sparse_attention", "heavily_compressed_attention"
_RATES = {_CSA: 4, _HCA: 128}  # transformers' defaults (the paper's m and m')


def _compress_ratios(cfg: dict[str, Any], n: int) -> tuple[tuple[int, ...], int]:
    """(ratio per layer, 0 = window only; the CSA ratio), from compress_ratios as released or layer_types."""
    rates = {**_RATES, **(cfg.get("compress_rates") or {})}
    if cfg.get("layer_types") is not None:
        types = list(cfg["layer_types"])
        odd = sorted(set(types) - {"sliding_attention", _CSA, _HCA})
        refuse_if(bool(odd), "layer_types", f"{odd[:1]}: DeepSeek-V4 has sliding, CSA and HCA layers only")
        ratios = [0 if t == "sliding_attention" else int(rates[t]) for t in types]
    else:
        ratios = [int(r) for r in require(cfg, "compress_ratios")]
        odd = sorted(set(ratios) - {0, int(rates[_CSA]), int(rates[_HCA])})
        refuse_if(bool(odd), "compress_ratios", f"ratio {odd[:1]}: only 0, {rates[_CSA]} (CSA) and {rates[_HCA]} (HCA)")
    refuse_if(len(ratios) < n, "compress_ratios", f"{len(ratios)} entries for {n} layers")
    return tuple(ratios[:n]), int(rates[_CSA])  # the release lists one more, for its MTP layer


def _hash_layers(cfg: dict[str, Any], n: int) -> tuple[bool, ...]:
    types = cfg.get("mlp_layer_types")
    if types is not None:
        refuse_if(set(types) - {"hash_moe", "moe"} != set(), "mlp_layer_types", "only 'hash_moe' and 'moe'")
        return tuple(t == "hash_moe" for t in types[:n])
    hashed = int(cfg.get("num_hash_layers", 3))
    return tuple(layer < hashed for layer in range(n))


def _ropes(cfg: dict[str, Any], rope_dim: int) -> tuple[Rope, Rope]:
    """(sliding layers' rope, compressed layers' rope): rope_theta plain; compress_rope_theta with the
    release's rope_scaling, its cos/sin not scaled (the V4 reference does not apply YaRN's mscale).
    A config saved by transformers nests them as rope_parameters {"main": ..., "compress": ...}."""
    nested = cfg.get("rope_parameters") if isinstance(cfg.get("rope_parameters"), dict) else {}
    plain = {k: v for k, v in cfg.items() if k not in ("rope_scaling", "rope_parameters", "partial_rotary_factor")}
    if isinstance(nested.get("main"), dict) and isinstance(nested.get("compress"), dict):
        main, scaling = {**nested["main"]}, {**nested["compress"]}
        plain["rope_theta"] = main.get("rope_theta", cfg.get("rope_theta", 10000.0))
        theta = scaling.pop("rope_theta", cfg.get("compress_rope_theta", 160000.0))
    else:
        scaling = {k: v for k, v in (cfg.get("rope_scaling") or {}).items() if k != "rope_theta"}
        theta = cfg.get("compress_rope_theta", 160000.0)
    scaling.pop("partial_rotary_factor", None)  # rope_dim already is the rotated part
    main = parse_rope(plain, rope_dim, 10000.0)
    compress = parse_rope({**plain, "rope_theta": theta, "rope_scaling": scaling}, rope_dim, 160000.0)
    return main, (replace(compress, attention_factor=1.0) if compress.kind == "yarn" else compress)


def parse_config(cfg: dict[str, Any]) -> ModelConfig:
    refuse_if(int(cfg.get("num_key_value_heads", 1)) != 1, "num_key_value_heads", "DeepSeek-V4 shares one K=V head")
    refuse_if(bool(cfg.get("attention_bias")) or bool(cfg.get("mlp_bias")), "attention_bias/mlp_bias",
              "not in the released DeepSeek-V4")
    refuse_if(int(cfg.get("n_shared_experts", 1)) != 1, "n_shared_experts", "DeepSeek-V4 has exactly one")
    scoring = cfg.get("scoring_func", "sqrtsoftplus")
    refuse_if(scoring not in ("sqrtsoftplus", "sigmoid"), "scoring_func", f"{scoring!r}: sqrtsoftplus or sigmoid")
    head_dim = int(require(cfg, "head_dim"))
    rope_dim = int(cfg.get("qk_rope_head_dim") or head_dim * float(cfg.get("partial_rotary_factor") or 64 / 512))
    base = common_fields({k: v for k, v in cfg.items() if k not in ("rope_scaling", "rope_parameters",
                                                                     "partial_rotary_factor")},
                         rope_head_dim=rope_dim)
    n = base["num_layers"]
    ratios, csa = _compress_ratios(cfg, n)
    main, compress = _ropes(cfg, rope_dim)
    moe_inter = int(require(cfg, "moe_intermediate_size"))
    window = int(cfg.get("sliding_window") or 128)
    return ModelConfig(
        **{**base, "rope": main, "num_kv_heads": 1, "head_dim": head_dim},
        attention="dsv4",
        attn_sinks=True,
        norm_fp32=True,
        sliding_windows=(window,) * n,
        q_lora_rank=int(require(cfg, "q_lora_rank")),
        qk_rope_head_dim=rope_dim,
        compress_ratios=ratios,
        csa_ratio=csa,
        compress_rope=compress,
        index_topk=int(require(cfg, "index_topk")),
        index_n_heads=int(require(cfg, "index_n_heads")),
        index_head_dim=int(require(cfg, "index_head_dim")),
        o_groups=int(require(cfg, "o_groups")),
        o_lora_rank=int(require(cfg, "o_lora_rank")),
        hc_mult=int(cfg.get("hc_mult", 4)),
        hc_sinkhorn_iters=int(cfg.get("hc_sinkhorn_iters", 20)),
        hc_eps=float(cfg.get("hc_eps", 1e-6)),
        num_experts=int(require(cfg, "n_routed_experts")),
        top_k=int(require(cfg, "num_experts_per_tok")),
        expert_intermediate_size=moe_inter,
        expert_activation=ExpertActivation("clamped_silu", limit=float(cfg.get("swiglu_limit", 10.0))),
        norm_topk_prob=True,  # transformers' V4 routers always renormalise the chosen weights
        moe_layers=(True,) * n,
        hash_layers=_hash_layers(cfg, n),
        shared_expert_intermediate_size=moe_inter,
        scoring=scoring,
        routed_scaling_factor=float(cfg.get("routed_scaling_factor") or 1.0),
    )


FAMILY = Family("deepseek_v4", parse_config, TENSORS)
