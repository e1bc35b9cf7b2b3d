"""Sizing (memory and capacity, what `moe-cluster plan` prints) from config.json alone, before any
weights are downloaded. Not placement: `plan` alone means a placement plan (`cluster.rebalance.plan`).

For a deployment of one router (the backbone: embeddings, attention, norms,
gates, shared experts, LM head, and the KV cache) and N expert workers (the
routed experts, spread evenly), each on a GPU of `gpu_memory_bytes`:
parameters total and active per token, FLOPs per token, bytes per process at
the serving dtype, KV-cache bytes per token and the tokens that fit, spare
expert copies per worker, and whether it fits at all.

Counts are of parameters as transformers counts them (sum of p.numel();
buffers such as DeepSeek's e_score_correction_bias are not parameters), active
= everything but the routed experts + top_k of them per MoE layer. Byte figures
are what our processes hold: FP8 / MXFP4 checkpoints are dequantised to the
serving dtype at load, gates (and their selection bias) stay fp32 where
transformers keeps them so, as do gpt-oss's norms.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from cluster.config import ModelConfig
from cluster.families import resolve
from cluster.model.kv_cache import kv_bytes_per_token
from cluster.model.state_cache import conv_channels, state_bytes_per_seq, state_shapes
from cluster.precision import dtype_name, resolve_dtype, resolve_kv_dtype

GiB = 1 << 30
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kib": 1 << 10, "kb": 10**3, "m": 1 << 20, "mib": 1 << 20, "mb": 10**6,
          "g": GiB, "gib": GiB, "gb": 10**9, "t": 1 << 40, "tib": 1 << 40, "tb": 10**12}


def parse_bytes(text: str) -> int:
    """'80GiB', '80G' (binary), '80GB' (decimal), '1.5TiB', '1024' → bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"--gpu-memory: cannot read {text!r} as a size (e.g. 80GiB, 80GB, 141G)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _v4_layer_params(c: ModelConfig, layer: int) -> int:
    """DeepSeek-V4's attention (with its compressor and indexer) and its two hyper-connections."""
    d, h, hd, ql, n = c.hidden_size, c.num_heads, c.head_dim, c.q_lora_rank, c.hc_mult
    params = d * ql + ql + ql * h * hd + d * hd + hd + h * hd * c.o_lora_rank + c.o_groups * c.o_lora_rank * d + h
    ratio = c.compress_ratio(layer)
    if ratio:
        width = hd * (2 if ratio == c.csa_ratio else 1)
        params += 2 * d * width + ratio * width + hd
    if ratio and ratio == c.csa_ratio:
        hi, di = c.index_n_heads, c.index_head_dim
        params += 4 * d * di + 2 * ratio * di + di + ql * hi * di + d * hi
    return params + 2 * ((2 + n) * n * (n * d + 1) + 3)


def _deltanet_params(c: ModelConfig) -> int:
    d, hv, dv = c.hidden_size, c.linear_num_value_heads, c.linear_value_head_dim
    channels = conv_channels(c)
    return d * channels + d * hv * dv + 2 * d * hv + channels * c.linear_conv_kernel + 2 * hv + dv + hv * dv * d


def _mamba2_params(c: ModelConfig) -> int:
    """in_proj (z, x, B, C, dt), the convolution and its bias, A_log, dt_bias, D, the gated norm, out_proj."""
    d, h, inner, channels = c.hidden_size, c.ssm_heads, c.ssm_heads * c.ssm_head_dim, conv_channels(c)
    return d * (inner + channels + h) + channels * (c.linear_conv_kernel + 1) + 3 * h + inner + inner * d


def _mamba_params(c: ModelConfig) -> int:
    """Mamba-1: in_proj (x, z), the convolution and its bias, x_proj, the dt / B / C norms, dt_proj and its bias,
    A_log, D, out_proj."""
    d, i, n, rank = c.hidden_size, c.ssm_inner, c.ssm_state_size, c.ssm_dt_rank
    norms = rank + 2 * n
    return 2 * i * d + i * (c.linear_conv_kernel + 1) + (rank + 2 * n) * i + norms + i * (rank + 1) + i * n + i + i * d


def _mlp_params(c: ModelConfig, inter: int, gated: bool) -> int:
    return (3 if gated else 2) * c.hidden_size * inter


