"""Fill our weight containers from a checkpoint, using the family's name table.

`load_experts` is the partial loader: it reads only the requested
(layer, expert_id) tensors (or rows of a fused [E, ...] tensor), which is what
an expert worker does. Every tensor is read as stored, moved to its device and
converted (or dequantised) there to the serving dtype, one at a time.
"""
from __future__ import annotations

import sys
from typing import Callable, Iterable

import torch

from cluster.checkpoint import Checkpoint, CheckpointError
from cluster.config import ModelConfig
from cluster.families import Family, relocate, resolve
from cluster.model.state_cache import conv_channels
from cluster.model.weights import (SILU, AttentionWeights, BackboneWeights, CompressorWeights, DeltaNetWeights,
                                   ExpertActivation, HyperWeights, IndexerWeights, LayerWeights, Mamba2Weights,
                                   MambaWeights, MLAWeights, MLPWeights, ParallelWeights, V4AttentionWeights)
from cluster.precision import resolve_dtype
from cluster.quant import read_weight

Progress = Callable[[int, int], None]


def open_model(path: str) -> tuple[Checkpoint, Family, ModelConfig]:
    ckpt = Checkpoint(path)
    family, text = resolve(ckpt.config)
    return ckpt, relocate(family, ckpt.config, ckpt.has), family.parse_config(text)


def stderr_progress(what: str) -> Progress:
    """A one-line progress bar on stderr (model loading can take minutes on big checkpoints)."""
    def show(done: int, total: int) -> None:
        end = "\n" if done == total else ""
        print(f"\r{what}: {done}/{total} layers ({100 * done // max(total, 1)}%)", end=end, file=sys.stderr, flush=True)
    return show


