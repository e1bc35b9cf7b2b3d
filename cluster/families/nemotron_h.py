"""Nemotron-H / Nemotron 3 (`nemotron_h`): a stack of one-part blocks, each a pre-norm, one mixer and a residual.
config.json's `hybrid_override_pattern` names each block: M = Mamba-2, * = attention (no rotary, no biases),
E = MoE, - = MLP (transformers 5 writes the same as `layers_block_type`). A block is one of our layers with
only its mixer part or only its MLP part (ModelConfig.mixer_layers / mlp_layers), so layer ids, the
routing trace and the planner count the released blocks. MLPs and experts are not gated: relu(up · x)²;
routing is DeepSeek-V3's (sigmoid scores, e_score_correction_bias steering the choice, group-limited top-k
when n_group > 1, routed_scaling_factor) with a shared expert beside. Tensors live under `backbone.*`.
Nemotron 3 Super's latent MoE (`moe_latent_size`): the gate and the shared expert read the full hidden state,
the routed experts work in a narrower space that fc1_latent_proj projects into and fc2_latent_proj back out
of; the router holds both projections, so the rows it sends the workers are moe_latent_size wide
(ModelConfig.expert_row_size). Its multi-token-prediction layers (`mtp.*`) are never read."""
from __future__ import annotations

from typing import Any

from cluster.config import ModelConfig
from cluster.families.base import Family, common_fields, refuse_if, require
from cluster.model.weights import RELU2

_LAYER = "backbone.layers.{layer}."
_MIXER = _LAYER + "mixer."
TENSORS = {
    "embed": "backbone.embeddings.weight",
    "final_norm": "backbone.norm_f.weight",
    "lm_head": "lm_head.weight",
    "attn_norm": _LAYER + "norm.weight",  # one norm per block: its mixer's or its MLP's
    "mlp_norm": _LAYER + "norm.weight",
    **{f"{p}_proj": _MIXER + f"{p}_proj.weight" for p in "qkvo"},
    "ssm_in": _MIXER + "in_proj.weight",
    "ssm_conv": _MIXER + "conv1d.weight",
    "ssm_conv_bias": _MIXER + "conv1d.bias",
    "ssm_a_log": _MIXER + "A_log",
    "ssm_dt_bias": _MIXER + "dt_bias",
    "ssm_d": _MIXER + "D",
    "ssm_norm": _MIXER + "norm.weight",
    "ssm_out": _MIXER + "out_proj.weight",
    "gate": _MIXER + "gate.weight",
    "gate_bias": _MIXER + "gate.e_score_correction_bias",
    "latent_in": _MIXER + "fc1_latent_proj.weight",
    "latent_out": _MIXER + "fc2_latent_proj.weight",
    "expert_up": _MIXER + "experts.{expert_id}.up_proj.weight",
    "expert_down": _MIXER + "experts.{expert_id}.down_proj.weight",
    "shared_up": _MIXER + "shared_experts.up_proj.weight",
    "shared_down": _MIXER + "shared_experts.down_proj.weight",
    "dense_up": _MIXER + "up_proj.weight",
    "dense_down": _MIXER + "down_proj.weight",
}
_BLOCKS = {"M": "linear_attention", "*": "full_attention", "E": "moe", "-": "mlp"}


def block_types(cfg: dict[str, Any]) -> list[str]:
    """The blocks in order, from layers_block_type (transformers 5) or hybrid_override_pattern (the releases)."""
    types = cfg.get("layers_block_type")
    if types is None:
        pattern = str(require(cfg, "hybrid_override_pattern"))
        odd = sorted(set(pattern) - set(_BLOCKS))
        refuse_if(bool(odd), "hybrid_override_pattern", f"block {odd[0] if odd else ''!r}: only M, *, E and -")
        types = [_BLOCKS[c] for c in pattern]
    odd = sorted(set(types) - set(_BLOCKS.values()))
    refuse_if(bool(odd), "layers_block_type", f"block type {odd[0] if odd else ''!r}")
    n = cfg.get("num_hidden_layers")
    refuse_if(n is not None and n != len(types), "num_hidden_layers", f"{n}, but the pattern has {len(types)} blocks")
    return list(types)


