"""Prompts in, checked token ids out: the validation a request gets before it reaches a batch.

Shared by the engine and the serving ingress (which checks requests without
loading any weights), so both refuse exactly the same things, naming the field.
"""
from __future__ import annotations

from cluster.config import ModelConfig
from cluster.engine.params import InvalidRequest, SamplingParams
from cluster.tokenizer import TextTokenizer


class PromptChecker:
    def __init__(self, cfg: ModelConfig, tokenizer: TextTokenizer | None, max_model_len: int):
        self.cfg, self.tokenizer, self.max_model_len = cfg, tokenizer, max_model_len

    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidRequest("prompt: this checkpoint has no tokenizer.json: send token ids", "prompt")
            return self.tokenizer.encode(prompt)
        return list(prompt)

    def validate(self, prompt_ids: list[int], params: SamplingParams, param: str = "prompt") -> None:
        vocab = self.cfg.vocab_size
        if not prompt_ids:
            raise InvalidRequest(f"{param}: must not be empty", param)
        bad = next((t for t in prompt_ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab),
                   None)
        if bad is not None:
            raise InvalidRequest(f"{param}: token id {bad!r} is outside [0, {vocab})", param)
        if len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise InvalidRequest(
                f"max_tokens: prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds "
                f"the context length ({self.max_model_len})", "max_tokens")
        for name, ids in (("logit_bias", [t for t, _ in params.logit_bias]), ("stop_token_ids", params.stop_token_ids)):
            bad = next((t for t in ids if t >= vocab), None)
            if bad is not None:
                raise InvalidRequest(f"{name}: token id {bad} is outside [0, {vocab})", name)
