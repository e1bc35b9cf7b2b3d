"""Continuous batching over a paged KV cache.

Each step every running sequence first gets room for its next token (a new
block when its last one is full). When the pool has no free block, the newest
running sequence is preempted: its blocks are freed and it goes back to the
front of the queue, to be recomputed from its tokens later (same output).
Then waiting sequences join while there are blocks for all their tokens, fewer
than max_num_seqs run, and the step's token budget allows.
"""
from __future__ import annotations

from collections import deque

from cluster.engine.sequence import Sequence
from cluster.model.kv_cache import KVCache


class Scheduler:
    def __init__(self, cache: KVCache, max_num_seqs: int, max_num_batched_tokens: int):
        self.cache = cache
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def _grow(self, seq: Sequence) -> bool:
        """Blocks for all of seq's tokens; False (nothing taken) when the pool lacks them."""
        need = self.cache.blocks_for(seq.num_tokens) - len(seq.blocks)
        if need > self.cache.num_free_blocks:
            return False
        if need > 0:
            seq.blocks += self.cache.allocate(need)
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.cache.release(seq.blocks)
        seq.blocks, seq.prefilled = [], False
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _reserve(self) -> None:
        """Room for every running sequence's next token, oldest first; the newest make way."""
        for seq in list(self.running):
            while seq in self.running and not self._grow(seq):
                self._preempt(self.running[-1])

    def _admit(self) -> None:
        budget = self.max_num_batched_tokens - len(self.running)
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.num_tokens > budget and (self.running or budget < self.max_num_batched_tokens):
                break  # a long prompt waits for the next step rather than stalling this one
            if not self._grow(seq):
                break
            self.running.append(self.waiting.popleft())
            budget -= seq.num_tokens

    def schedule(self) -> list[Sequence]:
        """The sequences to run this step."""
        self._reserve()
        self._admit()
        return list(self.running)

    def finish(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.cache.release(seq.blocks)
        seq.blocks = []

    def find(self, request_id: str) -> Sequence | None:
        return next((s for s in [*self.running, *self.waiting] if s.request_id == request_id), None)

    @property
    def free_seq_slots(self) -> int:
        """Sequences that could still join the batch (max_num_seqs minus the running ones)."""
        return self.max_num_seqs - len(self.running)

    @property
    def num_unfinished(self) -> int:
        return len(self.running) + len(self.waiting)
