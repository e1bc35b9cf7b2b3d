"""Fill our weight containers from a checkpoint, using the family's name table.

`load_experts` is the partial loader: it reads only the requested
(layer, expert_id) tensors, which is what an expert worker does.
"""
from __future__ import annotations

import sys
from typing import Callable, Iterable

import torch

from cluster.checkpoint import Checkpoint, CheckpointError
from cluster.config import ModelConfig
from cluster.families import Family, get_family
from cluster.model.weights import AttentionWeights, BackboneWeights, LayerWeights, MLAWeights, MLPWeights

Progress = Callable[[int, int], None]


def open_model(path: str) -> tuple[Checkpoint, Family, ModelConfig]:
    ckpt = Checkpoint(path)
    family = get_family(ckpt.config.get("model_type"))
    return ckpt, family, family.parse_config(ckpt.config)


def stderr_progress(what: str) -> Progress:
    """A one-line progress bar on stderr (model loading can take minutes on big checkpoints)."""
    def show(done: int, total: int) -> None:
        end = "\n" if done == total else ""
        print(f"\r{what}: {done}/{total} layers ({100 * done // max(total, 1)}%)", end=end, file=sys.stderr, flush=True)
    return show


class _Reader:
    def __init__(self, ckpt: Checkpoint, family: Family, dtype: torch.dtype, device: str):
        self.ckpt, self.family, self.dtype, self.device = ckpt, family, dtype, device

    def name(self, ours: str, layer: int | None = None, expert_id: int | None = None) -> str:
        return self.family.tensor_name(ours, layer, expert_id)

    def get(self, ours: str, shape: tuple[int, ...], layer: int | None = None, expert_id: int | None = None):
        return self.ckpt.read(self.name(ours, layer, expert_id), shape, self.dtype).to(self.device)

    def maybe(self, ours: str, shape: tuple[int, ...], layer: int | None = None):
        if ours not in self.family.tensors or not self.ckpt.has(self.name(ours, layer)):
            return None
        return self.get(ours, shape, layer)

    def mlp(self, prefix: str, inter: int, hidden: int, layer: int, expert_id: int | None = None) -> MLPWeights:
        gate = self.get(f"{prefix}_gate", (inter, hidden), layer, expert_id)
        up = self.get(f"{prefix}_up", (inter, hidden), layer, expert_id)
        down = self.get(f"{prefix}_down", (hidden, inter), layer, expert_id)
        return MLPWeights(torch.cat([gate, up]), down)


def _attention(r: _Reader, cfg: ModelConfig, layer: int) -> AttentionWeights:
    d, hd, h, kvh = cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
    bias = (lambda name, n: r.get(name, (n,), layer)) if cfg.qkv_bias else (lambda name, n: None)
    norm_shapes = {"none": (None, None), "head": ((hd,), (hd,)), "full": ((h * hd,), (kvh * hd,))}[cfg.qk_norm]
    return AttentionWeights(
        q=r.get("q_proj", (h * hd, d), layer), k=r.get("k_proj", (kvh * hd, d), layer),
        v=r.get("v_proj", (kvh * hd, d), layer), o=r.get("o_proj", (d, h * hd), layer),
        q_bias=bias("q_bias", h * hd), k_bias=bias("k_bias", kvh * hd), v_bias=bias("v_bias", kvh * hd),
        q_norm=r.get("q_norm", norm_shapes[0], layer) if norm_shapes[0] else None,
        k_norm=r.get("k_norm", norm_shapes[1], layer) if norm_shapes[1] else None,
    )


def _mla(r: _Reader, cfg: ModelConfig, layer: int) -> MLAWeights:
    d, h = cfg.hidden_size, cfg.num_heads
    q_dim = h * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
    q = {"q": r.get("q_proj", (q_dim, d), layer)} if not cfg.q_lora_rank else {
        "q_a": r.get("q_a_proj", (cfg.q_lora_rank, d), layer),
        "q_a_norm": r.get("q_a_norm", (cfg.q_lora_rank,), layer),
        "q_b": r.get("q_b_proj", (q_dim, cfg.q_lora_rank), layer)}
    return MLAWeights(
        kv_a=r.get("kv_a_proj", (cfg.kv_lora_rank + cfg.qk_rope_head_dim, d), layer),
        kv_a_norm=r.get("kv_a_norm", (cfg.kv_lora_rank,), layer),
        kv_b=r.get("kv_b_proj", (h * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank), layer),
        o=r.get("o_proj", (d, h * cfg.v_head_dim), layer), **q)


def _layer(r: _Reader, cfg: ModelConfig, layer: int) -> LayerWeights:
    d = cfg.hidden_size
    moe = cfg.moe_layers[layer]
    shared = None
    if moe and cfg.shared_expert_intermediate_size:
        shared = r.mlp("shared", cfg.shared_expert_intermediate_size, d, layer)
    return LayerWeights(
        attn_norm=r.get("attn_norm", (d,), layer),
        attn=_mla(r, cfg, layer) if cfg.attention == "mla" else _attention(r, cfg, layer),
        mlp_norm=r.get("mlp_norm", (d,), layer),
        router=r.get("router", (cfg.num_experts, d), layer) if moe else None,
        router_bias=r.maybe("router_bias", (cfg.num_experts,), layer) if moe else None,
        dense=None if moe else r.mlp("dense", cfg.dense_intermediate_size, d, layer),
        shared=shared,
        shared_router=r.get("shared_router", (1, d), layer) if shared is not None and cfg.shared_expert_gate else None,
    )


def load_backbone(ckpt: Checkpoint, family: Family, cfg: ModelConfig, dtype=torch.float32,
                  device: str = "cpu", progress: Progress | None = None) -> BackboneWeights:
    r = _Reader(ckpt, family, dtype, device)
    v, d = cfg.vocab_size, cfg.hidden_size
    embed = r.get("embed", (v, d))
    layers = []
    for layer in range(cfg.num_layers):
        layers.append(_layer(r, cfg, layer))
        if progress:
            progress(layer + 1, cfg.num_layers)
    lm_head = embed if cfg.tie_word_embeddings and not ckpt.has(r.name("lm_head")) else r.get("lm_head", (v, d))
    return BackboneWeights(embed, r.get("final_norm", (d,)), lm_head, tuple(layers))


def load_experts(ckpt: Checkpoint, family: Family, cfg: ModelConfig, pairs: Iterable[tuple[int, int]],
                 dtype=torch.float32, device: str = "cpu") -> dict[tuple[int, int], MLPWeights]:
    """Only the given (layer, expert_id) experts; nothing else is read from disk."""
    r = _Reader(ckpt, family, dtype, device)
    out = {}
    for layer, expert_id in pairs:
        if not (0 <= layer < cfg.num_layers and cfg.moe_layers[layer] and 0 <= expert_id < cfg.num_experts):
            raise CheckpointError(f"{ckpt.root}: no expert {expert_id} in layer {layer} of this model")
        out[(layer, expert_id)] = r.mlp("expert", cfg.expert_intermediate_size, cfg.hidden_size, layer, expert_id)
    return out
