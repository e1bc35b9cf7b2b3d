"""Per-request sampling parameters, validated where they are made.

temperature, top_p and top_k left as None mean "the request gives none": the
engine then uses the checkpoint's generation_config.json values (as vLLM does),
or, where it has none, the OpenAI defaults (temperature 1, top_p 1, no top-k).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

MAX_LOGPROBS = 20


class InvalidRequest(ValueError):
    """A request we refuse; `param` names the offending field (the OpenAI error body carries it)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def _check(ok: bool, param: str, message: str) -> None:
    if not ok:
        raise InvalidRequest(f"{param}: {message}", param)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float | None = None  # 0 = greedy; None = the model's default (generation_config), else 1
    top_p: float | None = None  # None = the model's default, else 1.0
    top_k: int | None = None  # 0 = no top-k cut; None = the model's default, else 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None = no logprobs; n = the chosen token's plus the top n
    return_routing: bool = False  # per generated token and MoE layer: the expert ids and weights chosen

    def __post_init__(self) -> None:
        _check(isinstance(self.max_tokens, int) and self.max_tokens >= 1, "max_tokens", "must be an integer ≥ 1")
        _check(self.temperature is None or (math.isfinite(self.temperature) and self.temperature >= 0),
               "temperature", "must be a finite number ≥ 0")
        _check(self.top_p is None or (math.isfinite(self.top_p) and 0 < self.top_p <= 1), "top_p", "must be in (0, 1]")
        _check(self.top_k is None or (isinstance(self.top_k, int) and self.top_k >= 0), "top_k",
               "must be an integer ≥ 0 (0 disables it)")
        _check(self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS, "logprobs",
               f"must be between 0 and {MAX_LOGPROBS}")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", "stop strings must be non-empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    def with_defaults(self, temperature: float | None = None, top_p: float | None = None,
                      top_k: int | None = None) -> "SamplingParams":
        """Fill the fields the request left as None: the given defaults first, then 1.0 / 1.0 / 0."""
        pick = lambda mine, model, last: mine if mine is not None else model if model is not None else last  # noqa
        return replace(self, temperature=pick(self.temperature, temperature, 1.0), top_p=pick(self.top_p, top_p, 1.0),
                       top_k=pick(self.top_k, top_k, 0))
