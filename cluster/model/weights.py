"""Weight containers (our names), filled by cluster.loader."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class ExpertActivation:
    """gate, up → hidden of a gated MLP. "silu": silu(gate) * up. "clamped_swiglu" (gpt-oss): gate
    clamped above at `limit`, up to ±`limit`, then (up + 1) * gate * sigmoid(alpha * gate).
    "clamped_silu" (DeepSeek-V4): the same clamps, then silu(gate) * up. "gelu_tanh" (Gemma 4):
    gelu(gate) with the tanh approximation, times up. "relu2" (Nemotron-H): no gate, relu(up)²; its MLP's
    gate_up holds the up rows alone."""

    kind: str = "silu"
    alpha: float = 1.702
    limit: float = 7.0

    @property
    def gated(self) -> bool:
        return self.kind != "relu2"

    def apply(self, gate_up: Tensor) -> Tensor:
        """The first projection's output [N, 2I] (gated) or [N, I] → the hidden [N, I]."""
        if not self.gated:
            return F.relu(gate_up).square()
        gate, up = gate_up.chunk(2, dim=-1)
        return self(gate, up)

    def __call__(self, gate: Tensor, up: Tensor) -> Tensor:
        if self.kind == "silu":
            return F.silu(gate) * up
        if self.kind == "gelu_tanh":
            return F.gelu(gate, approximate="tanh") * up
        gate = gate.clamp(max=self.limit)
        up = up.clamp(-self.limit, self.limit)
        if self.kind == "clamped_silu":
            return F.silu(gate) * up
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))


SILU = ExpertActivation()
RELU2 = ExpertActivation("relu2")


@dataclass(frozen=True)
class MLPWeights:
    """A gated MLP: a routed expert, a shared expert or a dense layer's MLP. Everything the
    expert compute needs is here, so a remote worker runs the same pure function on it."""

    gate_up: Tensor  # [2I, D]: gate rows then up rows, one matmul for both ([I, D]: up alone, non-gated)
    down: Tensor  # [D, I]
    gate_up_bias: Tensor | None = None  # [2I]
    down_bias: Tensor | None = None  # [D]
    activation: ExpertActivation = SILU

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.gate_up, self.down, self.gate_up_bias, self.down_bias) if t is not None)

    def to(self, device: torch.device | str) -> "MLPWeights":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return MLPWeights(move(self.gate_up), move(self.down), move(self.gate_up_bias), move(self.down_bias),
                          self.activation)


@dataclass(frozen=True)
class AttentionWeights:
    q: Tensor
    k: Tensor
    v: Tensor | None  # None: the values are the keys' projection (Gemma 4's attention_k_eq_v layers)
    o: Tensor
    q_bias: Tensor | None = None
    k_bias: Tensor | None = None
    v_bias: Tensor | None = None
    o_bias: Tensor | None = None
    q_norm: Tensor | None = None
    k_norm: Tensor | None = None
    sinks: Tensor | None = None  # [H] gpt-oss attention sinks
    gate: Tensor | None = None  # [H * hd, D] Qwen3-Next: sigmoid gate on the attention output (from q_proj)


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
    indexer: "IndexerWeights | None" = None  # sparse attention (DSA)


@dataclass(frozen=True)
class IndexerWeights:
    """DSA's lightning indexer: Hi heads of width Di score cached keys of width Di."""

    q: Tensor  # [Hi * Di, q_lora]: from the same normed q latent as the attention's queries
    k: Tensor  # [Di, D]
    k_norm: Tensor  # [Di] LayerNorm weight
    k_norm_bias: Tensor  # [Di]
    head_weights: Tensor  # [Hi, D]: each head's weight per query


