"""Weight containers (our names), filled by cluster.loader."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class MLPWeights:
    """A SwiGLU MLP: a routed expert, a shared expert or a dense layer's MLP."""

    gate_up: Tensor  # [2I, D]: gate rows then up rows, one matmul for both
    down: Tensor  # [D, I]

    @property
    def nbytes(self) -> int:
        return self.gate_up.nbytes + self.down.nbytes

    def to(self, device: torch.device | str) -> "MLPWeights":
        return MLPWeights(self.gate_up.to(device), self.down.to(device))


@dataclass(frozen=True)
class AttentionWeights:
    q: Tensor
    k: Tensor
    v: Tensor
    o: Tensor
    q_bias: Tensor | None = None
    k_bias: Tensor | None = None
    v_bias: Tensor | None = None
    q_norm: Tensor | None = None
    k_norm: Tensor | None = None


@dataclass(frozen=True)
class MLAWeights:
    """Multi-head latent attention (DeepSeek-V2/V3)."""

    kv_a: Tensor  # [kv_lora + rope, D]: the compressed latent and the shared rotary key
    kv_a_norm: Tensor  # [kv_lora]
    kv_b: Tensor  # [H * (nope + v), kv_lora]: latent → per-head key (no rope) and value
    o: Tensor  # [D, H * v]
    q: Tensor | None = None  # [H * (nope + rope), D] when q_lora_rank is 0
    q_a: Tensor | None = None  # [q_lora, D]
    q_a_norm: Tensor | None = None  # [q_lora]
    q_b: Tensor | None = None  # [H * (nope + rope), q_lora]


@dataclass(frozen=True)
class LayerWeights:
    attn_norm: Tensor
    attn: AttentionWeights | MLAWeights
    mlp_norm: Tensor
    router: Tensor | None = None  # [E, D] on MoE layers
    router_bias: Tensor | None = None  # [E] DeepSeek-V3 e_score_correction_bias: steers the choice only
    dense: MLPWeights | None = None  # on dense layers
    shared: MLPWeights | None = None  # shared expert (qwen2_moe)
    shared_router: Tensor | None = None  # [1, D] sigmoid gate of the shared expert


@dataclass(frozen=True)
class BackboneWeights:
    """Everything but the routed experts: what the router process holds."""

    embed: Tensor  # [V, D]
    final_norm: Tensor
    lm_head: Tensor  # [V, D]
    layers: tuple[LayerWeights, ...]
