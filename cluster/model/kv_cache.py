"""Paged KV cache: a pool of fixed-size blocks, sized from a memory budget.

A sequence owns a list of blocks (its block table); token p of it lives in
block table[p // block_size], at offset p % block_size. The pool is stored flat,
one row per (block, offset) "slot": [layers, num_blocks * block_size, H_kv, hd],
so writing a step's new tokens is one indexed store and reading a sequence's
context is one gather by slot.
For multi-head latent attention the two tensors hold the compressed latent
([1, R] per token) and the shared rotary key ([1, P]): the cache stays as small
as the design intends. With sparse attention (DSA) the second also carries the
indexer's key after the rotary key ([1, P + index_head_dim]): paged, budgeted
and freed with the rest.
DeepSeek-V4 keeps its one K=V row in the first and each token's compressor inputs in the second
(see cluster.model.dsv4_attention).
Layers whose entries differ in shape (Gemma 4: its full-attention layers have other head dims and kv
heads than its sliding ones) keep them in one pool per shape, all paged by the same block table.
Hybrid models (Qwen3-Next) keep keys and values for their attention layers only; their
linear-attention layers' per-sequence state lives in `states` (cluster.model.state_cache),
carved from the same budget.
Shapes: T new tokens, B sequences, C context, H_kv kv heads, hd head dim.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from cluster.config import ModelConfig
from cluster.model.block_pool import BlockPool
from cluster.model.state_cache import StateCache, state_bytes_per_seq


def raw_width(cfg: ModelConfig, layer: int) -> int:
    """Features of one token's compressor inputs on `layer` (0: a window-only layer)."""
    ratio = cfg.compress_ratio(layer)
    if not ratio:
        return 0
    if ratio == cfg.csa_ratio:  # overlapping windows: kv and gate twice as wide, plus the indexer's
        return 4 * cfg.head_dim + 4 * cfg.index_head_dim
    return 2 * cfg.head_dim


def entry_shapes(cfg: ModelConfig) -> tuple[tuple[int, int], tuple[int, int]]:
    """(heads, dim) of the two cached tensors per token and layer."""
    if cfg.attention == "dsv4":  # K=V, and the compressor inputs (cluster.model.dsv4_attention)
        return (1, cfg.head_dim), (1, max([raw_width(cfg, layer) for layer in range(cfg.num_layers)] + [1]))
    if cfg.attention == "mla":
        return (1, cfg.kv_lora_rank), (1, cfg.qk_rope_head_dim + cfg.index_head_dim)
    return (cfg.num_kv_heads, cfg.head_dim), (cfg.num_kv_heads, cfg.head_dim)


Shapes = tuple[tuple[int, int], tuple[int, int]]  # (heads, dim) of the key and of the value entry


def layer_shapes(cfg: ModelConfig, layer: int) -> Shapes:
    """(heads, dim) of the two cached tensors per token on `layer`."""
    if cfg.attention in ("dsv4", "mla"):
        return entry_shapes(cfg)
    kv = (cfg.kv_heads_of(layer), cfg.head_dim_of(layer))
    return kv, kv


def kv_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """Cache bytes one token takes over all attention layers at `dtype`."""
    shapes = [layer_shapes(cfg, layer) for layer in cfg.attention_layer_ids]
    return sum(hk * dk + hv * dv for (hk, dk), (hv, dv) in shapes) * dtype.itemsize


