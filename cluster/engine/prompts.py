"""Prompts in, checked token ids out: the validation a request gets before it reaches a batch.

Shared by the engine and the serving ingress (which checks requests without
loading any weights), so both refuse exactly the same things, naming the field.

One check per process on the served path:
- the ingress (deployments/api/serving.py) checks each choice after tokenising, to
  refuse it before the Serve hop; it has no KV cache, so `kv_capacity` is None there;
- the router checks again at admission (`AsyncEngine.validate`, before the request is
  admitted): across the process boundary it is the guard of its batch (an id outside
  the vocabulary would fail every sequence of the step, not one request), and only it
  knows its KV cache's size;
- the engine thread does not check again (`LLMEngine.add_checked`). Offline use
  (`LLMEngine.add_request`, `AsyncEngine.generate`) checks once, where it enters.
"""
from __future__ import annotations

from cluster.config import ModelConfig
from cluster.engine.params import InvalidRequest, SamplingParams
from cluster.tokenizer import TextTokenizer


class PromptChecker:
    """kv_capacity: tokens the engine's KV cache holds (None: unchecked, as at the ingress);
    no_tokenizer_reason: what a text prompt is told when there is no tokenizer.json."""

    def __init__(self, cfg: ModelConfig, tokenizer: TextTokenizer | None, max_model_len: int,
                 kv_capacity: int | None = None, no_tokenizer_reason: str | None = None):
        self.cfg, self.tokenizer, self.max_model_len = cfg, tokenizer, max_model_len
        self.kv_capacity = kv_capacity
        self.no_tokenizer_reason = no_tokenizer_reason or "this checkpoint has no tokenizer.json: send token ids"

    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidRequest(f"prompt: {self.no_tokenizer_reason}", "prompt")
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
        room = self.max_model_len if self.kv_capacity is None else min(self.max_model_len, self.kv_capacity)
        if len(prompt_ids) >= room:  # too long whatever max_tokens is: say so, not "lower max_tokens"
            raise InvalidRequest(f"{param}: {len(prompt_ids)} tokens leave no room for a reply in the "
                                 f"{_room_name(room, self.max_model_len)} ({room} tokens): shorten it", param)
        if len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise InvalidRequest(
                f"max_tokens: prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds "
                f"the context length ({self.max_model_len})", "max_tokens")
        if self.kv_capacity is not None and len(prompt_ids) + params.max_tokens > self.kv_capacity:
            raise InvalidRequest(
                f"max_tokens: prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds "
                f"the KV cache ({self.kv_capacity} tokens)", "max_tokens")
        for name, ids in (("logit_bias", [t for t, _ in params.logit_bias]), ("stop_token_ids", params.stop_token_ids)):
            bad = next((t for t in ids if t >= vocab), None)
            if bad is not None:
                raise InvalidRequest(f"{name}: token id {bad} is outside [0, {vocab})", name)


def _room_name(room: int, max_model_len: int) -> str:
    return "context length" if room == max_model_len else "KV cache"
