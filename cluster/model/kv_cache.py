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


def kv_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """Cache bytes one token takes over all attention layers at `dtype`."""
    (hk, dk), (hv, dv) = entry_shapes(cfg)
    return len(cfg.attention_layer_ids) * (hk * dk + hv * dv) * dtype.itemsize


class KVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, k_shape: tuple[int, int],
                 v_shape: tuple[int, int], dtype=torch.float32, device: str = "cpu",
                 layers: tuple[int, ...] | None = None, states: StateCache | None = None):
        """layers: the model layers these rows cache, in order (None: layer i in row i)."""
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"KV cache: need at least one block of at least one token "
                             f"(got {num_blocks} blocks of {block_size})")
        slots = num_blocks * block_size
        self.k = torch.zeros((num_layers, slots, *k_shape), dtype=dtype, device=device)
        self.v = torch.zeros((num_layers, slots, *v_shape), dtype=dtype, device=device)
        self.num_blocks, self.block_size = num_blocks, block_size
        self.blocks = BlockPool(num_blocks)  # who holds which block; prefix caching's names
        self._row = None if layers is None else {layer: i for i, layer in enumerate(layers)}
        self.states = states  # linear-attention state per sequence (hybrid models), else None

    @classmethod
    def for_model(cls, cfg: ModelConfig, num_blocks: int, block_size: int = 16, dtype=torch.float32,
                  device: str = "cpu", num_state_slots: int = 1) -> "KVCache":
        """num_state_slots: sequences that can run at once, for a hybrid model's recurrent state."""
        layers = cfg.attention_layer_ids
        states = StateCache.for_model(cfg, num_state_slots, dtype, device) if cfg.hybrid else None
        return cls(len(layers), num_blocks, block_size, *entry_shapes(cfg), dtype=dtype, device=device,
                   layers=layers if cfg.hybrid else None, states=states)

    @classmethod
    def for_budget(cls, cfg: ModelConfig, budget_bytes: int, block_size: int = 16, dtype=torch.float32,
                   device: str = "cpu", max_num_seqs: int = 1) -> "KVCache":
        """As many blocks as `budget_bytes` holds; for a hybrid model first a recurrent-state slot per
        sequence (up to max_num_seqs, each with room for at least one block beside it)."""
        per_block = kv_bytes_per_token(cfg, dtype) * block_size
        per_seq = state_bytes_per_seq(cfg, dtype)
        if budget_bytes < per_block + per_seq:
            raise ValueError(f"KV cache: a budget of {budget_bytes} bytes does not hold one block "
                             f"({per_block} bytes: {block_size} tokens)"
                             + (f" and one sequence's recurrent state ({per_seq} bytes)" if per_seq else ""))
        seqs = min(max_num_seqs, budget_bytes // (per_block + per_seq)) if per_seq else 1
        return cls.for_model(cfg, (budget_bytes - seqs * per_seq) // per_block, block_size, dtype, device, seqs)

    @property
    def bytes_per_token(self) -> int:
        """Cache bytes one token takes, over all attention layers."""
        return self.k[:, 0].nbytes + self.v[:, 0].nbytes

    @property
    def nbytes(self) -> int:
        """KV blocks and recurrent state together."""
        return self.k.nbytes + self.v.nbytes + (self.states.nbytes if self.states is not None else 0)

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

    def write(self, layer: int, slots: Tensor, k: Tensor, v: Tensor) -> None:
        """slots [T]: the cache slot of each new token; k, v [T, H_kv, hd]."""
        row = layer if self._row is None else self._row[layer]
        self.k[row, slots] = k.to(self.k.dtype)
        self.v[row, slots] = v.to(self.v.dtype)

    def gather(self, layer: int, slots: Tensor) -> tuple[Tensor, Tensor]:
        """slots [B, C] → k, v [B, H_kv, C, hd] (the layout attention wants)."""
        row = layer if self._row is None else self._row[layer]
        return self.k[row, slots].transpose(1, 2), self.v[row, slots].transpose(1, 2)