class KVCache:
    def __init__(self, shapes: dict[int, Shapes], num_blocks: int, block_size: int, dtype=torch.float32,
                 device: str = "cpu", states: StateCache | None = None):
        """shapes: each cached layer's entry shapes; layers of one shape share a pool, in layer order."""
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"KV cache: need at least one block of at least one token "
                             f"(got {num_blocks} blocks of {block_size})")
        slots = num_blocks * block_size
        groups: dict[Shapes, list[int]] = {}
        for layer in sorted(shapes):
            groups.setdefault(shapes[layer], []).append(layer)
        self.pools = [tuple(torch.zeros((len(layers), slots, *shape), dtype=dtype, device=device) for shape in kv)
                      for kv, layers in groups.items()]  # [(k, v)] per shape
        self._where = {layer: (g, row) for g, layers in enumerate(groups.values()) for row, layer in enumerate(layers)}
        self.k, self.v = self.pools[0]  # the one pool of every model with a single shape
        self.num_blocks, self.block_size = num_blocks, block_size
        self.blocks = BlockPool(num_blocks)  # who holds which block; prefix caching's names
        self.states = states  # linear-attention state per sequence (hybrid models), else None

    @classmethod
    def for_model(cls, cfg: ModelConfig, num_blocks: int, block_size: int = 16, dtype=torch.float32,
                  device: str = "cpu", num_state_slots: int = 1) -> "KVCache":
        """num_state_slots: sequences that can run at once, for a hybrid model's recurrent state."""
        states = StateCache.for_model(cfg, num_state_slots, dtype, device) if cfg.hybrid else None
        shapes = {layer: layer_shapes(cfg, layer) for layer in cfg.attention_layer_ids}
        return cls(shapes, num_blocks, block_size, dtype=dtype, device=device, states=states)

    @classmethod
    def for_budget(cls, cfg: ModelConfig, budget_bytes: int, block_size: int = 16, dtype=torch.float32,
                   device: str = "cpu", max_num_seqs: int = 1) -> "KVCache":
        """As many blocks as `budget_bytes` holds (budget_layout)."""
        blocks, slots = budget_layout(cfg, budget_bytes, block_size, dtype, max_num_seqs)
        return cls.for_model(cfg, blocks, block_size, dtype, device, slots)

    @property
    def bytes_per_token(self) -> int:
        """Cache bytes one token takes, over all attention layers."""
        return sum(k[:, 0].nbytes + v[:, 0].nbytes for k, v in self.pools)

    @property
    def nbytes(self) -> int:
        """KV blocks and recurrent state together."""
        kv = sum(k.nbytes + v.nbytes for k, v in self.pools)
        return kv + (self.states.nbytes if self.states is not None else 0)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def num_free_blocks(self) -> int:
        return self.blocks.num_free

    def blocks_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.block_size)

    def allocate(self, n: int) -> list[int]:
        return self.blocks.allocate(n)

    def release(self, blocks: list[int]) -> None:
        self.blocks.release(blocks)

    def layer(self, layer: int) -> tuple[Tensor, Tensor]:
        """`layer`'s keys and values, [slots, H_kv, hd] each (views into its pool)."""
        g, row = self._where[layer]
        k, v = self.pools[g]
        return k[row], v[row]

    def write(self, layer: int, slots: Tensor, k: Tensor, v: Tensor) -> None:
        """slots [T]: the cache slot of each new token; k, v [T, H_kv, hd]."""
        keys, values = self.layer(layer)
        keys[slots] = k.to(keys.dtype)
        values[slots] = v.to(values.dtype)

    def gather(self, layer: int, slots: Tensor) -> tuple[Tensor, Tensor]:
        """slots [B, C] → k, v [B, H_kv, C, hd] (the layout attention wants)."""
        keys, values = self.layer(layer)
        return keys[slots].transpose(1, 2), values[slots].transpose(1, 2)


def budget_layout(cfg: ModelConfig, budget_bytes: int, block_size: int = 16, dtype=torch.float32,
                  max_num_seqs: int = 1) -> tuple[int, int]:
    """(blocks, recurrent-state slots) a byte budget holds: for a hybrid model first a state slot per
    sequence (up to max_num_seqs, each with room for at least one block beside it), the rest in blocks."""
    per_block = kv_bytes_per_token(cfg, dtype) * block_size
    per_seq = state_bytes_per_seq(cfg, dtype)
    if budget_bytes < per_block + per_seq:
        raise ValueError(f"KV cache: a budget of {budget_bytes} bytes does not hold one block "
                         f"({per_block} bytes: {block_size} tokens)"
                         + (f" and one sequence's recurrent state ({per_seq} bytes)" if per_seq else ""))
    slots = min(max_num_seqs, budget_bytes // (per_block + per_seq)) if per_seq else 1
    return (budget_bytes - slots * per_seq) // per_block, slots
