"""Llama 4 (Scout, Maverick), served as a text model from its multimodal release: the config's
`text_config` and the `language_model.*` tensors are read, the vision tower and projector never are.

Layers rotate (interleaved pairs, llama3 scaling) and attend within chunks of attention_chunk_size
positions, except every no_rope_layer_interval-th layer (`no_rope_layers` 0): no rotary, full
attention, queries scaled with the position (attn_temperature_tuning). use_qk_norm: an unweighted
RMS norm of q and k per head on rotary layers. MoE layers (`moe_layers`, every
interleave_moe_layer_step-th; the others a dense MLP of intermediate_size_mlp) route top-k on the
logits, weigh with their sigmoid, and that weight scales the expert's *input*; a shared expert is
always added. Experts stored fused and transposed ([E, D, 2I] gate then up, [E, I, D] down)."""
from __future__ import annotations

from typing import Any

from cluster.config import ModelConfig
from cluster.families.base import QWEN_STYLE_TENSORS, ExpertLayout, Family, common_fields, refuse_if, require

_LM = "language_model."
_FF = _LM + "model.layers.{layer}.feed_forward."
TENSORS = {
    **{k: _LM + v for k, v in QWEN_STYLE_TENSORS.items()
       if not k.startswith(("gate", "expert_", "shared_", "dense_", "q_norm", "k_norm", "q_bias", "k_bias", "v_bias"))},
    "gate": _FF + "router.weight",
    "expert_gate_up": _FF + "experts.gate_up_proj",
    "expert_down": _FF + "experts.down_proj",
    "shared_gate": _FF + "shared_expert.gate_proj.weight",
    "shared_up": _FF + "shared_expert.up_proj.weight",
    "shared_down": _FF + "shared_expert.down_proj.weight",
    "dense_gate": _FF + "gate_proj.weight",
    "dense_up": _FF + "up_proj.weight",
    "dense_down": _FF + "down_proj.weight",
}


def text_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The language model's fields (text_config), with the wrapper's model_type and dtype."""
    text = cfg.get("text_config")
    if not isinstance(text, dict):
        return cfg  # a text-only Llama4ForCausalLM config
    return {**text, "model_type": cfg["model_type"],
            "tie_word_embeddings": cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", False)),
            "torch_dtype": cfg.get("torch_dtype", text.get("torch_dtype")), "dtype": cfg.get("dtype", text.get("dtype")),
            "quantization_config": cfg.get("quantization_config")}


def _per_layer(cfg: dict[str, Any], n: int) -> tuple[tuple[bool, ...], tuple[bool, ...]]:
    """(rotary layers, MoE layers), with transformers' defaults when the lists are absent."""
    interval = int(cfg.get("no_rope_layer_interval", 4))
    rope = cfg.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(n)]
    step = int(cfg.get("interleave_moe_layer_step", 1))
    moe = cfg.get("moe_layers")
    moe = set(moe if moe is not None else range(step - 1, n, step))
    refuse_if(len(rope) != n, "no_rope_layers", f"{len(rope)} entries for {n} layers")
    return tuple(bool(r) for r in rope), tuple(i in moe for i in range(n))


def parse_config(config: dict[str, Any]) -> ModelConfig:
    cfg = text_config(config)
    refuse_if(bool(cfg.get("attention_bias")), "attention_bias", "true: not in the released Llama 4")
    types = cfg.get("layer_types")
    base = common_fields({k: v for k, v in cfg.items() if k != "layer_types"}, default_theta=500000.0)
    n = base["num_layers"]
    rotary, moe = _per_layer(cfg, n)
    expected = ["chunked_attention" if r else "full_attention" for r in rotary]
    refuse_if(types is not None and list(types) != expected, "layer_types",
              "chunked attention exactly on the rotary layers is what Llama 4 does")
    chunk = cfg.get("attention_chunk_size")
    inter = int(require(cfg, "intermediate_size"))
    return ModelConfig(
        **base,
        qk_norm="l2" if cfg.get("use_qk_norm", True) else "none",
        rope_interleave=True,
        rope_layers=rotary,
        attention_chunks=tuple(int(chunk) if r and chunk else None for r in rotary),
        attn_temperature=(float(cfg.get("floor_scale", 8192)), float(cfg.get("attn_scale", 0.1)))
        if cfg.get("attn_temperature_tuning", True) else None,
        num_experts=int(require(cfg, "num_local_experts")),
        top_k=int(require(cfg, "num_experts_per_tok")),
        expert_intermediate_size=inter,
        moe_layers=moe,
        scoring="topk_sigmoid",
        norm_topk_prob=False,
        moe_input_scaled=True,
        shared_expert_intermediate_size=inter,
        dense_intermediate_size=int(cfg.get("intermediate_size_mlp") or 0),
    )


FAMILY = Family("llama4", parse_config, TENSORS, ExpertLayout(fused=True, transposed=True))
