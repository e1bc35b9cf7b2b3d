"""Slot-based KV cache: one preallocated row of max_len positions per running sequence.

Shapes: S slots, L max_len, H_kv kv heads, hd head_dim. Stored [layers, S, H_kv, L, hd] so
a read is already in the layout attention wants (no transpose copy).
For multi-head latent attention the two tensors hold the compressed latent
([1, L, kv_lora_rank]) and the shared rotary key ([1, L, qk_rope_head_dim]):
the cache stays as small as the design intends.
"""
from __future__ import annotations

import torch
from torch import Tensor

from cluster.config import ModelConfig


def entry_shapes(cfg: ModelConfig) -> tuple[tuple[int, int], tuple[int, int]]:
    """(heads, dim) of the two cached tensors per token and layer."""
    if cfg.attention == "mla":
        return (1, cfg.kv_lora_rank), (1, cfg.qk_rope_head_dim)
    return (cfg.num_kv_heads, cfg.head_dim), (cfg.num_kv_heads, cfg.head_dim)


class KVCache:
    def __init__(self, num_layers: int, num_slots: int, max_len: int, k_shape: tuple[int, int],
                 v_shape: tuple[int, int], dtype=torch.float32, device: str = "cpu"):
        self.k = torch.zeros((num_layers, num_slots, k_shape[0], max_len, k_shape[1]), dtype=dtype, device=device)
        self.v = torch.zeros((num_layers, num_slots, v_shape[0], max_len, v_shape[1]), dtype=dtype, device=device)
        self.max_len = max_len
        self.free_slots = list(range(num_slots - 1, -1, -1))

    @classmethod
    def for_model(cls, cfg: ModelConfig, num_slots: int, max_len: int, device: str = "cpu") -> "KVCache":
        return cls(cfg.num_layers, num_slots, max_len, *entry_shapes(cfg), device=device)

    @property
    def bytes_per_token(self) -> int:
        """Cache bytes one token takes, over all layers."""
        return (self.k[:, 0, :, 0].nbytes + self.v[:, 0, :, 0].nbytes)

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def allocate(self) -> int:
        return self.free_slots.pop()

    def release(self, slot: int) -> None:
        self.free_slots.append(slot)

    def write(self, layer: int, slots: Tensor, positions: Tensor, k: Tensor, v: Tensor) -> None:
        self.k[layer, slots, :, positions] = k  # [T, H_kv, hd]
        self.v[layer, slots, :, positions] = v

    def read(self, layer: int, slots: Tensor, length: int) -> tuple[Tensor, Tensor]:
        return self.k[layer, slots, :, :length], self.v[layer, slots, :, :length]  # [B, H_kv, length, hd]
