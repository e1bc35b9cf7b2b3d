"""The one internal description of an MoE model, whatever family it came from."""
from __future__ import annotations

from dataclasses import dataclass

from cluster.model.gating import Gating


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    # Attention variants.
    qkv_bias: bool = False
    qk_norm: str = "none"  # "none" | "head" (per head, qwen3) | "full" (whole projection, olmoe)
    clip_qkv: float | None = None
    # Routed experts.
    num_experts: int = 0
    top_k: int = 0
    expert_intermediate_size: int = 0
    norm_topk_prob: bool = True
    moe_layers: tuple[bool, ...] = ()  # per layer: True = MoE block, False = dense MLP
    # Dense MLP for non-MoE layers, shared expert beside routed ones (qwen2_moe).
    dense_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    shared_expert_gate: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # DeepSeek gating variants (defaults: plain softmax top-k).
    scoring: str = "softmax"
    n_group: int = 1
    topk_group: int = 1
    group_score: str = "max"
    routed_scaling_factor: float = 1.0
    # Multi-head latent attention (DeepSeek); attention="mha" ignores these.
    attention: str = "mha"
    q_lora_rank: int = 0  # 0: q comes from one projection
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    rope_interleave: bool = False  # rotary on interleaved pairs (DeepSeek) instead of halves

    @property
    def gating(self) -> Gating:
        return Gating(self.top_k, self.norm_topk_prob, self.scoring, self.n_group, self.topk_group,
                      self.group_score, self.routed_scaling_factor)

    @property
    def moe_layer_ids(self) -> tuple[int, ...]:
        return tuple(layer for layer, is_moe in enumerate(self.moe_layers) if is_moe)

    def expert_pairs(self) -> list[tuple[int, int]]:
        """Every (layer, expert_id) slot of the model."""
        return [(layer, e) for layer in self.moe_layer_ids for e in range(self.num_experts)]