def _refusals(cfg: dict[str, Any]) -> None:
    latent = cfg.get("moe_latent_size")
    refuse_if(latent is not None and int(latent) <= 0, "moe_latent_size", f"{latent}: must be positive")
    for field in ("attention_bias", "mlp_bias", "use_bias", "mamba_proj_bias"):
        refuse_if(bool(cfg.get(field)), field, "true: Nemotron-H's projections have no biases")
    act = cfg.get("mlp_hidden_act", "relu2")
    refuse_if(act != "relu2", "mlp_hidden_act", f"{act!r}: only relu2")
    refuse_if(cfg.get("mamba_hidden_act", "silu") != "silu", "mamba_hidden_act",
              f"{cfg.get('mamba_hidden_act')!r}: only silu")
    refuse_if(bool(cfg.get("sliding_window")), "sliding_window", "Nemotron-H attends in full")
    refuse_if(int(cfg.get("n_shared_experts", 1)) != 1, "n_shared_experts",
              f"{cfg.get('n_shared_experts')}: transformers' Nemotron-H has exactly one shared expert")


def parse_config(cfg: dict[str, Any]) -> ModelConfig:
    _refusals(cfg)
    types = block_types(cfg)
    n = len(types)
    base = {**common_fields({**cfg, "num_hidden_layers": n}),
            "rms_norm_eps": float(cfg.get("layer_norm_epsilon", 1e-5))}
    heads, head_dim = int(cfg.get("mamba_num_heads", 128)), int(cfg.get("mamba_head_dim", 64))
    groups = int(cfg.get("n_groups", 8))
    refuse_if(heads % groups != 0, "n_groups", f"{groups} does not divide mamba_num_heads {heads}")
    kernel = int(cfg.get("conv_kernel", 4))
    refuse_if(kernel < 2, "conv_kernel", f"{kernel}: the convolution state needs a kernel of at least 2")
    groups_routed = int(cfg.get("n_group") or 1)
    return ModelConfig(
        **base,
        norm_fp32=True,  # transformers scales by the weight in fp32, then casts
        rope_layers=(False,) * n,  # no rotary anywhere: position comes from the Mamba layers
        mixer_layers=tuple(t in ("linear_attention", "full_attention") for t in types),
        mlp_layers=tuple(t in ("moe", "mlp") for t in types),
        moe_layers=tuple(t == "moe" for t in types),
        linear_layers=tuple(t == "linear_attention" for t in types),
        linear_kind="mamba2",
        linear_conv_kernel=kernel,
        ssm_heads=heads, ssm_head_dim=head_dim, ssm_groups=groups, ssm_state_size=int(cfg.get("ssm_state_size", 128)),
        ssm_chunk=int(cfg.get("chunk_size", 128)), ssm_dt_min=float(cfg.get("time_step_min", 0.001)),
        num_experts=int(require(cfg, "n_routed_experts")),
        top_k=int(require(cfg, "num_experts_per_tok")),
        expert_intermediate_size=int(require(cfg, "moe_intermediate_size")),
        moe_latent_size=int(cfg.get("moe_latent_size") or 0),
        expert_activation=RELU2,
        dense_activation=RELU2,
        dense_intermediate_size=int(cfg.get("intermediate_size") or 0),
        shared_expert_intermediate_size=int(require(cfg, "moe_shared_expert_intermediate_size")),
        norm_topk_prob=bool(cfg.get("norm_topk_prob", True)),
        scoring="sigmoid",
        gate_fp32=True,  # the router's logits in fp32, as transformers computes them
        n_group=groups_routed,
        topk_group=int(cfg.get("topk_group") or 1),
        group_score="top2_sum",
        routed_scaling_factor=float(cfg.get("routed_scaling_factor", 1.0)),
    )


FAMILY = Family("nemotron_h", parse_config, TENSORS)
