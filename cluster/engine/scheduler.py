"""Continuous batching over a paged KV cache.

Each step every running sequence first gets room for its next token (a new
block when its last one is full). When the pool has no free block, the newest
running sequence is preempted: its blocks are freed and it goes back to the
front of the queue, to be recomputed from its tokens later (same output).
Then waiting sequences join while there are blocks for all their tokens, fewer
than max_num_seqs run, and the step's token budget allows.
Chunked prefill: a step's budget (max_num_batched_tokens) goes first to the
decodes (one token each), then to prompts in order, a chunk each; a prompt longer
than what is left is prefilled over several steps, so a long prompt no longer
stalls the running streams for one long step. Without it (or for a prompt that must
run whole: prompt logprobs) a prompt runs whole, in a step with room for it or,
when the decodes leave no such room, in a step with no other prompt.
With prefix caching a joining sequence first takes the cached blocks its tokens
start with and computes only the rest (at least its last token: it needs logits);
after each step the blocks it filled are named for later sequences to take.
Hybrid models (linear-attention layers) also give each running sequence a recurrent-state
slot: a sequence joins only when one is free as well as its blocks, and gives it back with
its blocks (a preempted one rebuilds its state by recomputing its tokens).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from cluster.engine.sequence import Sequence
from cluster.model.block_pool import block_hashes
from cluster.model.kv_cache import KVCache


@dataclass(frozen=True)
class PrefixCaching:
    """extra: what else the cached keys and values depend on (model, cache dtype), in every name.
    max_len: blocks past this many tokens are not cached, and longer prompts take none: RoPE kinds
    whose frequencies depend on the sequence's length (dynamic, longrope) write other keys for the
    same tokens once a sequence is longer than their threshold."""

    extra: bytes = b""
    max_len: int | None = None


@dataclass
class PrefixStats:
    query_tokens: int = 0  # prompt tokens of admitted sequences that looked in the cache
    hit_tokens: int = 0  # of which were taken from it

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.query_tokens if self.query_tokens else 0.0


class Scheduler:
    def __init__(self, cache: KVCache, max_num_seqs: int, max_num_batched_tokens: int,
                 prefix_caching: PrefixCaching | None = None, chunked_prefill: bool = False,
                 max_chunked_len: int | None = None):
        """max_chunked_len: longer sequences are prefilled whole (length-dependent RoPE: their keys
        take the frequencies of the whole prompt's length, which a chunk does not know)."""
        self.cache = cache
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.chunked_prefill, self.max_chunked_len = chunked_prefill, max_chunked_len
        self.prefix_caching = prefix_caching
        self.prefix_stats = PrefixStats()
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

    def _release(self, seq: Sequence) -> None:
        self.cache.release(seq.blocks)
        if self.cache.states is not None:
            self.cache.states.release(seq.state_slot)
        seq.blocks, seq.state_slot = [], None

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.num_computed, seq.num_new = 0, 0
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _reserve(self) -> None:
        """Room for every running sequence's next token, oldest first; the newest make way."""
        for seq in list(self.running):
            while seq in self.running and not self._grow(seq):
                self._preempt(self.running[-1])

    def _chunkable(self, seq: Sequence) -> bool:
        """Prompt logprobs are scored in one step (every prompt row's logits at once)."""
        return (self.chunked_prefill and not seq.wants_prompt_logprobs
                and (self.max_chunked_len is None or seq.num_tokens <= self.max_chunked_len))

    def _plan_running(self) -> int:
        """Each running sequence's tokens this step (num_new): decodes first, then the prompts being
        prefilled in chunks; returns the budget left."""
        budget = self.max_num_batched_tokens
        for seq in self.running:
            seq.num_new = seq.num_tokens - seq.num_computed
            budget -= seq.num_new if seq.num_new == 1 else 0
        for seq in self.running:
            if seq.num_new > 1:
                seq.num_new = min(seq.num_new, max(budget, 0))
                budget -= seq.num_new
        return budget

    def _admit(self, budget: int) -> None:
        # A prompt that must run whole and is longer than what the decodes leave of the budget joins a
        # step with no other prompt in it (the decodes wait for it, as without chunking): were it to wait
        # for a budget the decodes never leave, it would wait until every running stream had ended.
        no_prompt_yet = all(seq.num_tokens - seq.num_computed <= 1 for seq in self.running)  # decodes only
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            hits = self._cached_prefix(seq)
            new = seq.num_tokens - len(hits) * self.cache.block_size
            chunk = min(new, budget) if self._chunkable(seq) else new
            if chunk <= 0 or (chunk > budget and not no_prompt_yet):
                break  # it waits for the next step rather than making this one longer still
            need = self.cache.blocks_for(seq.num_tokens) - len(hits)
            if need > self.cache.num_free_blocks - self.cache.blocks.num_idle(hits):
                break
            states = self.cache.states
            if states is not None and states.num_free == 0:
                break  # every recurrent-state slot is with a running sequence
            self._take_prefix(seq, hits)
            self._grow(seq)
            seq.state_slot = states.allocate() if states is not None else None
            seq.num_new = chunk
            self.running.append(self.waiting.popleft())
            budget, no_prompt_yet = budget - chunk, False

    # -- prefix caching ---------------------------------------------------------------------
    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks seq's tokens start with (none when it must compute its whole prompt: prompt
        logprobs need every prompt row's logits), leaving at least its last token to compute."""
        pc = self.prefix_caching
        if pc is None or seq.wants_prompt_logprobs or (pc.max_len is not None and seq.num_tokens > pc.max_len):
            return []
        self._name_blocks(seq, (seq.num_tokens - 1) // self.cache.block_size)
        return self.cache.blocks.cached(seq.block_names[:(seq.num_tokens - 1) // self.cache.block_size])

    def _take_prefix(self, seq: Sequence, hits: list[int]) -> None:
        self.cache.blocks.take(hits)
        seq.blocks, seq.num_computed = list(hits), len(hits) * self.cache.block_size
        if not seq.output_ids:  # a first admission (or a preemption before any output): the request's figure
            seq.num_cached = seq.num_computed
            self.prefix_stats.query_tokens += len(seq.prompt_ids) if self.prefix_caching else 0
            self.prefix_stats.hit_tokens += seq.num_computed

    def _name_blocks(self, seq: Sequence, n: int) -> None:
        """seq.block_names up to its first n full blocks."""
        have = len(seq.block_names)
        if n > have:
            bs = self.cache.block_size
            parent = seq.block_names[-1] if have else None
            seq.block_names += block_hashes(seq.token_ids[:n * bs], bs, self.prefix_caching.extra, parent, have * bs)

    def computed(self, seq: Sequence, n: int) -> None:
        """seq's next n tokens are now in the cache: the blocks they filled get their names."""
        before, seq.num_computed = seq.num_computed, seq.num_computed + n
        pc = self.prefix_caching
        if pc is None or (pc.max_len is not None and len(seq.prompt_ids) > pc.max_len):
            return
        bs, end = self.cache.block_size, seq.num_computed if pc.max_len is None else min(seq.num_computed, pc.max_len)
        first, full = before // bs, end // bs
        if full > first:
            self._name_blocks(seq, full)
            for i in range(first, full):
                self.cache.blocks.name(seq.blocks[i], seq.block_names[i])

    def schedule(self) -> list[Sequence]:
        """The sequences to run this step."""
        self._reserve()
        self._admit(self._plan_running())
        return [s for s in self.running if s.num_new > 0]

    def finish(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)

    def find(self, request_id: str) -> Sequence | None:
        return next((s for s in [*self.running, *self.waiting] if s.request_id == request_id), None)

    @property
    def free_seq_slots(self) -> int:
        """Sequences that could still join the batch (max_num_seqs, or fewer recurrent-state slots, minus the
        running ones)."""
        states = self.cache.states
        room = self.max_num_seqs if states is None else min(self.max_num_seqs, states.num_slots)
        return room - len(self.running)

    @property
    def num_unfinished(self) -> int:
        return len(self.running) + len(self.waiting)