def _attention_params(c: ModelConfig, layer: int = 0) -> int:
    d, h = c.hidden_size, c.num_heads
    if not c.has_mixer(layer):
        return 0
    if c.attention == "dsv4":
        return _v4_layer_params(c, layer)
    if c.is_linear(layer):
        return {"mamba2": _mamba2_params, "mamba": _mamba_params}.get(c.linear_kind, _deltanet_params)(c)
    if c.attention == "mla":
        qk = c.qk_nope_head_dim + c.qk_rope_head_dim
        q = d * h * qk if not c.q_lora_rank else d * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * h * qk
        kv = d * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank + c.kv_lora_rank * h * (
            c.qk_nope_head_dim + c.v_head_dim)
        hi, di = c.index_n_heads, c.index_head_dim
        indexer = c.q_lora_rank * hi * di + d * di + 2 * di + d * hi if c.index_topk else 0
        return q + kv + h * c.v_head_dim * d + indexer
    hd = c.head_dim_of(layer)
    q, kv = h * hd, c.kv_heads_of(layer) * hd
    values = 0 if c.value_is_key(layer) else d * kv  # Gemma 4's k = v layers have no v_proj
    weights = 2 * d * q + d * kv + values + (q + 2 * kv if c.qkv_bias else 0) + (d if c.o_bias else 0) + (
        d * q if c.attn_output_gate else 0)
    norms = {"none": 0, "l2": 0, "head": 2 * hd, "full": q + kv}[c.qk_norm]
    return weights + norms + (h if c.attn_sinks else 0)


def _layer_params(c: ModelConfig, layer: int) -> int:
    """Everything of one layer but its routed experts."""
    d = c.hidden_size
    norms = _norms(c, layer) * d * (2 if c.norm == "layer" and c.norm_bias else 1)
    if not c.has_mlp(layer):
        return _attention_params(c, layer) + norms
    dense = _mlp_params(c, c.dense_intermediate_size, c.dense_activation.gated)
    if not c.moe_layers[layer]:
        return _attention_params(c, layer) + norms + dense
    gate = c.num_experts * d + (c.num_experts if c.gate_logits_bias else 0)
    shared = _mlp_params(c, c.shared_expert_intermediate_size, c.expert_activation.gated) + (
        d if c.shared_expert_gate else 0)
    parallel = dense + d + c.num_experts if c.parallel_dense else 0  # Gemma 4: its MLP, router scale, per_expert_scale
    latent = 2 * d * c.moe_latent_size  # Nemotron 3 Super: the router's projections into the experts' rows and back
    return _attention_params(c, layer) + norms + gate + shared + parallel + latent


def _norms(c: ModelConfig, layer: int) -> int:
    """A layer's RMS/LayerNorm weights of hidden size: one before each part it has (Nemotron-H's blocks have
    one part), and Gemma 4's five more (after attention, around each parallel branch, after the MLP)."""
    return int(c.has_mixer(layer)) + int(c.has_mlp(layer)) + (5 if c.parallel_dense else 0)


@dataclass(frozen=True)
class ParamCounts:
    embedding: int
    backbone: int  # the router's parameters: all but the routed experts
    expert: int  # one routed expert
    routed_experts: int  # all of them
    total: int
    active: int  # per token

    @classmethod
    def of(cls, c: ModelConfig) -> "ParamCounts":
        d, v = c.hidden_size, c.vocab_size
        head = 0 if c.tie_word_embeddings else v * d
        final_norm = d * (2 if c.norm == "layer" and c.norm_bias else 1)
        backbone = v * d + head + (v if c.lm_head_bias else 0) + final_norm + sum(
            _layer_params(c, layer) for layer in range(c.num_layers))
        moe = len(c.moe_layer_ids)
        routed = moe * c.num_experts * c.expert_params
        return cls(v * d, backbone, c.expert_params, routed, backbone + routed,
                   backbone + moe * c.top_k * c.expert_params)


def backbone_bytes(c: ModelConfig, dtype: torch.dtype) -> int:
    """What the router holds for weights at `dtype`: the loader keeps gates fp32 where transformers
    computes them in fp32, DeepSeek-V3 / GLM's selection bias (a buffer, so no parameter) fp32, and
    gpt-oss's and Gemma 4's norms fp32."""
    gates = len(c.moe_layer_ids) * c.num_experts
    selection_bias = gates if c.scoring in ("sigmoid", "sqrtsoftplus") else 0
    qk_norms = sum(2 * c.head_dim_of(layer) for layer in c.attention_layer_ids) if c.qk_norm == "head" else 0
    fp32 = selection_bias + (gates * c.hidden_size if c.gate_fp32 else 0) + (
        (sum(_norms(c, layer) for layer in range(c.num_layers)) + 1) * c.hidden_size + qk_norms if c.norm_fp32 else 0)
    layer_scalars = c.num_layers if c.parallel_dense else 0  # Gemma 4's: buffers, so no parameters either
    held = ParamCounts.of(c).backbone + selection_bias + layer_scalars
    return (held - fp32) * dtype.itemsize + fp32 * 4