@dataclass(frozen=True)
class CompressorWeights:
    """DeepSeek-V4's compressor of one layer (or of its indexer): each window of `ratio` tokens becomes
    one entry, a softmax(gate + position_bias)-weighted sum of the tokens' kv, then RMS-normed.
    With overlap (CSA) kv and gate are 2 * dim wide: the first half feeds the next window's entry."""

    kv: Tensor  # [dim or 2 * dim, D]
    gate: Tensor  # same shape as kv
    position_bias: Tensor  # [ratio, dim or 2 * dim]
    norm: Tensor  # [dim]


@dataclass(frozen=True)
class V4AttentionWeights:
    """DeepSeek-V4 attention: low-rank q, one K=V head, sinks, grouped low-rank output."""

    q_a: Tensor  # [q_lora, D]
    q_a_norm: Tensor  # [q_lora]
    q_b: Tensor  # [H * hd, q_lora]
    kv: Tensor  # [hd, D]
    kv_norm: Tensor  # [hd]
    o_a: Tensor  # [groups * o_lora, H * hd / groups]: group g's rows are g * o_lora ...
    o_b: Tensor  # [D, groups * o_lora]
    sinks: Tensor  # [H]
    compressor: CompressorWeights | None = None
    indexer: CompressorWeights | None = None  # CSA layers: the indexer's own compressor ...
    index_q: Tensor | None = None  # [Hi * Di, q_lora]
    index_weights: Tensor | None = None  # [Hi, D]


@dataclass(frozen=True)
class HyperWeights:
    """A hyper-connection: from the hc_mult streams, the weights that collapse them into a block's input
    (pre), spread its output back (post) and mix the streams (comb). fn [(2 + n) * n, n * D], base, scale [3]."""

    fn: Tensor
    base: Tensor
    scale: Tensor


@dataclass(frozen=True)
class DeltaNetWeights:
    """Gated DeltaNet linear attention (Qwen3-Next, Qwen3.5): Hk key heads of dk, Hv value heads of dv."""

    qkv: Tensor  # [2 * Hk * dk + Hv * dv, D]: q rows, k rows, v rows (the convolution's channel order)
    z: Tensor  # [Hv * dv, D]: the output gate
    b: Tensor  # [Hv, D]: beta (write strength) = sigmoid(b · x)
    a: Tensor  # [Hv, D]: decay input
    conv: Tensor  # [C, K] depthwise causal convolution over q, k, v
    a_log: Tensor  # [Hv] fp32: decay rate log(A)
    dt_bias: Tensor  # [Hv] fp32
    norm: Tensor  # [dv] gated RMSNorm weight
    out: Tensor  # [D, Hv * dv]


@dataclass(frozen=True)
class ParallelWeights:
    """Gemma 4's MoE layer beside its dense MLP: the norms of each branch and of the router's input."""

    post_attn_norm: Tensor  # [D] on the attention output, before its residual add
    dense_out_norm: Tensor  # [D] on the dense MLP's output
    moe_in_norm: Tensor  # [D] the routed experts' input
    moe_out_norm: Tensor  # [D] on the routed experts' output
    post_mlp_norm: Tensor  # [D] on the two branches' sum, before its residual add
    router_scale: Tensor  # [D] scales the router's (weightless RMS-normed) input
    layer_scalar: Tensor  # [1] scales the layer's output


@dataclass(frozen=True)
class Mamba2Weights:
    """A Mamba-2 mixer (Nemotron-H, Granite 4.0-H): H heads of P, G groups of B and C of N each; I = H * P."""

    z: Tensor  # [I, D]: the output gate
    xbc: Tensor  # [I + 2 * G * N, D]: x, B, C (the convolution's channels, in that order)
    dt: Tensor  # [H, D]: the step size's input
    conv: Tensor  # [C, K] depthwise causal convolution over x, B, C
    conv_bias: Tensor | None  # [C]
    a_log: Tensor  # [H] fp32: A = -exp(a_log)
    dt_bias: Tensor  # [H] fp32
    d: Tensor  # [H] fp32: the skip connection D * x
    norm: Tensor  # [I] the gated RMSNorm's weight (normed per group of I / G)
    out: Tensor  # [D, I]


