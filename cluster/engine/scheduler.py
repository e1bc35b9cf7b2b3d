"""Continuous batching: sequences join between steps as slots free up, and leave when done."""
from __future__ import annotations

from collections import deque

from cluster.engine.sequence import Sequence
from cluster.model.kv_cache import KVCache


class Scheduler:
    def __init__(self, cache: KVCache, max_num_batched_tokens: int):
        self.cache = cache
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> list[Sequence]:
        """The sequences to run this step: all running ones, plus waiting ones that fit."""
        budget = self.max_num_batched_tokens - len(self.running)
        while self.waiting and self.cache.free_slots:
            prompt = len(self.waiting[0].prompt_ids)
            if prompt > budget and (self.running or budget < self.max_num_batched_tokens):
                break  # a long prompt waits for the next step rather than stalling this one
            seq = self.waiting.popleft()
            seq.slot = self.cache.allocate()
            self.running.append(seq)
            budget -= prompt
        return list(self.running)

    def finish(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
            self.cache.release(seq.slot)
            seq.slot = None
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def find(self, request_id: str) -> Sequence | None:
        return next((s for s in [*self.running, *self.waiting] if s.request_id == request_id), None)

    @property
    def num_unfinished(self) -> int:
        return len(self.running) + len(self.waiting)
