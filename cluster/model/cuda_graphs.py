"""Decode steps replayed from CUDA graphs: one launch per step instead of hundreds from Python.

Shapes: B decoding sequences, C context, V vocab, K top-k; Bp, Cp their buckets.
A decode-only step has fixed shapes once B and C are fixed, and with in-process
grouped experts (counts stay on the device) nothing in it reads back to the host,
so it can be captured. One graph per (Bp, Cp) bucket, powers of two. The engine
captures the whole grid at start-up, largest first (as vLLM does: no capture, with its
synchronize and empty_cache, lands mid-serving; smaller graphs reuse the larger ones'
pool), up to `max_seqs` sequences and the context limit; a step with more sequences
runs eagerly. A bucket met before it was captured (no start-up capture, or graphs
dropped after a restack) is captured then, its warm-up being that step's real forward.
Captured graphs read the expert stacks' addresses: when in-process experts are added
or removed (a new stack version) they are all dropped. Padding rows repeat the last
real sequence (same token, position and cache slots): they write the same K/V to the
same slot and their outputs are dropped, so no cache slot is set aside for them. Context padding uses
slot 0, masked by the lengths as in every decode group.
What a graph cannot hold runs eagerly: prefills, logits of other rows, remote
experts or experts without grouped matmul, rope whose frequencies depend on the
sequence length (dynamic, longrope). The outputs are the graph's own buffers:
valid until the next step.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor

from cluster.model.batch import Batch, DecodeGroup
from cluster.model.experts import LocalExperts
from cluster.model.kv_cache import KVCache
from cluster.model.moe import Routing

log = logging.getLogger("cluster.engine")


def unsupported(model) -> str | None:
    """Why `model`'s decode steps cannot be captured, or None when they can."""
    if not torch.cuda.is_available():
        return "this machine has no CUDA device"
    if model.weights.embed.device.type != "cuda":
        return "the model is not on a CUDA device"
    if not isinstance(model.experts, LocalExperts):
        return "the experts are remote: their counts must reach the host every layer"
    if not model.experts.grouped:
        return f"the experts are not grouped, their counts must reach the host every layer: {model.experts.loop_reason}"
    if model.cfg.attention == "dsv4":
        return "DeepSeek-V4's attention attends each sequence on its own (its compressed entries differ per sequence)"
    if model.cfg.hybrid:
        return "its linear-attention layers read and write per-sequence recurrent state, not captured yet"
    for rope in (model.cfg.rope, *model.cfg.layer_ropes):  # Gemma 4: a rope per layer type
        if rope.length_threshold is not None:
            return f"{rope.kind} rope recomputes frequencies from each sequence's length"
    return None


MIN_WIDTH = 32  # the smallest context bucket


def _bucket(n: int, least: int = 1) -> int:
    return max(least, 1 << (n - 1).bit_length())


def bucket_grid(max_seqs: int, max_len: int) -> list[tuple[int, int]]:
    """Every (Bp, Cp) bucket of decode steps with at most max_seqs sequences and max_len context, the
    largest first (the order to capture them in)."""
    seqs = [1 << i for i in range(_bucket(max_seqs).bit_length())]
    widths = [1 << i for i in range(MIN_WIDTH.bit_length() - 1, _bucket(max_len, MIN_WIDTH).bit_length())]
    return sorted(((b, c) for b in seqs for c in widths), key=lambda k: (k[0] * k[1], k), reverse=True)


class DecodeBucket:
    """Static inputs of one (Bp, Cp) bucket, the captured graph and its outputs."""

    def __init__(self, seqs: int, width: int, device: torch.device):
        as_long = lambda *shape: torch.zeros(shape, dtype=torch.long, device=device)  # noqa: E731
        rows = torch.arange(seqs, device=device)
        self.batch = Batch(as_long(seqs), as_long(seqs), as_long(seqs), (), rows,
                           DecodeGroup(rows, as_long(seqs), as_long(seqs, width)))
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: Tensor | None = None  # [Bp, V]
        self.routing: list[Routing] = []  # [Bp, K] per MoE layer

    def load(self, batch: Batch) -> None:
        """Copy a decode-only batch of B ≤ Bp sequences in, padded by repeating its last sequence."""
        d, s = batch.decode, self.batch
        b, width = d.rows.shape[0], s.decode.context_slots.shape[1]
        pick = torch.arange(s.token_ids.shape[0], device=d.rows.device).clamp_(max=b - 1)  # [Bp]
        s.token_ids.copy_(batch.token_ids.index_select(0, pick))
        s.positions.copy_(batch.positions.index_select(0, pick))
        s.slot_mapping.copy_(batch.slot_mapping.index_select(0, pick))
        s.decode.lens.copy_(d.lens.index_select(0, pick))
        slots = F.pad(d.context_slots, (0, width - d.context_slots.shape[1]))  # [B, Cp]
        s.decode.context_slots.copy_(slots.index_select(0, pick))

    def outputs(self, b: int) -> tuple[Tensor, list[Routing]]:
        return self.logits[:b], [Routing(r.layer, r.ids[:b], r.weights[:b]) for r in self.routing]