def _compressed_seen(c: ModelConfig, layer: int, context: int) -> int:
    """DeepSeek-V4: the compressed entries a token attends beside its window (CSA: the indexer's top-k)."""
    ratio = c.compress_ratio(layer)
    if not ratio:
        return 0
    entries = context // ratio
    return min(entries, c.index_topk) if ratio == c.csa_ratio else entries


def attention_flops(c: ModelConfig, context: int) -> int:
    """Score and value FLOPs for one token attending to `context` tokens, over all layers; a linear-attention
    layer's are the same at any context: its state [Hv, dk, dv] decayed, read, written and read again."""
    def widths(layer: int) -> int:  # dk + dv
        if c.attention == "mla":
            return c.qk_nope_head_dim + c.qk_rope_head_dim + c.v_head_dim
        return 2 * c.head_dim_of(layer)

    # a chunk of n positions sees n / 2 keys on average, at most n: counted as n (an upper bound)
    seen = {layer: min(context, c.sliding_window(layer) or c.attention_chunk(layer) or context)
            + _compressed_seen(c, layer, context) for layer in c.attention_layer_ids}
    # the state decayed, written and read (and read once more by the delta rule): 2 FLOPs per entry each
    _, shape = state_shapes(c)
    linear = (8 if c.linear_kind == "deltanet" else 6) * math.prod(shape) * len(c.linear_layer_ids) if c.hybrid else 0
    return sum(2 * c.num_heads * widths(layer) * n for layer, n in seen.items()) + linear


