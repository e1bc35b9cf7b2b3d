"""Paged attention through FlashInfer (the `gpu` extra): decode and prefill read the KV pages in place.

The cache's flat slots of a layer are FlashInfer's NHD pages: [num_blocks, block_size, H_kv, hd]. A
sequence's page table is read off its context slots (the slot at every block_size-th position, divided by
block_size); its last page holds (len - 1) % block_size + 1 tokens. FlashInfer's plan builds its schedule on
the host, so there is one plan per step, micro-batch, kind (decode / prefill) and window, reused by every
layer that shares them; the wrappers are kept and re-planned (two sets: the overlap's two micro-batches
alternate per layer). Windows: ours keeps the last `window` positions, FlashInfer's window_left counts
the keys left of the query, so window_left = window - 1 (as vLLM sets it).
Shapes: T rows, H heads, H_kv kv heads, hd head dim, B decoding sequences, n prefill rows.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import replace

import torch
from torch import Tensor

from cluster.model.attention_backend import flashinfer_declines
from cluster.model.batch import Batch
from cluster.model.kv_cache import KVCache

WORKSPACE_BYTES = 128 << 20  # FlashInfer's float workspace (split-kv partials), shared by its wrappers
KEPT_BATCHES = 2  # plans kept for this many batches: the overlap's two micro-batches alternate per layer


def page_table(contexts: list[int], slots: list[Tensor], block_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """FlashInfer's CSR page table of sequences with `contexts` tokens whose context slots are `slots`:
    indptr [B + 1] and last_page_len [B] (int32, host), indices [pages] (int32, the slots' device)."""
    pages = [-(-n // block_size) for n in contexts]
    indptr = torch.tensor([0] + pages, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    last = torch.tensor([(n - 1) % block_size + 1 for n in contexts], dtype=torch.int32)
    indices = torch.cat([s[:n * block_size:block_size] // block_size for s, n in zip(slots, pages)])
    return indptr, indices.to(torch.int32), last


class FlashInferAttention:
    def __init__(self, device: torch.device):
        import flashinfer  # the `gpu` extra; attention_backend.choose_backend checked it imports

        self.fi = flashinfer
        self.workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self.held: list[Batch | None] = [None] * KEPT_BATCHES  # the batch each slot's wrappers are planned for
        self.next_slot = 0
        self.wrappers: dict[tuple, object] = {}  # (kind, window, kv heads, head dim, slot) → a wrapper, re-planned per batch
        self.planned: dict[tuple, tuple[Batch, Tensor | None]] = {}  # same keys → (its batch, prefill rows)
        self.calls: Counter[str] = Counter()  # layers attended here, per kind

    def attend(self, q: Tensor, out: Tensor, batch: Batch, cache: KVCache, layer: int, scale: float | None,
               window: int | None, sinks: Tensor | None, chunk: int | None) -> Batch:
        """Attend what FlashInfer covers of `batch` into out [T, H, hd]; return the rest, for SDPA."""
        if flashinfer_declines(q.dtype, cache.k.dtype, q.shape[-1], sinks is not None, chunk, False):
            return batch
        kv = tuple(t.view(cache.num_blocks, cache.block_size, *t.shape[1:]) for t in cache.layer(layer))
        d, rest = batch.decode, batch
        graph = not batch.chunks  # a CUDA graph's static batch (cuda_graphs.py): a plan cannot be captured
        if d is not None and not graph:
            wrapper, _ = self._planned(batch, "decode", window, scale, q, cache, kv[0].shape[2])
            out[d.rows] = wrapper.run(q[d.rows], kv)
            rest = replace(rest, decode=None)
        if batch.prefills:
            wrapper, rows = self._planned(batch, "prefill", window, scale, q, cache, kv[0].shape[2])
            out[rows] = wrapper.run(q[rows], kv)
            rest = replace(rest, chunks=tuple(c for c in rest.chunks if c.num_tokens == 1))
        return rest

    def _slot(self, batch: Batch) -> int:
        """The wrapper slot of `batch`: its own if it has one, else the one held longest."""
        for i, held in enumerate(self.held):
            if held is batch:
                return i
        slot, self.next_slot = self.next_slot, (self.next_slot + 1) % KEPT_BATCHES
        self.held[slot] = batch
        return slot

    def _planned(self, batch: Batch, kind: str, window: int | None, scale: float | None, q: Tensor,
                 cache: KVCache, kv_heads: int) -> tuple[object, Tensor | None]:
        """The wrapper for this batch, kind, window and head shape (Gemma 4's layers differ in it), planned
        for it the first time a layer asks."""
        key = (kind, window, kv_heads, q.shape[2], self._slot(batch))
        self.calls[kind] += 1
        done = self.planned.get(key)
        if done is not None and done[0] is batch:
            return self.wrappers[key], done[1]
        common = dict(window_left=-1 if window is None else window - 1, sm_scale=scale,
                      q_data_type=q.dtype, kv_data_type=cache.k.dtype)
        heads, head_dim = q.shape[1], q.shape[2]
        rows = None
        if kind == "decode":
            chunks = [c for c in batch.chunks if c.num_tokens == 1]  # the decode group's order
            wrapper = self.wrappers.get(key) or self.fi.BatchDecodeWithPagedKVCacheWrapper(
                self.workspace, "NHD", use_tensor_cores=heads // kv_heads > 4)  # vLLM's rule
            indptr, indices, last = page_table([c.context_len for c in chunks], list(batch.decode.context_slots),
                                               cache.block_size)
            wrapper.plan(indptr, indices, last, heads, kv_heads, head_dim, cache.block_size, **common)
        else:
            chunks = list(batch.prefills)
            wrapper = self.wrappers.get(key) or self.fi.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD")
            qo = torch.tensor([0] + [c.num_tokens for c in chunks], dtype=torch.int32).cumsum(0, dtype=torch.int32)
            indptr, indices, last = page_table([c.context_len for c in chunks], [c.context_slots for c in chunks],
                                               cache.block_size)
            wrapper.plan(qo, indptr, indices, last, heads, kv_heads, head_dim, cache.block_size, causal=True,
                         **common)
            rows = torch.cat([torch.arange(c.start, c.start + c.num_tokens) for c in chunks]).to(q.device)
        self.wrappers[key], self.planned[key] = wrapper, (batch, rows)
        return wrapper, rows
