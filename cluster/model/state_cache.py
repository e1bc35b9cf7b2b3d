"""Recurrent state of the linear-attention layers: one fixed-size slot per running sequence.

A gated DeltaNet layer (Qwen3-Next) keeps, per sequence, a recurrent state [H_v, d_k, d_v]
and the last K - 1 inputs of its causal convolution [C, K - 1], whatever the sequence's
length; a Mamba-2 layer (Nemotron-H, Granite 4.0-H) a state [H, P, N] and its convolution's
[I + 2·G·N, K - 1]; a Mamba-1 layer (Jamba) [I, N] and [I, K - 1]. One model has one kind of
linear layer, so one pair of shapes (`state_shapes`). A sequence takes one slot when it joins
the batch and gives it back when it finishes or is preempted; a preempted sequence rebuilds its
state by recomputing its tokens (as its KV-cache blocks are). The slots come out of the same memory budget as the KV blocks.
The recurrent state is kept in fp32, as transformers' reference and the kernels keep it;
the convolution state in the activations' dtype.
Shapes: L linear layers, S slots, B sequences, C conv channels, K conv kernel.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from cluster.config import ModelConfig

RECURRENT_DTYPE = torch.float32


def conv_channels(cfg: ModelConfig) -> int:
    """The convolution's input channels: q, k and v (DeltaNet); x, B and C (Mamba-2); x (Mamba-1)."""
    if cfg.linear_kind == "mamba2":
        return cfg.ssm_heads * cfg.ssm_head_dim + 2 * cfg.ssm_groups * cfg.ssm_state_size
    if cfg.linear_kind == "mamba":
        return cfg.ssm_inner
    keys, values = cfg.linear_num_key_heads * cfg.linear_key_head_dim, cfg.linear_num_value_heads * cfg.linear_value_head_dim
    return 2 * keys + values


def state_shapes(cfg: ModelConfig) -> tuple[tuple[int, int], tuple[int, ...]]:
    """One linear layer's per-sequence conv state [C, K-1] and recurrent state shapes."""
    conv = (conv_channels(cfg), cfg.linear_conv_kernel - 1)
    if cfg.linear_kind == "mamba2":
        return conv, (cfg.ssm_heads, cfg.ssm_head_dim, cfg.ssm_state_size)
    if cfg.linear_kind == "mamba":
        return conv, (cfg.ssm_inner, cfg.ssm_state_size)
    return conv, (cfg.linear_num_value_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim)


def state_bytes_per_seq(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes of one sequence's state over all linear layers (0 for a model without them)."""
    if not cfg.hybrid:
        return 0
    conv, recurrent = state_shapes(cfg)
    per_layer = math.prod(conv) * dtype.itemsize + math.prod(recurrent) * RECURRENT_DTYPE.itemsize
    return len(cfg.linear_layer_ids) * per_layer


class StateCache:
    def __init__(self, layers: tuple[int, ...], num_slots: int, conv_shape: tuple[int, int],
                 recurrent_shape: tuple[int, ...], dtype=torch.float32, device: str = "cpu"):
        if num_slots < 1:
            raise ValueError(f"state cache: need at least one sequence slot (got {num_slots})")
        self.conv = torch.zeros((len(layers), num_slots, *conv_shape), dtype=dtype, device=device)
        self.recurrent = torch.zeros((len(layers), num_slots, *recurrent_shape), dtype=RECURRENT_DTYPE, device=device)
        self.num_slots = num_slots
        self._row = {layer: i for i, layer in enumerate(layers)}
        self._free = list(range(num_slots - 1, -1, -1))  # popped from the end: slot 0 first

    @classmethod
    def for_model(cls, cfg: ModelConfig, num_slots: int, dtype=torch.float32, device: str = "cpu") -> "StateCache":
        return cls(cfg.linear_layer_ids, num_slots, *state_shapes(cfg), dtype, device)

    @property
    def nbytes(self) -> int:
        return self.conv.nbytes + self.recurrent.nbytes

    @property
    def bytes_per_seq(self) -> int:
        return self.nbytes // self.num_slots

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise RuntimeError("state cache: no free sequence slot")
        return self._free.pop()

    def release(self, slot: int | None) -> None:
        if slot is not None:
            self._free.append(slot)

    def read(self, layer: int, slots: Tensor, fresh: Tensor | None) -> tuple[Tensor, Tensor]:
        """slots [B], fresh [B] (True: the sequence starts here, its state is zero; None: none does) →
        conv [B, C, K-1], recurrent [B, *recurrent shape]."""
        row = self._row[layer]
        conv, recurrent = self.conv[row, slots], self.recurrent[row, slots]
        if fresh is None:
            return conv, recurrent
        keep = (~fresh)[:, None]  # [B, 1]: per sequence, over its flattened state
        # where, not a product: a freed slot's old values must not leak in (not even as NaN * 0)
        return tuple(torch.where(keep, t.flatten(1), 0).view(t.shape) for t in (conv, recurrent))

    def write(self, layer: int, slots: Tensor, conv: Tensor, recurrent: Tensor) -> None:
        row = self._row[layer]
        self.conv[row, slots] = conv.to(self.conv.dtype)
        self.recurrent[row, slots] = recurrent.to(RECURRENT_DTYPE)