class DecodeGraphs:
    def __init__(self, model, cache: KVCache, max_seqs: int | None = None):
        """max_seqs: steps with more decoding sequences run eagerly (None: no bound)."""
        reason = unsupported(model)
        if reason is not None:
            raise ValueError(f"decode steps cannot be replayed from CUDA graphs: {reason}")
        self.model, self.cache = model, cache
        self.max_seqs = None if max_seqs is None else _bucket(max_seqs)
        self.graphs: dict[tuple[int, int], DecodeBucket] = {}
        self.stack_version = model.experts.version  # the expert stacks the graphs read: their version,
        self.stacks = model.experts.stacks  # and held, so they outlive a restack until the graphs are dropped
        self.pool = torch.cuda.graph_pool_handle()
        self.replays = 0
        self.failed: str | None = None  # a capture failed (an op this torch cannot capture): eager from then on

    def drop_if_restacked(self) -> bool:
        """Forget every graph when the experts were restacked since they were captured (they would
        replay on freed memory); True when they were."""
        version = self.model.experts.version
        if version == self.stack_version:
            return False
        self.graphs, self.stack_version, self.stacks = {}, version, self.model.experts.stacks
        return True

    def capture_grid(self, grid: list[tuple[int, int]]) -> None:
        """Capture these buckets now, in this order, on a placeholder step: every sequence at position 0
        with slot 0 as its one-token context (the cache is empty at start-up, and slot 0 keeps finite
        values for the masked padding that reads it later)."""
        for key in grid:
            if self.failed or key in self.graphs:
                continue
            try:
                self.graphs[key] = self._capture(key, None)
            except RuntimeError as e:
                self._fail(e)

    def run(self, batch: Batch, rows: Tensor | None = None) -> tuple[Tensor, list[Routing]] | None:
        """The step's logits [B, V] and routing from a graph, or None when the step is not decode-only."""
        d = batch.decode
        if self.failed or rows is not None or d is None or d.rows.shape[0] != len(batch.chunks):
            return None
        b = len(batch.chunks)
        if self.max_seqs is not None and b > self.max_seqs:
            return None
        self.drop_if_restacked()
        key = (_bucket(b), _bucket(max(c.context_len for c in batch.chunks), least=MIN_WIDTH))
        graph = self.graphs.get(key)
        if graph is None:
            try:
                graph = self._capture(key, batch)
            except RuntimeError as e:  # e.g. a kernel that syncs: the step (and all after it) runs eagerly
                self._fail(e)
                return None
            self.graphs[key] = graph
        else:
            graph.load(batch)
        graph.graph.replay()  # after a capture too: it only recorded (the warm-up's K/V are written again, same)
        self.replays += 1
        return graph.outputs(b)

    def _fail(self, e: RuntimeError) -> None:
        self.failed = f"{type(e).__name__}: {e}"[:300]
        log.warning("CUDA graph capture failed, decoding eagerly from now on: %s", self.failed)

    def _capture(self, key: tuple[int, int], batch: Batch | None) -> DecodeBucket:
        """Capture one bucket; its warm-up runs `batch` (None: the start-up placeholder)."""
        graph = DecodeBucket(*key, self.cache.k.device)
        if batch is None:
            graph.batch.decode.lens.fill_(1)
        else:
            graph.load(batch)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (a capture needs one): this step's real forward
            self.model.forward(graph.batch, self.cache)
        torch.cuda.current_stream().wait_stream(side)
        graph.graph, prev = torch.cuda.CUDAGraph(), torch.cuda.current_stream()
        try:
            with torch.cuda.graph(graph.graph, pool=self.pool):
                graph.logits, graph.routing = self.model.forward(graph.batch, self.cache)
        except RuntimeError:  # torch.cuda.graph's __exit__ raises before it leaves its side stream
            torch.cuda.set_stream(prev)
            raise
        return graph
