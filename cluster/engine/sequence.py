"""A request's life inside the engine."""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from cluster.engine.params import SamplingParams
from cluster.engine.sampling import Sampled


@dataclass(eq=False)  # an entity: the scheduler's `in` / `remove` compare identity, not every field
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[Sampled] = field(default_factory=list)
    prompt_logprobs: list[Sampled | None] = field(default_factory=list)  # when params.prompt_logprobs is set
    text: str = ""
    blocks: list[int] = field(default_factory=list)  # its KV-cache block table
    state_slot: int | None = None  # its recurrent-state slot while it runs (hybrid models)
    num_computed: int = 0  # its first tokens whose keys/values are in the KV cache (0 again after a preemption)
    num_new: int = 0  # tokens to compute this step (the scheduler's choice: a prompt may take several steps)
    num_cached: int = 0  # prompt tokens taken from the prefix cache, not computed (usage's cached_tokens)
    block_names: list = field(default_factory=list)  # prefix-cache names of its full blocks so far
    finish_reason: str | None = None
    error: str | None = None  # why this sequence failed (finish_reason "error"); the others go on
    expert_tokens: int = 0  # (token, expert) pairs this request used, over all MoE layers
    routing: list = field(default_factory=list)  # per generated token, when params.return_routing
    sent_chars: int = 0  # text already handed out as deltas
    matcher: object | None = None  # its xgrammar GrammarMatcher when params.grammar is set (engine-side only)
    in_reasoning: bool = False  # its grammar waits for params.grammar.reasoning_end (kept across preemption)
    generator: torch.Generator = field(init=False)

    def __post_init__(self) -> None:
        seed = self.params.seed if self.params.seed is not None else random.getrandbits(63)
        self.generator = torch.Generator().manual_seed(seed)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.params.prompt_logprobs is not None and not self.prompt_logprobs

    @property
    def constrained(self) -> bool:
        """Its next token is sampled under its grammar (it has one, and no reasoning block is open)."""
        return self.matcher is not None and not self.in_reasoning

    def advance_grammar(self, token: int) -> None:
        """After `token` was appended: the matcher takes it, or, while reasoning, the grammar starts on the
        next token once the output ends with the block's end marker."""
        if self.in_reasoning:
            end = self.params.grammar.reasoning_end
            self.in_reasoning = tuple(self.output_ids[-len(end):]) != end
        elif self.matcher is not None:
            self.matcher.accept_token(token)

    @property
    def is_prefilling(self) -> bool:
        """Some of its prompt (or, after a preemption, its tokens) still to compute before it samples."""
        return self.num_computed < self.num_tokens

    def next_input(self) -> tuple[list[int], int]:
        """This step's num_new tokens and the position of the first one: the tokens not in the cache
        (all of a new or preempted sequence but a cached prefix; recomputing them gives the same
        output), a chunk of them with chunked prefill, else the last sampled one."""
        if self.num_computed == self.num_tokens - 1 and self.output_ids:  # a decode: skip the copy
            return [self.output_ids[-1]], self.num_computed
        return self.token_ids[self.num_computed:self.num_computed + self.num_new], self.num_computed
