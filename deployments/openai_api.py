"""OpenAI-compatible request/response shapes and their mapping to the engine.

Field names follow the OpenAI API; extensions: `top_k`, `seed`, `return_routing`.
"""
from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from cluster.engine import Completion, InvalidRequest, SamplingParams, StepOutput

MAX_N = 1


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(None, description="new tokens to generate (default 16)")
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = 1
    return_routing: bool = False
    ignore_eos: bool = False

    def sampling_params(self, logprobs: int | None) -> SamplingParams:
        if self.n != MAX_N:
            raise InvalidRequest(f"n: only n=1 is supported (got {self.n})", "n")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(max_tokens=16 if self.max_tokens is None else self.max_tokens,
                              temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, seed=self.seed,
                              stop=stop, logprobs=logprobs, return_routing=self.return_routing,
                              ignore_eos=self.ignore_eos)


class CompletionRequest(SamplingFields):
    prompt: str | list[int]
    logprobs: int | None = None
    echo: bool = False


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool"]
    content: str


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = None

    def sampling_params(self, logprobs: int | None = None) -> SamplingParams:
        return super().sampling_params((self.top_logprobs or 0) if self.logprobs else None)


def error_body(message: str, err_type: str, param: str | None = None, code: int | None = None) -> dict:
    # Keep error bodies small: a 100 KB bad value is never echoed back whole.
    if len(message) > 512:
        message = message[:500] + "...(truncated)"
    return {"error": {"message": message, "type": err_type, "param": param, "code": code}}


def usage(prompt_tokens: int, completion_tokens: int, expert_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens, "expert_tokens": expert_tokens}


def routing_json(routing) -> list[dict[str, Any]]:
    return [{"layer": layer, "expert_ids": list(ids), "weights": [round(w, 6) for w in ws]}
            for layer, ids, ws in routing]


def logprobs_json(sampled_list, decode) -> dict[str, Any]:
    return {"tokens": [decode([s.token_id]) for s in sampled_list],
            "token_ids": [s.token_id for s in sampled_list],
            "token_logprobs": [s.logprob for s in sampled_list],
            "top_logprobs": [{decode([t]): lp for t, lp in s.top_logprobs} for s in sampled_list]}


def completion_json(rid: str, model: str, out: Completion, decode, with_logprobs: bool, chat: bool) -> dict:
    choice: dict[str, Any] = {"index": 0, "finish_reason": out.finish_reason}
    if chat:
        choice["message"] = {"role": "assistant", "content": out.text}
    else:
        choice["text"] = out.text
    choice["logprobs"] = logprobs_json(out.logprobs, decode) if with_logprobs else None
    if out.routing:
        choice["routing"] = [routing_json(r) for r in out.routing]
    choice["token_ids"] = out.token_ids
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice],
            "usage": usage(len(out.prompt_ids), len(out.token_ids), out.expert_tokens)}


def chunk_json(rid: str, model: str, o: StepOutput, decode, with_logprobs: bool, chat: bool) -> dict:
    choice: dict[str, Any] = {"index": 0, "finish_reason": o.finish_reason, "token_ids": [o.token_id]}
    if chat:
        choice["delta"] = {"content": o.text_delta}
    else:
        choice["text"] = o.text_delta
    choice["logprobs"] = logprobs_json([o.sampled], decode) if with_logprobs else None
    if o.routing is not None:
        choice["routing"] = [routing_json(o.routing)]
    body = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice]}
    if o.finish_reason:
        body["usage"] = usage(o.prompt_tokens, o.completion_tokens, o.expert_tokens)
    return body
