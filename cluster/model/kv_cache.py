"""Slot-based KV cache: one preallocated row of max_len positions per running sequence.

Shapes: S slots, L max_len, H_kv kv heads, hd head_dim. Stored [layers, S, H_kv, L, hd] so
a read is already in the layout attention wants (no transpose copy).
"""
from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    def __init__(self, num_layers: int, num_slots: int, max_len: int, num_kv_heads: int, head_dim: int,
                 dtype=torch.float32, device: str = "cpu"):
        shape = (num_layers, num_slots, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.free_slots = list(range(num_slots - 1, -1, -1))

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
