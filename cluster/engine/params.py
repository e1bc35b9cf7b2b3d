"""Per-request sampling parameters, validated where they are made.

Every value that passes `SamplingParams` is one the sampler handles: a request
that would overflow it (a seed past 2**64, a temperature of 1e-40, a logit
bias of 1e300) is refused here with a message naming the field, never left to
fail inside the engine next to other requests.

temperature, top_p and top_k left as None mean "the request gives none": the
engine then uses the checkpoint's generation_config.json values (as vLLM does),
or, where it has none, the OpenAI defaults (temperature 1, top_p 1, no top-k).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from cluster.engine.grammar import GrammarSpec

MAX_LOGPROBS = 20
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed accepts
GREEDY_TEMPERATURE = 1e-5  # below this, sampling is greedy (as vLLM): logits / 1e-40 overflow
MAX_LOGIT_BIAS = 100.0  # OpenAI's range for logit_bias values
MAX_PENALTY = 2.0  # OpenAI's range for presence/frequency penalties


class InvalidRequest(ValueError):
    """A request we refuse; `param` names the offending field (the OpenAI error body carries it)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param

    def __reduce__(self):  # crosses process boundaries (Serve handles)
        return InvalidRequest, (str(self), self.param)


def _check(ok: bool, param: str, message: str) -> None:
    if not ok:
        raise InvalidRequest(f"{param}: {message}", param)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16  # 0 only to score a prompt (prompt_logprobs set)
    temperature: float | None = None  # 0 (or below GREEDY_TEMPERATURE) = greedy; None = the model's default, else 1
    top_p: float | None = None  # None = the model's default, else 1.0
    top_k: int | None = None  # 0 = no top-k cut; None = the model's default, else 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0  # EOS and stop ids are not sampled before this many tokens
    logprobs: int | None = None  # None = no logprobs; n = the chosen token's plus the top n
    prompt_logprobs: int | None = None  # logprobs of the prompt's own tokens (echo / scoring), top n
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)
    return_routing: bool = False  # per generated token and MoE layer: the expert ids and weights chosen
    grammar: GrammarSpec | None = None  # constrained decoding (JSON / a JSON schema); compiled by the engine

    def __post_init__(self) -> None:
        scoring = self.prompt_logprobs is not None
        _check(_is_int(self.max_tokens) and self.max_tokens >= (0 if scoring else 1), "max_tokens",
               "must be an integer ≥ 1 (0 only with echo and logprobs, to score a prompt)")
        _check(self.temperature is None or (_finite(self.temperature) and self.temperature >= 0), "temperature",
               "must be a finite number ≥ 0")
        _check(self.top_p is None or (_finite(self.top_p) and 0 < self.top_p <= 1), "top_p", "must be in (0, 1]")
        _check(self.top_k is None or (_is_int(self.top_k) and self.top_k >= 0), "top_k",
               "must be an integer ≥ 0 (0 disables it)")
        _check(self.seed is None or (_is_int(self.seed) and SEED_MIN <= self.seed <= SEED_MAX), "seed",
               f"must be an integer in [{SEED_MIN}, {SEED_MAX}]")
        _check(_is_int(self.min_tokens) and 0 <= self.min_tokens <= max(self.max_tokens, 0), "min_tokens",
               "must be an integer between 0 and max_tokens")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            _check(value is None or (_is_int(value) and 0 <= value <= MAX_LOGPROBS), name,
                   f"must be between 0 and {MAX_LOGPROBS}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(_finite(value) and -MAX_PENALTY <= value <= MAX_PENALTY, name,
                   f"must be between {-MAX_PENALTY:g} and {MAX_PENALTY:g}")
        _check(_finite(self.repetition_penalty) and 0 < self.repetition_penalty <= 10, "repetition_penalty",
               "must be in (0, 10]")
        _check(all(_is_int(t) and t >= 0 and _finite(b) and abs(b) <= MAX_LOGIT_BIAS for t, b in self.logit_bias),
               "logit_bias", f"maps token ids to biases between {-MAX_LOGIT_BIAS:g} and {MAX_LOGIT_BIAS:g}")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", "stop strings must be non-empty strings")
        _check(all(_is_int(t) and t >= 0 for t in self.stop_token_ids), "stop_token_ids",
               "must be non-negative token ids")

    @property
    def greedy(self) -> bool:
        return (self.temperature is not None and self.temperature < GREEDY_TEMPERATURE) or self.top_k == 1

    def with_defaults(self, temperature: float | None = None, top_p: float | None = None,
                      top_k: int | None = None) -> "SamplingParams":
        """Fill the fields the request left as None: the given defaults first, then 1.0 / 1.0 / 0."""
        pick = lambda mine, model, last: mine if mine is not None else model if model is not None else last  # noqa
        return replace(self, temperature=pick(self.temperature, temperature, 1.0), top_p=pick(self.top_p, top_p, 1.0),
                       top_k=pick(self.top_k, top_k, 0))

    @property
    def shapes_logits(self) -> bool:
        """True when the next token depends on more than the raw logits (bias, penalties, min_tokens)."""
        return bool(self.logit_bias or self.presence_penalty or self.frequency_penalty
                    or self.repetition_penalty != 1.0 or self.min_tokens)
