"""What a model family is: a config parser and one tensor-name table."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from cluster.config import ModelConfig
from cluster.errors import UnsupportedModelError
from cluster.families.rope_config import parse_rope
from cluster.precision import checkpoint_dtype
from cluster.quant import parse_quantization

__all__ = ["ExpertLayout", "Family", "QWEN_STYLE_TENSORS", "UnsupportedModelError", "common_fields", "eos_ids",
           "qwen_moe_fields", "refuse_if", "require", "sliding_windows", "sparse_layers"]

# Our tensor names. `{layer}` / `{expert_id}` are filled in per use.
# Every family maps (a subset of) these to its checkpoint names; nowhere else
# in the code base does a checkpoint tensor name appear.
QWEN_STYLE_TENSORS: dict[str, str] = {
    "embed": "model.embed_tokens.weight",
    "final_norm": "model.norm.weight",
    "lm_head": "lm_head.weight",
    "attn_norm": "model.layers.{layer}.input_layernorm.weight",
    "q_proj": "model.layers.{layer}.self_attn.q_proj.weight",
    "k_proj": "model.layers.{layer}.self_attn.k_proj.weight",
    "v_proj": "model.layers.{layer}.self_attn.v_proj.weight",
    "o_proj": "model.layers.{layer}.self_attn.o_proj.weight",
    "q_bias": "model.layers.{layer}.self_attn.q_proj.bias",
    "k_bias": "model.layers.{layer}.self_attn.k_proj.bias",
    "v_bias": "model.layers.{layer}.self_attn.v_proj.bias",
    "q_norm": "model.layers.{layer}.self_attn.q_norm.weight",
    "k_norm": "model.layers.{layer}.self_attn.k_norm.weight",
    "mlp_norm": "model.layers.{layer}.post_attention_layernorm.weight",
    "gate": "model.layers.{layer}.mlp.gate.weight",
    "expert_gate": "model.layers.{layer}.mlp.experts.{expert_id}.gate_proj.weight",
    "expert_up": "model.layers.{layer}.mlp.experts.{expert_id}.up_proj.weight",
    "expert_down": "model.layers.{layer}.mlp.experts.{expert_id}.down_proj.weight",
    "shared_gate": "model.layers.{layer}.mlp.shared_expert.gate_proj.weight",
    "shared_up": "model.layers.{layer}.mlp.shared_expert.up_proj.weight",
    "shared_down": "model.layers.{layer}.mlp.shared_expert.down_proj.weight",
    "shared_expert_gate": "model.layers.{layer}.mlp.shared_expert_gate.weight",
    "dense_gate": "model.layers.{layer}.mlp.gate_proj.weight",
    "dense_up": "model.layers.{layer}.mlp.up_proj.weight",
    "dense_down": "model.layers.{layer}.mlp.down_proj.weight",
}


@dataclass(frozen=True)
class ExpertLayout:
    """How routed experts are stored. Separate: `expert_gate` / `expert_up` / `expert_down` per
    expert_id. Fused: one [E, ...] tensor per layer, `expert_gate_up` (gate rows then up rows, or
    interleaved gate/up pairs) and `expert_down`, stored [out, in] or transposed [in, out].
    Row blocks (DBRX): `expert_gate`, `expert_up` and `expert_down` are each one [E * I, D] tensor
    per layer, expert e's I rows in turn (down stored transposed)."""

    fused: bool = False
    transposed: bool = False
    interleaved: bool = False
    row_blocks: bool = False


@dataclass(frozen=True)
class Family:
    model_type: str
    parse_config: Callable[[dict[str, Any]], ModelConfig]
    tensors: dict[str, str]
    experts: ExpertLayout = ExpertLayout()

    def tensor_name(self, ours: str, layer: int | None = None, expert_id: int | None = None) -> str:
        return self.tensors[ours].format(layer=layer, expert_id=expert_id)