class _Reader:
    def __init__(self, ckpt: Checkpoint, family: Family, cfg: ModelConfig, dtype, device: str):
        self.ckpt, self.family, self.cfg, self.device = ckpt, family, cfg, device
        self.dtype = resolve_dtype(dtype, device, cfg.checkpoint_dtype)

    def name(self, ours: str, layer: int | None = None, expert_id: int | None = None) -> str:
        return self.family.tensor_name(ours, layer, expert_id)

    def get(self, ours: str, shape: tuple[int, ...], layer: int | None = None, expert_id: int | None = None,
            dtype: torch.dtype | None = None, index: int | None = None) -> torch.Tensor:
        return read_weight(self.ckpt, self.cfg.quantization, self.name(ours, layer, expert_id), shape,
                           dtype or self.dtype, self.device, index)

    def maybe(self, ours: str, shape: tuple[int, ...], layer: int | None = None, dtype: torch.dtype | None = None):
        if ours not in self.family.tensors or not self.ckpt.has(self.name(ours, layer)):
            return None
        return self.get(ours, shape, layer, dtype=dtype)

    def norm(self, ours: str, dim: int, layer: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A norm's weight (fp32 where the family keeps it so) and its bias (LayerNorm)."""
        dtype = torch.float32 if self.cfg.norm_fp32 else None
        has_bias = self.cfg.norm == "layer" and self.cfg.norm_bias
        bias = self.get(ours + "_bias", (dim,), layer, dtype=dtype) if has_bias else None
        return self.offset(self.get(ours, (dim,), layer, dtype=dtype)), bias

    def offset(self, weight: torch.Tensor) -> torch.Tensor:
        """A zero-centred RMSNorm weight (Qwen3-Next) as the (1 + w) it is applied as, in fp32 (transformers
        scales in fp32, then casts)."""
        return weight.float() + 1.0 if self.cfg.norm_unit_offset else weight

    def mlp(self, prefix: str, inter: int, hidden: int, layer: int, expert_id: int | None = None,
            activation: ExpertActivation = SILU) -> MLPWeights:
        """gate and up rows (one [2I, D] tensor where the family stores them fused: Granite's shared MLP; up
        alone for a non-gated MLP: Nemotron-H), then down."""
        get = lambda name, shape: self.get(f"{prefix}_{name}", shape, layer, expert_id)  # noqa: E731
        if f"{prefix}_gate_up" in self.family.tensors:
            first = get("gate_up", (2 * inter, hidden))
        elif activation.gated:
            first = torch.cat([get("gate", (inter, hidden)), get("up", (inter, hidden))])
        else:
            first = get("up", (inter, hidden))
        return MLPWeights(first, get("down", (hidden, inter)), activation=activation)


def _fused_expert(r: _Reader, layer: int, expert_id: int) -> MLPWeights:
    """One expert's rows of the fused [E, ...] tensors, in nn.Linear layout with gate rows first."""
    cfg, layout = r.cfg, r.family.experts
    d, i = cfg.expert_row_size, cfg.expert_intermediate_size
    flip = (lambda shape: shape[::-1]) if layout.transposed else (lambda shape: shape)
    gate_up = r.get("expert_gate_up", flip((2 * i, d)), layer, index=expert_id)
    down = r.get("expert_down", flip((d, i)), layer, index=expert_id)
    if layout.transposed:
        gate_up, down = gate_up.t(), down.t()
    bias_up = r.get("expert_gate_up_bias", (2 * i,), layer, index=expert_id) if cfg.expert_bias else None
    bias_down = r.get("expert_down_bias", (d,), layer, index=expert_id) if cfg.expert_bias else None
    if layout.interleaved:  # gate/up pairs → gate rows then up rows
        gate_up = torch.cat([gate_up[0::2], gate_up[1::2]])
        bias_up = None if bias_up is None else torch.cat([bias_up[0::2], bias_up[1::2]])
    return MLPWeights(gate_up.contiguous(), down.contiguous(), bias_up, bias_down, cfg.expert_activation)


def _row_block_expert(r: _Reader, layer: int, expert_id: int) -> MLPWeights:
    """One expert's I rows of each [E * I, D] tensor (DBRX; its down projection stored transposed)."""
    cfg = r.cfg
    d, i = cfg.expert_row_size, cfg.expert_intermediate_size

    def rows(ours: str) -> torch.Tensor:
        r.ckpt.view_stacked(r.name(ours, layer), cfg.num_experts)
        return r.get(ours, (i, d), layer, index=expert_id)

    gate_up = torch.cat([rows("expert_gate"), rows("expert_up")])
    return MLPWeights(gate_up, rows("expert_down").t().contiguous(), activation=cfg.expert_activation)


def _expert(r: _Reader, layer: int, expert_id: int) -> MLPWeights:
    if r.family.experts.row_blocks:
        return _row_block_expert(r, layer, expert_id)
    if r.family.experts.fused:
        return _fused_expert(r, layer, expert_id)
    cfg = r.cfg
    return r.mlp("expert", cfg.expert_intermediate_size, cfg.expert_row_size, layer, expert_id, cfg.expert_activation)


def _attention(r: _Reader, cfg: ModelConfig, layer: int) -> AttentionWeights:
    d, hd, h, kvh = cfg.hidden_size, cfg.head_dim_of(layer), cfg.num_heads, cfg.kv_heads_of(layer)
    bias = (lambda name, n: r.get(name, (n,), layer)) if cfg.qkv_bias else (lambda name, n: None)
    norm_shapes = {"none": (None, None), "l2": (None, None), "head": ((hd,), (hd,)),
                   "full": ((h * hd,), (kvh * hd,))}[cfg.qk_norm]
    norm_dtype = torch.float32 if cfg.norm_fp32 else None  # fp32 norms scale in fp32, then cast (Gemma 4)
    gate = None
    if cfg.attn_output_gate:  # q_proj gives per head hd query rows, then hd gate rows
        q_gate = r.get("q_proj", (h * 2 * hd, d), layer).view(h, 2, hd, d)
        q, gate = q_gate[:, 0].reshape(h * hd, d), q_gate[:, 1].reshape(h * hd, d)
        k, v = r.get("k_proj", (kvh * hd, d), layer), r.get("v_proj", (kvh * hd, d), layer)
    elif "qkv_proj" in r.family.tensors:  # one fused projection (DBRX's Wqkv): q rows, then k, then v
        qkv = r.get("qkv_proj", ((h + 2 * kvh) * hd, d), layer).split([h * hd, kvh * hd, kvh * hd])
        q, k, v = (t.contiguous() for t in qkv)
    else:  # Gemma 4's attention_k_eq_v layers have no v_proj: the values are the keys' projection
        q, k = r.get("q_proj", (h * hd, d), layer), r.get("k_proj", (kvh * hd, d), layer)
        v = None if cfg.value_is_key(layer) else r.get("v_proj", (kvh * hd, d), layer)
    return AttentionWeights(
        q=q, k=k, v=v, o=r.get("o_proj", (d, h * hd), layer),
        q_bias=bias("q_bias", h * hd), k_bias=bias("k_bias", kvh * hd), v_bias=bias("v_bias", kvh * hd),
        o_bias=r.get("o_bias", (d,), layer) if cfg.o_bias else None,
        q_norm=r.offset(r.get("q_norm", norm_shapes[0], layer, dtype=norm_dtype)) if norm_shapes[0] else None,
        k_norm=r.offset(r.get("k_norm", norm_shapes[1], layer, dtype=norm_dtype)) if norm_shapes[1] else None,
        sinks=r.get("sinks", (h,), layer) if cfg.attn_sinks else None, gate=gate,
    )


def _deltanet(r: _Reader, cfg: ModelConfig, layer: int) -> DeltaNetWeights:
    """Gated DeltaNet's projections, from Qwen3-Next's fused in_proj_qkvz / in_proj_ba (grouped per key
    head: q, k, then that head's value heads' v and z; b then a) or Qwen3.5's separate in_proj_qkv / z / b / a."""
    d, hk, hv, dk, dv = (cfg.hidden_size, cfg.linear_num_key_heads, cfg.linear_num_value_heads,
                         cfg.linear_key_head_dim, cfg.linear_value_head_dim)
    r_v, channels = hv // hk, 2 * hk * dk + hv * dv
    if r.ckpt.has(r.name("linear_qkvz", layer)):
        qkvz = r.get("linear_qkvz", (channels + hv * dv, d), layer).view(hk, 2 * dk + 2 * r_v * dv, d)
        q, k, v, z = qkvz.split([dk, dk, r_v * dv, r_v * dv], dim=1)
        qkv = torch.cat([q.reshape(-1, d), k.reshape(-1, d), v.reshape(-1, d)])
        b, a = r.get("linear_ba", (2 * hv, d), layer).view(hk, 2 * r_v, d).split([r_v, r_v], dim=1)
        z, b, a = z.reshape(-1, d), b.reshape(-1, d), a.reshape(-1, d)
    else:
        qkv, z = r.get("linear_qkv", (channels, d), layer), r.get("linear_z", (hv * dv, d), layer)
        b, a = r.get("linear_b", (hv, d), layer), r.get("linear_a", (hv, d), layer)
    fp32 = torch.float32  # transformers computes the decay in fp32 from them
    return DeltaNetWeights(
        qkv=qkv.contiguous(), z=z.contiguous(), b=b.contiguous(), a=a.contiguous(),
        conv=r.get("linear_conv", (channels, 1, cfg.linear_conv_kernel), layer)[:, 0].contiguous(),
        a_log=r.get("linear_a_log", (hv,), layer, dtype=fp32),
        dt_bias=r.get("linear_dt_bias", (hv,), layer, dtype=fp32),
        norm=r.get("linear_norm", (dv,), layer), out=r.get("linear_out", (d, hv * dv), layer))


def _mamba2(r: _Reader, cfg: ModelConfig, layer: int) -> Mamba2Weights:
    """Mamba-2's in_proj holds z, then x, B, C (the convolution's channels), then dt rows."""
    d, h, inner = cfg.hidden_size, cfg.ssm_heads, cfg.ssm_heads * cfg.ssm_head_dim
    channels, fp32 = conv_channels(cfg), torch.float32  # transformers computes A, dt and D in fp32
    z, xbc, dt = r.get("ssm_in", (inner + channels + h, d), layer).split([inner, channels, h])
    return Mamba2Weights(
        z=z.contiguous(), xbc=xbc.contiguous(), dt=dt.contiguous(),
        conv=r.get("ssm_conv", (channels, 1, cfg.linear_conv_kernel), layer)[:, 0].contiguous(),
        conv_bias=r.maybe("ssm_conv_bias", (channels,), layer),
        a_log=r.get("ssm_a_log", (h,), layer, dtype=fp32), dt_bias=r.get("ssm_dt_bias", (h,), layer, dtype=fp32),
        d=r.get("ssm_d", (h,), layer, dtype=fp32), norm=r.get("ssm_norm", (inner,), layer),
        out=r.get("ssm_out", (d, inner), layer))


def _mamba(r: _Reader, cfg: ModelConfig, layer: int) -> MambaWeights:
    """Mamba-1's in_proj holds x rows, then z rows."""
    d, i, n, rank, fp32 = cfg.hidden_size, cfg.ssm_inner, cfg.ssm_state_size, cfg.ssm_dt_rank, torch.float32
    x, z = r.get("ssm_in", (2 * i, d), layer).split([i, i])
    return MambaWeights(
        x=x.contiguous(), z=z.contiguous(),
        conv=r.get("ssm_conv", (i, 1, cfg.linear_conv_kernel), layer)[:, 0].contiguous(),
        conv_bias=r.maybe("ssm_conv_bias", (i,), layer), x_proj=r.get("ssm_x_proj", (rank + 2 * n, i), layer),
        dt_norm=r.get("ssm_dt_norm", (rank,), layer), b_norm=r.get("ssm_b_norm", (n,), layer),
        c_norm=r.get("ssm_c_norm", (n,), layer), dt_proj=r.get("ssm_dt_proj", (i, rank), layer),
        dt_bias=r.get("ssm_dt_bias", (i,), layer, dtype=fp32), a_log=r.get("ssm_a_log", (i, n), layer, dtype=fp32),
        d=r.get("ssm_d", (i,), layer, dtype=fp32), out=r.get("ssm_out", (d, i), layer))


_LINEAR = {"mamba2": _mamba2, "mamba": _mamba}  # by ModelConfig.linear_kind; else gated DeltaNet


def _mixer(r: _Reader, cfg: ModelConfig, layer: int):
    if not cfg.has_mixer(layer):
        return None
    if cfg.is_linear(layer):
        return _LINEAR.get(cfg.linear_kind, _deltanet)(r, cfg, layer)
    return _ATTENTION.get(cfg.attention, _attention)(r, cfg, layer)


def _mla(r: _Reader, cfg: ModelConfig, layer: int) -> MLAWeights:
    d, h = cfg.hidden_size, cfg.num_heads
    q_dim = h * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
    q = {"q": r.get("q_proj", (q_dim, d), layer)} if not cfg.q_lora_rank else {
        "q_a": r.get("q_a_proj", (cfg.q_lora_rank, d), layer),
        "q_a_norm": r.get("q_a_norm", (cfg.q_lora_rank,), layer),
        "q_b": r.get("q_b_proj", (q_dim, cfg.q_lora_rank), layer)}
    return MLAWeights(
        indexer=_indexer(r, cfg, layer) if cfg.index_topk else None,
        kv_a=r.get("kv_a_proj", (cfg.kv_lora_rank + cfg.qk_rope_head_dim, d), layer),
        kv_a_norm=r.get("kv_a_norm", (cfg.kv_lora_rank,), layer),
        kv_b=r.get("kv_b_proj", (h * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank), layer),
        o=r.get("o_proj", (d, h * cfg.v_head_dim), layer), **q)


def _indexer(r: _Reader, cfg: ModelConfig, layer: int) -> IndexerWeights:
    d, hi, di = cfg.hidden_size, cfg.index_n_heads, cfg.index_head_dim
    return IndexerWeights(
        q=r.get("index_q", (hi * di, cfg.q_lora_rank), layer), k=r.get("index_k", (di, d), layer),
        k_norm=r.get("index_k_norm", (di,), layer), k_norm_bias=r.get("index_k_norm_bias", (di,), layer),
        head_weights=r.get("index_weights", (hi, d), layer, dtype=torch.float32))  # fp32, as transformers keeps it


def _compressor(r: _Reader, prefix: str, layer: int, dim: int, ratio: int, overlap: bool) -> CompressorWeights:
    width, fp32 = dim * (2 if overlap else 1), torch.float32  # transformers keeps position_bias in fp32
    d = r.cfg.hidden_size
    return CompressorWeights(kv=r.get(f"{prefix}_kv", (width, d), layer), gate=r.get(f"{prefix}_gate", (width, d), layer),
                             position_bias=r.get(f"{prefix}_ape", (ratio, width), layer, dtype=fp32),
                             norm=r.get(f"{prefix}_norm", (dim,), layer, dtype=fp32))


def _v4_attention(r: _Reader, cfg: ModelConfig, layer: int) -> V4AttentionWeights:
    d, h, hd, g = cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.o_groups
    ratio, fp32 = cfg.compress_ratio(layer), torch.float32
    csa = bool(ratio) and ratio == cfg.csa_ratio
    return V4AttentionWeights(
        q_a=r.get("q_a_proj", (cfg.q_lora_rank, d), layer), q_a_norm=r.get("q_a_norm", (cfg.q_lora_rank,), layer, dtype=fp32),
        q_b=r.get("q_b_proj", (h * hd, cfg.q_lora_rank), layer), kv=r.get("kv_proj", (hd, d), layer),
        kv_norm=r.get("kv_norm", (hd,), layer, dtype=fp32), o_a=r.get("o_a_proj", (g * cfg.o_lora_rank, h * hd // g), layer),
        o_b=r.get("o_b_proj", (d, g * cfg.o_lora_rank), layer), sinks=r.get("sinks", (h,), layer, dtype=fp32),
        compressor=_compressor(r, "compressor", layer, hd, ratio, csa) if ratio else None,
        indexer=_compressor(r, "index_compressor", layer, cfg.index_head_dim, ratio, True) if csa else None,
        index_q=r.get("index_q", (cfg.index_n_heads * cfg.index_head_dim, cfg.q_lora_rank), layer) if csa else None,
        index_weights=r.get("index_weights", (cfg.index_n_heads, d), layer) if csa else None)


def _hyper(r: _Reader, prefix: str, layer: int | None, mixes: int, scales: int) -> HyperWeights:
    """fp32, as transformers keeps the hyper-connections."""
    n, fp32 = r.cfg.hc_mult, torch.float32
    return HyperWeights(fn=r.get(f"{prefix}_fn", (mixes, n * r.cfg.hidden_size), layer, dtype=fp32),
                        base=r.get(f"{prefix}_base", (mixes,), layer, dtype=fp32),
                        scale=r.get(f"{prefix}_scale", (scales,), layer, dtype=fp32))


def _hyper_fields(r: _Reader, cfg: ModelConfig, layer: int) -> dict:
    if not cfg.hc_mult:
        return {}
    mixes = (2 + cfg.hc_mult) * cfg.hc_mult
    return dict(attn_hc=_hyper(r, "attn_hc", layer, mixes, 3), mlp_hc=_hyper(r, "mlp_hc", layer, mixes, 3))


def _gate(r: _Reader, cfg: ModelConfig, layer: int) -> dict:
    """The gate of a MoE layer: its weight (fp32 where transformers computes the logits in fp32),
    DeepSeek's selection bias (fp32) and gpt-oss's logits bias."""
    e, d = cfg.num_experts, cfg.hidden_size
    hashed = cfg.hash_routed(layer)
    return dict(gate=r.get("gate", (e, d), layer, dtype=torch.float32 if cfg.gate_fp32 else None),
                gate_bias=None if hashed else r.maybe("gate_bias", (e,), layer, dtype=torch.float32),
                hash_table=r.get("hash_table", (cfg.vocab_size, cfg.top_k), layer, dtype=torch.long) if hashed else None,
                gate_logits_bias=r.get("gate_logits_bias", (e,), layer) if cfg.gate_logits_bias else None)


def _latent(r: _Reader, cfg: ModelConfig, layer: int) -> dict:
    """Nemotron 3 Super's projections into the experts' row width and back: the router's, not the workers'."""
    if not cfg.moe_latent_size:
        return {}
    shape = (cfg.moe_latent_size, cfg.hidden_size)
    return dict(latent_in=r.get("latent_in", shape, layer), latent_out=r.get("latent_out", shape[::-1], layer))


def _parallel(r: _Reader, cfg: ModelConfig, layer: int) -> ParallelWeights:
    """Gemma 4's extra norms around its parallel dense MLP and routed experts."""
    d = cfg.hidden_size
    norms = {name: r.norm(name, d, layer)[0] for name in ("post_attn_norm", "dense_out_norm", "moe_in_norm",
                                                          "moe_out_norm", "post_mlp_norm")}
    return ParallelWeights(**norms, router_scale=r.get("router_scale", (d,), layer),
                           layer_scalar=r.get("layer_scalar", (1,), layer))


def _dense(r: _Reader, cfg: ModelConfig, layer: int) -> MLPWeights | None:
    """A dense layer's MLP, or the one beside the routed experts (Gemma 4)."""
    if not cfg.has_mlp(layer) or (cfg.moe_layers[layer] and not cfg.parallel_dense):
        return None
    return r.mlp("dense", cfg.dense_intermediate_size, cfg.hidden_size, layer, activation=cfg.dense_activation)


def _layer(r: _Reader, cfg: ModelConfig, layer: int) -> LayerWeights:
    d, mlp = cfg.hidden_size, cfg.has_mlp(layer)
    moe = mlp and cfg.moe_layers[layer]
    shared = None
    if moe and cfg.shared_expert_intermediate_size:  # with the routed experts' activation (V4 clamps both)
        shared = r.mlp("shared", cfg.shared_expert_intermediate_size, d, layer, activation=cfg.expert_activation)
    none = (None, None)
    attn_norm, attn_norm_bias = r.norm("attn_norm", d, layer) if cfg.has_mixer(layer) else none
    mlp_norm, mlp_norm_bias = r.norm("mlp_norm", d, layer) if mlp else none
    return LayerWeights(
        attn_norm=attn_norm, attn_norm_bias=attn_norm_bias, mlp_norm=mlp_norm, mlp_norm_bias=mlp_norm_bias,
        attn=_mixer(r, cfg, layer),
        **_hyper_fields(r, cfg, layer),
        **(_gate(r, cfg, layer) if moe else {}),
        **(_latent(r, cfg, layer) if moe else {}),
        dense=_dense(r, cfg, layer),
        expert_scale=r.maybe("expert_scale", (cfg.num_experts,), layer) if moe else None,
        parallel=_parallel(r, cfg, layer) if cfg.parallel_dense else None,
        shared=shared,
        shared_expert_gate=r.get("shared_expert_gate", (1, d), layer) if shared is not None and cfg.shared_expert_gate else None,
    )


_ATTENTION = {"mla": _mla, "dsv4": _v4_attention}


def load_backbone(ckpt: Checkpoint, family: Family, cfg: ModelConfig, dtype=None, device: str = "cpu",
                  progress: Progress | None = None) -> BackboneWeights:
    """Everything but the routed experts. dtype: a torch.dtype, a name, or None / "auto"."""
    r = _Reader(ckpt, family, cfg, dtype, device)
    v, d = cfg.vocab_size, cfg.hidden_size
    embed = r.get("embed", (v, d))
    layers = []
    for layer in range(cfg.num_layers):
        layers.append(_layer(r, cfg, layer))
        if progress:
            progress(layer + 1, cfg.num_layers)
    lm_head = embed if cfg.tie_word_embeddings and not ckpt.has(r.name("lm_head")) else r.get("lm_head", (v, d))
    final_norm, final_norm_bias = r.norm("final_norm", d)
    return BackboneWeights(embed, final_norm, lm_head, tuple(layers), final_norm_bias,
                           r.get("lm_head_bias", (v,)) if cfg.lm_head_bias else None,
                           _hyper(r, "hc_head", None, cfg.hc_mult, 1) if cfg.hc_mult else None)


def load_experts(ckpt: Checkpoint, family: Family, cfg: ModelConfig, pairs: Iterable[tuple[int, int]],
                 dtype=None, device: str = "cpu") -> dict[tuple[int, int], MLPWeights]:
    """Only the given (layer, expert_id) experts; nothing else is read from disk.
    dtype: a torch.dtype, a name, or None / "auto" (the checkpoint's dtype on a GPU, fp32 on a CPU)."""
    r = _Reader(ckpt, family, cfg, dtype, device)
    out = {}
    for layer, expert_id in pairs:
        if not (0 <= layer < cfg.num_layers and cfg.moe_layers[layer] and 0 <= expert_id < cfg.num_experts):
            raise CheckpointError(f"{ckpt.root}: no expert {expert_id} in layer {layer} of this model")
        out[(layer, expert_id)] = _expert(r, layer, expert_id)
    return out


def load_hash_tables(ckpt: Checkpoint, family: Family, cfg: ModelConfig) -> dict[int, torch.Tensor]:
    """{MoE layer: tid2eid [V, K]} of the hash-routed layers (DeepSeek-V4): read alone, nothing else."""
    r = _Reader(ckpt, family, cfg, torch.float32, "cpu")
    return {layer: r.get("hash_table", (cfg.vocab_size, cfg.top_k), layer, dtype=torch.long)
            for layer in cfg.moe_layer_ids if cfg.hash_routed(layer)}
