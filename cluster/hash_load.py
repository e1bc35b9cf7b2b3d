"""Expert load of hash-routed layers from token-id frequencies alone. Pure, no Ray.

On a hash-routed layer (DeepSeek-V4's first MoE layers) a fixed table `tid2eid` [V, K] names the K
experts of each token id: the gate's scores only weigh them. So the load such a layer will see is a
function of the token ids, and a vocabulary frequency table (counted from representative text with
the model's tokenizer) predicts it exactly, with no traffic recorded. Layers with a learned gate
cannot be predicted that way: a profile built here gives them an even load (no information), which
static placement (`cluster.eplb`) treats as balanced.

Shapes: V vocabulary, K experts per token, E experts, L MoE layers.
"""
from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np


def token_frequencies(token_ids: Iterable[int], vocab_size: int) -> np.ndarray:
    """[V] how often each token id occurs. Raises ValueError for an id outside the vocabulary
    (a tokenizer that does not belong to the model)."""
    ids = np.fromiter(token_ids, dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        bad = int(ids.max() if ids.max() >= vocab_size else ids.min())
        raise ValueError(f"token id {bad} is outside the model's vocabulary of {vocab_size}: "
                         "is the tokenizer the model's own?")
    return np.bincount(ids, minlength=vocab_size).astype(float)


def hash_layer_load(table: np.ndarray, frequencies: np.ndarray, num_experts: int) -> np.ndarray:
    """One hash layer's expert load [E]: each occurrence of token t is a row for each expert of
    table[t] ([V, K] expert ids). Raises ValueError when the shapes or ids do not fit."""
    table = np.asarray(table)
    frequencies = np.asarray(frequencies, dtype=float)
    if table.ndim != 2 or frequencies.shape != (table.shape[0],):
        raise ValueError(f"tid2eid {table.shape} and frequencies {frequencies.shape} do not match: "
                         "one row of expert ids per token id")
    if table.size and (table.min() < 0 or table.max() >= num_experts):
        raise ValueError(f"tid2eid names expert {int(table.max())}, outside 0..{num_experts - 1}")
    if not np.all(np.isfinite(frequencies)) or frequencies.min(initial=0) < 0:
        raise ValueError("token frequencies must be finite and ≥ 0")
    weights = np.repeat(frequencies, table.shape[1])  # [V * K]: a row per (token, chosen expert)
    return np.bincount(table.reshape(-1), weights=weights, minlength=num_experts)


def profile_loads(tables: Mapping[int, np.ndarray], frequencies: np.ndarray, moe_layers: Iterable[int],
                  num_experts: int, top_k: int) -> np.ndarray:
    """[L, E] a load profile over every MoE layer: hash layers (`tables`: MoE layer → tid2eid) exact,
    the others an even share of the same rows (tokens × top_k / E each). Raises ValueError when no
    MoE layer is hash-routed (nothing to plan from text) or a table names a layer that is not MoE."""
    layers = list(moe_layers)
    if not tables:
        raise ValueError("the model has no hash-routed layer: a learned gate's load cannot be known from text "
                         "(record live traffic with `moe-cluster record-profile --url`)")
    stray = sorted(set(tables) - set(layers))
    if stray:
        raise ValueError(f"hash tables for layers {stray}, which are not MoE layers {layers}")
    even = float(np.sum(frequencies)) * top_k / num_experts
    return np.stack([hash_layer_load(tables[layer], frequencies, num_experts) if layer in tables
                     else np.full(num_experts, even) for layer in layers])