@dataclass(frozen=True)
class Sizing:
    model_type: str
    dtype: str
    kv_cache_dtype: str
    quantization: str
    total_params: int
    active_params: int
    embedding_params: int
    backbone_params: int
    expert_params: int
    routed_expert_count: int
    flops_per_token: int  # 2 x active matmul parameters (the embedding lookup is no matmul)
    attention_flops_per_token_at_max_len: int
    router_weight_bytes: int
    expert_bytes: int
    workers: int
    experts_per_worker: int
    worker_expert_bytes: int
    kv_bytes_per_token: int
    kv_budget_bytes: int
    kv_tokens: int
    full_length_sequences: int
    max_model_len: int
    max_num_seqs: int
    spare_expert_copies_per_worker: int
    gpu_memory_bytes: int
    gpu_memory_utilization: float
    fits: bool
    reasons: tuple[str, ...]
    state_bytes_per_seq: int = 0  # linear-attention layers' recurrent + conv state, whatever the length
    # One routed row between the router and a worker, one way (ModelConfig.row_bytes: latent-wide for Nemotron 3
    # Super), and what a token moves over all MoE layers: top_k rows out and back per layer.
    row_bytes: int = 0
    routed_bytes_per_token: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def size(c: ModelConfig, *, dtype: torch.dtype, kv_dtype: torch.dtype, workers: int, gpu_memory_bytes: int,
         max_model_len: int, max_num_seqs: int, gpu_memory_utilization: float = 0.9, block_size: int = 16) -> Sizing:
    counts, usable = ParamCounts.of(c), int(gpu_memory_bytes * gpu_memory_utilization)
    slots = len(c.moe_layer_ids) * c.num_experts
    per_worker = math.ceil(slots / workers) if workers else 0
    expert_bytes = c.expert_bytes(dtype)
    router = backbone_bytes(c, dtype) + (0 if workers else slots * expert_bytes)  # no workers: all in-process
    per_token, per_seq = kv_bytes_per_token(c, kv_dtype), state_bytes_per_seq(c, kv_dtype)
    row = c.row_bytes(dtype)
    budget = max(0, usable - router)
    tokens = max(0, budget - max_num_seqs * per_seq) // (per_token * block_size) * block_size  # states first
    reasons = []
    if router > usable:
        reasons.append(f"the router's weights ({router / GiB:.1f} GiB) exceed {gpu_memory_utilization:.0%} of its GPU "
                       f"({usable / GiB:.1f} GiB)" + ("" if workers else ": spread the experts over --workers"))
    elif tokens < max_model_len:
        reasons.append(f"the KV cache holds {tokens} tokens, fewer than one sequence of max_model_len {max_model_len}")
    if workers and per_worker * expert_bytes > usable:
        reasons.append(f"{per_worker} experts per worker take {per_worker * expert_bytes / GiB:.1f} GiB, more than "
                       f"{usable / GiB:.1f} GiB: use more workers")
    return Sizing(c.model_type, dtype_name(dtype), dtype_name(kv_dtype), c.quantization.method, counts.total,
                counts.active, counts.embedding, counts.backbone, counts.expert, slots,
                2 * (counts.active - counts.embedding), attention_flops(c, max_model_len), router, expert_bytes,
                workers, per_worker, per_worker * expert_bytes, per_token, budget, tokens, tokens // max_model_len,
                max_model_len, max_num_seqs,
                max(0, (usable - per_worker * expert_bytes) // expert_bytes) if workers else 0,
                gpu_memory_bytes, gpu_memory_utilization, not reasons, tuple(reasons), per_seq,
                row_bytes=row, routed_bytes_per_token=2 * c.top_k * len(c.moe_layer_ids) * row)


def bytes_text(n: float) -> str:
    for unit, scale in (("TiB", 1 << 40), ("GiB", GiB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def format_sizing(p: Sizing) -> str:
    """The sizing as a few lines a person reads."""
    stored = "" if p.quantization == "none" else f" (stored {p.quantization}, dequantised at load)"
    lines = [
        f"model: {p.model_type}, weights {p.dtype}{stored}, KV cache {p.kv_cache_dtype}",
        f"parameters: {p.total_params / 1e9:.2f} B total, {p.active_params / 1e9:.2f} B active per token",
        f"FLOPs per token: {p.flops_per_token / 1e9:.1f} GFLOP in matmuls, + {p.attention_flops_per_token_at_max_len / 1e9:.1f}"
        f" GFLOP attention at {p.max_model_len} tokens of context",
        f"router (backbone: embeddings, attention, norms, gates, shared experts, LM head): "
        f"{p.backbone_params / 1e9:.2f} B params, {bytes_text(p.router_weight_bytes)}",
        f"experts: {p.routed_expert_count} routed, {p.expert_params / 1e6:.1f} M params = {bytes_text(p.expert_bytes)} each; "
        + (f"{p.workers} worker{'s' if p.workers != 1 else ''} hold up to {p.experts_per_worker} each = {bytes_text(p.worker_expert_bytes)} per worker"
           if p.workers else "no workers: the router holds them all"),
        f"KV cache: {bytes_text(p.kv_bytes_per_token)} per token; {bytes_text(p.kv_budget_bytes)} left on the router's "
        f"{bytes_text(p.gpu_memory_bytes)} GPU at {p.gpu_memory_utilization:.0%}: {p.kv_tokens:,} tokens = "
        f"{p.full_length_sequences} sequences of {p.max_model_len} (max_num_seqs {p.max_num_seqs})"
        + (f", after {p.max_num_seqs} sequences' recurrent state of {bytes_text(p.state_bytes_per_seq)} each"
           if p.state_bytes_per_seq else ""),
    ]
    if p.workers:
        lines.append(f"spare expert copies per worker: {p.spare_expert_copies_per_worker}")
        lines.append(f"routed rows: {bytes_text(p.row_bytes)} each way; {bytes_text(p.routed_bytes_per_token)} per "
                     f"token to and from the workers, all MoE layers")
    lines.append("fits: yes" if p.fits else "fits: no: " + "; ".join(p.reasons))
    return "\n".join(lines)


def model_config(model: str) -> ModelConfig:
    """The model's config from a checkpoint directory or its config.json alone."""
    path = Path(model)
    path = path / "config.json" if path.is_dir() else path
    if not path.exists():
        raise ValueError(f"{path}: not found (give a checkpoint directory or its config.json)")
    family, text = resolve(json.loads(path.read_text()))
    return family.parse_config(text)


def sizing_from_config(model: str, *, dtype: str = "auto", kv_cache_dtype: str = "auto", workers: int = 1,
                       gpu_memory: str = "80GiB", gpu_memory_utilization: float = 0.9, max_model_len: int | None = None,
                       max_num_seqs: int = 64) -> Sizing:
    """`model`: a checkpoint directory or its config.json; nothing else is read."""
    cfg = model_config(model)
    if workers < 0:
        raise ValueError("--workers: must be ≥ 0")
    weights = resolve_dtype(dtype, "cuda", cfg.checkpoint_dtype)  # planned for GPUs: auto = the checkpoint's
    return size(cfg, dtype=weights, kv_dtype=resolve_kv_dtype(kv_cache_dtype, weights), workers=workers,
                gpu_memory_bytes=parse_bytes(gpu_memory), max_model_len=max_model_len or cfg.context_limit,
                max_num_seqs=max_num_seqs, gpu_memory_utilization=gpu_memory_utilization)