@dataclass(frozen=True)
class MambaWeights:
    """A Mamba-1 mixer (Jamba): I channels with a state of N each, a low-rank (R) step size."""

    x: Tensor  # [I, D]: the scanned input (in_proj's first half)
    z: Tensor  # [I, D]: the output gate (its second half)
    conv: Tensor  # [I, K] depthwise causal convolution over x
    conv_bias: Tensor | None  # [I]
    x_proj: Tensor  # [R + 2N, I]: dt_r, B, C
    dt_norm: Tensor  # [R], b_norm and c_norm [N]: Jamba's RMSNorms of dt_r, B and C
    b_norm: Tensor
    c_norm: Tensor
    dt_proj: Tensor  # [I, R]
    dt_bias: Tensor  # [I] fp32
    a_log: Tensor  # [I, N] fp32: A = -exp(a_log)
    d: Tensor  # [I] fp32
    out: Tensor  # [D, I]


@dataclass(frozen=True)
class LayerWeights:
    attn_norm: Tensor | None  # None with attn: a block without a mixer part (Nemotron-H's MLP / MoE blocks)
    attn: AttentionWeights | MLAWeights | V4AttentionWeights | DeltaNetWeights | Mamba2Weights | MambaWeights | None
    mlp_norm: Tensor | None  # None: a block without an MLP part (Nemotron-H's mixer blocks)
    gate: Tensor | None = None  # [E, D] on MoE layers: the gate (router weight) of the MoE block
    gate_bias: Tensor | None = None  # [E] DeepSeek-V3 e_score_correction_bias: steers the choice only
    gate_logits_bias: Tensor | None = None  # [E] gpt-oss: added to the gate logits
    dense: MLPWeights | None = None  # on dense layers
    shared: MLPWeights | None = None  # shared expert (qwen2_moe)
    shared_expert_gate: Tensor | None = None  # [1, D] sigmoid gate of the shared expert
    attn_norm_bias: Tensor | None = None  # LayerNorm biases (phimoe)
    mlp_norm_bias: Tensor | None = None
    hash_table: Tensor | None = None  # [V, K] DeepSeek-V4's hash layers: the experts of each token id
    attn_hc: HyperWeights | None = None  # DeepSeek-V4's hyper-connections around attention and the MoE block
    mlp_hc: HyperWeights | None = None
    expert_scale: Tensor | None = None  # [E] Gemma 4's per_expert_scale: multiplies each chosen expert's weight
    parallel: ParallelWeights | None = None  # Gemma 4 (cluster.model.parallel)
    latent_in: Tensor | None = None  # [R, D] Nemotron 3 Super: hidden → the experts' row width R, before dispatch
    latent_out: Tensor | None = None  # [D, R] and back, after combine


@dataclass(frozen=True)
class BackboneWeights:
    """Everything but the routed experts: what the router process holds."""

    embed: Tensor  # [V, D]
    final_norm: Tensor
    lm_head: Tensor  # [V, D]
    layers: tuple[LayerWeights, ...]
    final_norm_bias: Tensor | None = None
    lm_head_bias: Tensor | None = None
    hc_head: HyperWeights | None = None  # DeepSeek-V4: collapses the streams before the final norm (fn [n, n * D])

    @property
    def nbytes(self) -> int:
        """Bytes held, each tensor once (a tied lm_head is the embedding)."""
        seen: dict[int, int] = {}

        def walk(obj) -> None:
            if isinstance(obj, Tensor):
                seen[obj.data_ptr()] = obj.nbytes
            elif isinstance(obj, (tuple, list)):
                for o in obj:
                    walk(o)
            elif hasattr(obj, "__dataclass_fields__"):
                for name in obj.__dataclass_fields__:
                    walk(getattr(obj, name))

        walk(self)
        return sum(seen.values())
