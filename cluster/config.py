"""The one internal description of an MoE model, whatever family it came from."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from cluster.model.gating import Gating
from cluster.model.rope import Rope
from cluster.model.weights import SILU, ExpertActivation
from cluster.quant import NONE, Quantization


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
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope: Rope = field(default_factory=Rope)
    checkpoint_dtype: torch.dtype = torch.float32  # what config.json says the weights are (unquantised)
    quantization: Quantization = NONE
    # Norms: "rms" (RMSNorm) | "layer" (LayerNorm, phimoe, DBRX); gpt-oss keeps norm weights in fp32.
    norm: str = "rms"
    norm_fp32: bool = False
    norm_bias: bool = True  # LayerNorms carry a bias (phimoe); DBRX's have none
    # Attention variants.
    qkv_bias: bool = False
    o_bias: bool = False
    # "none" | "head" (per head, qwen3) | "full" (whole projection, olmoe) | "l2" (per head, no weight, on
    # rotary layers only: Llama 4)
    qk_norm: str = "none"
    clip_qkv: float | None = None
    attn_scale: float | None = None  # softmax scale; None: head_dim ** -0.5 (q/k dim for MLA)
    sliding_windows: tuple[int | None, ...] = ()  # per layer: attend to the last n tokens; () or None: all
    attention_chunks: tuple[int | None, ...] = ()  # per layer: attend within aligned chunks of n positions
    rope_layers: tuple[bool, ...] = ()  # per layer: False = no rotary (Llama 4's NoPE layers); (): all rotate
    # Llama 4's NoPE layers scale queries by log1p(floor((pos + 1) / floor_scale)) * attn_scale + 1.
    attn_temperature: tuple[float, float] | None = None  # (floor_scale, attn_scale)
    attn_sinks: bool = False  # gpt-oss: a learned per-head logit that takes softmax mass and no value
    # Scalars (Granite): embeddings ×, each residual branch ×, logits ÷.
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    logits_scaling: float = 1.0
    lm_head_bias: bool = False
    # Routed experts.
    num_experts: int = 0
    top_k: int = 0
    expert_intermediate_size: int = 0
    expert_bias: bool = False
    expert_activation: ExpertActivation = SILU
    dense_activation: ExpertActivation = SILU  # the dense layers' MLP (Nemotron-H: squared ReLU, as its experts)
    norm_topk_prob: bool = True
    moe_layers: tuple[bool, ...] = ()  # per layer: True = MoE block, False = dense MLP
    gate_logits_bias: bool = False  # gpt-oss: the router linear has a bias
    gate_fp32: bool = False  # router matmul in fp32 (DeepSeek-V3, GLM-4.5), as transformers does
    moe_input_scaled: bool = False  # Llama 4: the routing weight scales the expert's input, not its output
    # Nemotron 3 Super's latent MoE: the router projects each token to moe_latent_size before the routed experts
    # and back after them, so the rows sent to the workers (and the experts' up / down) are that narrow;
    # 0: the experts work at hidden_size. Gate and shared expert read the full hidden state either way.
    moe_latent_size: int = 0
    # Dense MLP for non-MoE layers, shared expert beside routed ones (qwen2_moe).
    dense_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    shared_expert_gate: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # Gating variants (defaults: plain softmax top-k).
    scoring: str = "softmax"
    n_group: int = 1
    topk_group: int = 1
    group_score: str = "max"
    routed_scaling_factor: float = 1.0
    gate_jitter: float = 0.0  # sparsemixer's jitter_eps
    # Multi-head latent attention (DeepSeek); attention="mha" ignores these.
    attention: str = "mha"
    q_lora_rank: int = 0  # 0: q comes from one projection
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    rope_interleave: bool = False  # rotary on interleaved pairs (DeepSeek) instead of halves
    # DeepSeek Sparse Attention (DeepSeek-V3.2, GLM-5): a lightning indexer per layer picks the
    # index_topk cached tokens each query attends to; 0: dense attention.
    index_topk: int = 0
    index_n_heads: int = 0
    index_head_dim: int = 0
    index_rope_interleave: bool = False  # the indexer's rotary: halves (V3.2) or interleaved pairs (GLM-5)
    # DeepSeek-V4 (attention="dsv4"): one shared K=V head of head_dim beside a sliding window; per layer a
    # compression ratio (0: window only; with an indexer when it is csa_ratio) whose compressed entries use
    # compress_rope; a grouped low-rank output (o_groups groups to o_lora_rank each); hc_mult residual
    # streams (hyper-connections); hash routing on the hash_layers (a token id -> experts table).
    compress_ratios: tuple[int, ...] = ()
    csa_ratio: int = 0  # the ratio whose layers select compressed entries with an indexer
    compress_rope: Rope | None = None
    o_groups: int = 0
    o_lora_rank: int = 0
    hc_mult: int = 0  # 0: one residual stream, as every other family
    hc_sinkhorn_iters: int = 0
    hc_eps: float = 0.0
    hash_layers: tuple[bool, ...] = ()
    # Hybrid models (Qwen3-Next, Qwen3.5/3.6): per layer True = gated DeltaNet linear attention, which keeps a
    # fixed-size recurrent state and a short convolution state per sequence instead of KV-cache entries;
    # () = every layer attends.
    linear_layers: tuple[bool, ...] = ()
    linear_num_key_heads: int = 0
    linear_num_value_heads: int = 0
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    linear_conv_kernel: int = 0
    # "deltanet" (Qwen3-Next) | "mamba2" (Nemotron-H, Granite 4.0-H) | "mamba" (Mamba-1: Jamba): the kind of
    # every linear layer.
    linear_kind: str = "deltanet"
    # Mamba-2: ssm_heads heads of ssm_head_dim, B and C shared within ssm_groups groups, a state of
    # ssm_state_size per head channel; the convolution (over x, B, C) has linear_conv_kernel taps and a bias;
    # prefill scans in chunks of ssm_chunk; a step's dt is clamped to [ssm_dt_min, ssm_dt_max] in the chunked form.
    ssm_heads: int = 0
    ssm_head_dim: int = 0
    ssm_groups: int = 0
    ssm_state_size: int = 0
    ssm_chunk: int = 0
    ssm_dt_min: float = 0.0
    ssm_dt_max: float = float("inf")
    # Mamba-1: ssm_inner channels, each with a state of ssm_state_size; the step size has rank ssm_dt_rank.
    ssm_inner: int = 0
    ssm_dt_rank: int = 0
    # Nemotron-H's blocks hold one part each: per layer False = no mixer (attention / linear) part, or no
    # MLP / MoE part; () = every layer has both.
    mixer_layers: tuple[bool, ...] = ()
    mlp_layers: tuple[bool, ...] = ()
    attn_output_gate: bool = False  # q_proj also yields a sigmoid gate on each attention output channel
    norm_unit_offset: bool = False  # RMSNorm weights stored zero-centred and applied as (1 + w)
    # Gemma 4: per layer attention geometry (its full-attention layers have their own head_dim, kv heads and
    # rope; () = head_dim, num_kv_heads and rope everywhere), values taken from the key projection on some
    # layers (attention_k_eq_v), values RMS-normed per head without a weight, logits soft-capped; its decoder
    # layer runs a dense MLP beside the routed experts with norms around each (cluster.model.parallel).
    layer_head_dims: tuple[int, ...] = ()
    layer_kv_heads: tuple[int, ...] = ()
    layer_ropes: tuple[Rope, ...] = ()
    value_from_key: tuple[bool, ...] = ()
    v_norm: bool = False
    final_logit_softcapping: float | None = None
    parallel_dense: bool = False
    dense_activation: ExpertActivation = SILU  # the dense MLP's activation (Gemma 4: GELU-tanh)

    @property
    def gating(self) -> Gating:
        return Gating(self.top_k, self.norm_topk_prob, self.scoring, self.n_group, self.topk_group,
                      self.group_score, self.routed_scaling_factor, self.gate_jitter)

    @property
    def moe_layer_ids(self) -> tuple[int, ...]:
        return tuple(layer for layer, is_moe in enumerate(self.moe_layers) if is_moe)

    def experts(self) -> list[tuple[int, int]]:
        """Every (layer, expert_id) slot of the model."""
        return [(layer, e) for layer in self.moe_layer_ids for e in range(self.num_experts)]

    def sliding_window(self, layer: int) -> int | None:
        return self.sliding_windows[layer] if self.sliding_windows else None

    def attention_chunk(self, layer: int) -> int | None:
        return self.attention_chunks[layer] if self.attention_chunks else None

    def compress_ratio(self, layer: int) -> int:
        return self.compress_ratios[layer] if self.compress_ratios else 0

    def hash_routed(self, layer: int) -> bool:
        return bool(self.hash_layers) and self.hash_layers[layer]

    def is_linear(self, layer: int) -> bool:
        return bool(self.linear_layers) and self.linear_layers[layer]

    def has_mixer(self, layer: int) -> bool:
        return self.mixer_layers[layer] if self.mixer_layers else True

    def has_mlp(self, layer: int) -> bool:
        return self.mlp_layers[layer] if self.mlp_layers else True

    @property
    def hybrid(self) -> bool:
        """Some layers carry recurrent state per sequence (linear attention)."""
        return any(self.linear_layers)

    @property
    def attention_layer_ids(self) -> tuple[int, ...]:
        """Layers whose keys and values go to the paged KV cache."""
        return tuple(layer for layer in range(self.num_layers) if self.has_mixer(layer) and not self.is_linear(layer))

    @property
    def linear_layer_ids(self) -> tuple[int, ...]:
        return tuple(layer for layer in range(self.num_layers) if self.is_linear(layer))

    def head_dim_of(self, layer: int) -> int:
        return self.layer_head_dims[layer] if self.layer_head_dims else self.head_dim

    def kv_heads_of(self, layer: int) -> int:
        return self.layer_kv_heads[layer] if self.layer_kv_heads else self.num_kv_heads

    def rope_of(self, layer: int) -> Rope:
        return self.layer_ropes[layer] if self.layer_ropes else self.rope

    def value_is_key(self, layer: int) -> bool:
        return bool(self.value_from_key) and self.value_from_key[layer]

    def rotates(self, layer: int) -> bool:
        return self.rope_layers[layer] if self.rope_layers else True

    @property
    def expert_row_size(self) -> int:
        """Values in one routed row (what dispatch sends an expert and gets back): the one width the experts'
        weights, the workers' checks, the transports and the planner use."""
        return self.moe_latent_size or self.hidden_size

    def row_bytes(self, dtype: torch.dtype) -> int:
        """Bytes of one routed row at `dtype`, one way."""
        return self.expert_row_size * dtype.itemsize

    @property
    def expert_params(self) -> int:
        """Parameters of one routed expert: gate, up, down (+ their biases)."""
        d, i = self.expert_row_size, self.expert_intermediate_size
        if not self.expert_activation.gated:  # up and down only (Nemotron-H's squared-ReLU experts)
            return 2 * d * i + (i + d if self.expert_bias else 0)
        return 3 * d * i + (2 * i + d if self.expert_bias else 0)

    def expert_bytes(self, dtype: torch.dtype) -> int:
        """Bytes one routed expert takes at `dtype` (what a worker slot costs)."""
        return self.expert_params * dtype.itemsize

    @property
    def context_limit(self) -> int:
        """The longest context the model is made for (rope scaling included)."""
        return max([r.context_limit() for r in (self.rope, *self.layer_ropes)] + [self.max_position_embeddings])