def require(cfg: dict[str, Any], *keys: str) -> Any:
    """First present key of `keys`; a clear error when none is."""
    for key in keys:
        if cfg.get(key) is not None:
            return cfg[key]
    raise UnsupportedModelError(f"config.json lacks required field {keys[0]!r}")


def refuse_if(bad: bool, field: str, why: str) -> None:
    """A config field that would change the math in a way we do not implement."""
    if bad:
        raise UnsupportedModelError(f"config.json: {field} is not supported ({why})")


def eos_ids(cfg: dict[str, Any]) -> tuple[int, ...]:
    eos = cfg.get("eos_token_id")
    if eos is None:
        return ()
    ids = tuple(eos) if isinstance(eos, list) else (eos,)
    return tuple(i for i in ids if 0 <= i < cfg["vocab_size"])


def sliding_windows(cfg: dict[str, Any], num_layers: int, default: Callable[[int], bool]) -> tuple:
    """Per layer window (None: full attention): config.json's layer_types when it has them,
    else the family's rule `default(layer)` for where `sliding_window` applies."""
    window = cfg.get("sliding_window")
    types = cfg.get("layer_types")
    if types is not None:
        odd = sorted(set(types) - {"sliding_attention", "full_attention"})
        refuse_if(bool(odd), "layer_types", f"layer type {odd[0] if odd else ''!r}: only sliding/full attention")
        refuse_if(len(types) != num_layers, "layer_types", f"{len(types)} entries for {num_layers} layers")
        sliding = [t == "sliding_attention" for t in types]
    else:
        sliding = [default(layer) for layer in range(num_layers)]
    if not window or not any(sliding):
        return ()
    return tuple(int(window) if s else None for s in sliding)


# Fields other architectures use to change the math; none of our families implements them, so a
# config that sets one is refused rather than served wrong.
_FOREIGN = ("attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar", "sliding_window_pattern",
            "qk_layernorm", "use_parallel_residual")


def common_fields(cfg: dict[str, Any], default_theta: float = 10000.0, default_partial: float | None = None,
                  rope_head_dim: int | None = None) -> dict[str, Any]:
    """Fields every family reads the same way."""
    refuse_if(cfg.get("hidden_act", "silu") != "silu", "hidden_act", f"{cfg.get('hidden_act')!r}: only 'silu'")
    for field in _FOREIGN:
        refuse_if(bool(cfg.get(field)), field, f"{cfg.get(field)!r}: not implemented for {cfg.get('model_type')}")
    hidden = int(require(cfg, "hidden_size"))
    heads = int(require(cfg, "num_attention_heads"))
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    return dict(
        model_type=cfg["model_type"],
        vocab_size=int(require(cfg, "vocab_size")),
        hidden_size=hidden,
        num_layers=int(require(cfg, "num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope=parse_rope(cfg, rope_head_dim or head_dim, default_theta, default_partial),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        checkpoint_dtype=checkpoint_dtype(cfg),
        quantization=parse_quantization(cfg),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=eos_ids(cfg),
    )


def sparse_layers(cfg: dict[str, Any], num_layers: int) -> tuple[bool, ...]:
    """Qwen-style layer pattern: decoder_sparse_step and mlp_only_layers."""
    step = int(cfg.get("decoder_sparse_step", 1) or 1)
    dense = set(cfg.get("mlp_only_layers") or [])
    return tuple(layer not in dense and (layer + 1) % step == 0 for layer in range(num_layers))


def qwen_moe_fields(cfg: dict[str, Any], num_layers: int) -> dict[str, Any]:
    """Routed-expert fields that qwen2_moe and qwen3_moe read alike."""
    return dict(
        num_experts=int(require(cfg, "num_experts", "num_local_experts")),
        top_k=int(require(cfg, "num_experts_per_tok")),
        expert_intermediate_size=int(require(cfg, "moe_intermediate_size")),
        norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
        moe_layers=sparse_layers(cfg, num_layers),
        dense_intermediate_size=int(cfg.get("intermediate_size") or 0),
    )
