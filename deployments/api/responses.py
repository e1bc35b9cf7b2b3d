"""OpenAI response bodies and stream chunks built from the engine's outputs.

Completions' logprobs use the legacy shape (`tokens`, `token_logprobs`,
`top_logprobs`, `text_offset`); chat's use `logprobs.content` (a list of
`{token, logprob, bytes, top_logprobs}`), which is what the openai client reads.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from cluster.engine.sampling import Sampled
from deployments.api.chat_reply import ChatReply

Decode = Callable[[list[int]], str]
TokenBytes = Callable[[int], bytes]  # a token's own bytes (TextTokenizer.token_bytes): part of a character too


@dataclass
class ChoiceResult:
    """One choice as it accumulates (or as it ended)."""

    index: int
    prompt_ids: list[int]
    echo_text: str = ""  # the prompt's text when echo is asked for
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    logprobs: list[Sampled] = field(default_factory=list)
    prompt_logprobs: list[Sampled | None] | None = None
    expert_tokens: int = 0
    routing: list = field(default_factory=list)
    cached_tokens: int = 0  # prompt tokens served from the router's prefix cache

    def add(self, o) -> None:
        if o.token_id is not None:
            self.token_ids.append(o.token_id)
        self.text += o.text_delta
        self.finish_reason = o.finish_reason or self.finish_reason
        if o.sampled is not None and o.sampled.logprob is not None:
            self.logprobs.append(o.sampled)
        if o.prompt_logprobs is not None:
            self.prompt_logprobs = list(o.prompt_logprobs)
        if o.routing is not None:
            self.routing.append(o.routing)
        self.expert_tokens = o.expert_tokens
        self.cached_tokens = getattr(o, "cached_tokens", 0)  # an output from an older router has none


def usage(choices: list[ChoiceResult], n: int) -> dict[str, int]:
    prompts = sum(len(c.prompt_ids) for c in choices) // max(n, 1)  # each prompt counted once, as OpenAI does
    completion = sum(len(c.token_ids) for c in choices)
    cached = sum(c.cached_tokens for c in choices) // max(n, 1)
    return {"prompt_tokens": prompts, "completion_tokens": completion, "total_tokens": prompts + completion,
            "prompt_tokens_details": {"cached_tokens": cached}, "expert_tokens": sum(c.expert_tokens for c in choices)}


def routing_json(routing) -> list[dict[str, Any]]:
    return [{"layer": layer, "expert_ids": list(ids), "weights": [round(w, 6) for w in ws]}
            for layer, ids, ws in routing]


def completion_logprobs(scored: list[tuple[int, Sampled | None]], decode: Decode, offset: int = 0,
                       token_bytes: TokenBytes | None = None) -> dict[str, Any]:
    """Legacy shape from (token id, its Sampled) pairs; an echoed first prompt token has no logprob (None).
    `text_offset` counts the characters each token adds to the text, so a special token (named, but
    skipped by the text) adds none."""
    offsets, pos = [], offset
    for t, _ in scored:
        offsets.append(pos)
        pos += len(decode([t]))
    return {"tokens": [token_name(t, decode, token_bytes) for t, _ in scored],
            "token_logprobs": [s.logprob if s is not None else None for _, s in scored],
            "top_logprobs": [_top_with_chosen(s, decode, token_bytes) if s is not None else None
                             for _, s in scored],
            "text_offset": offsets}


def _top_with_chosen(s: Sampled, decode: Decode, token_bytes: TokenBytes | None) -> dict[str, float]:
    """The top alternatives and the chosen token, also where it is not among them (up to logprobs + 1
    entries, as OpenAI's and vLLM's legacy completions give)."""
    top = {token_name(t, decode, token_bytes): lp for t, lp in s.top_logprobs}
    if s.token_id not in {t for t, _ in s.top_logprobs}:
        top.setdefault(token_name(s.token_id, decode, token_bytes), s.logprob)
    return top


def token_name(token_id: int, decode: Decode, token_bytes: TokenBytes | None) -> str:
    """A token's text; a special token (which the text skips) is named as its bytes spell it, as vLLM does."""
    text = decode([token_id])
    if not text and token_bytes is not None:
        text = token_bytes(token_id).decode("utf-8", "replace")
    return text


def _generated(sampled: list[Sampled]) -> list[tuple[int, Sampled | None]]:
    return [(s.token_id, s) for s in sampled]


def _scored(c: ChoiceResult) -> list[tuple[int, Sampled | None]]:
    """Echoed prompt tokens first (the first has no logprob), then the generated ones."""
    prompt = c.prompt_logprobs or [None] * len(c.prompt_ids)
    return list(zip(c.prompt_ids, prompt)) + _generated(c.logprobs)


def chat_logprobs(sampled: list[Sampled], decode: Decode, token_bytes: TokenBytes | None = None) -> dict[str, Any]:
    """token_bytes None: each token's bytes are its decoded text's (a part of a character is U+FFFD then)."""
    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        text = token_name(token_id, decode, token_bytes)
        raw = token_bytes(token_id) if token_bytes is not None else text.encode("utf-8", "replace")
        return {"token": text, "logprob": logprob, "bytes": list(raw)}

    return {"content": [{**entry(s.token_id, s.logprob),
                         "top_logprobs": [entry(t, lp) for t, lp in s.top_logprobs]} for s in sampled]}


def _choice(c: ChoiceResult, decode: Decode, chat: bool, echo: bool, with_logprobs: bool,
            reply: ChatReply, token_bytes: TokenBytes | None) -> dict[str, Any]:
    out: dict[str, Any] = {"index": c.index, "finish_reason": c.finish_reason}
    if chat:
        out["message"], out["finish_reason"] = reply.message(c.text, c.finish_reason, c.token_ids)
        out["logprobs"] = chat_logprobs(c.logprobs, decode, token_bytes) if with_logprobs else None
    else:
        out["text"] = (c.echo_text if echo else "") + c.text
        out["logprobs"] = None
        if with_logprobs:
            out["logprobs"] = completion_logprobs(_scored(c) if echo else _generated(c.logprobs), decode,
                                                  token_bytes=token_bytes)
    if c.routing:
        out["routing"] = [routing_json(r) for r in c.routing]
    out["token_ids"] = c.token_ids
    return out


def completion_body(rid: str, model: str, choices: list[ChoiceResult], n: int, decode: Decode, *, chat: bool,
                    echo: bool = False, with_logprobs: bool = False, reply: ChatReply = ChatReply(),
                    token_bytes: TokenBytes | None = None) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model,
            "choices": [_choice(c, decode, chat, echo, with_logprobs, reply, token_bytes) for c in choices],
            "usage": usage(choices, n)}


class ChunkWriter:
    """Stream chunks of one request (all its choices): the first chat chunk of a choice carries the
    role, the first completion chunk the echoed prompt; with include_usage a last chunk has
    `choices: []` and the usage, and the others `usage: null`."""

    def __init__(self, rid: str, model: str, decode: Decode, *, chat: bool, echo: bool, with_logprobs: bool,
                 include_usage: bool, reply: ChatReply = ChatReply(), token_bytes: TokenBytes | None = None):
        self.rid, self.model, self.decode, self.chat = rid, model, decode, chat
        self.token_bytes = token_bytes
        self.reply, self.replies = reply, {}  # choice index -> its ReplyStream
        self.echo, self.with_logprobs, self.include_usage = echo, with_logprobs, include_usage
        self.created = int(time.time())
        self.started: set[int] = set()
        self.offsets: dict[int, int] = {}  # characters of each choice's text sent so far (text_offset)

    def _body(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        body = {"id": self.rid, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices}
        if self.include_usage:
            body["usage"] = None
        return body

    def opening(self, c: ChoiceResult) -> dict[str, Any] | None:
        self.started.add(c.index)
        if self.chat:
            return self._body([{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                "finish_reason": None}])
        if self.echo:
            logprobs = None
            if self.with_logprobs:
                logprobs = completion_logprobs(_scored(c)[:len(c.prompt_ids)], self.decode,
                                               token_bytes=self.token_bytes)
            self.offsets[c.index] = len(c.echo_text)
            return self._body([{"index": c.index, "text": c.echo_text, "logprobs": logprobs,
                                "finish_reason": None, "token_ids": []}])
        return None

    def chunks(self, index: int, o) -> list[dict[str, Any]]:
        """The chunks one output makes: one, or for a chat choice that ends in tool calls, its last content
        delta, then the calls' deltas, then an empty delta with finish_reason "tool_calls"."""
        if not self.chat:
            return [self.chunk(index, o, o.text_delta, o.finish_reason)]
        stream = self.replies.setdefault(index, self.reply.stream())
        reasoning, content = stream.feed(o.text_delta, o.token_id)
        if not o.finish_reason:
            return [self.chunk(index, o, content, None, reasoning)]
        more_reasoning, rest, calls, finish_reason = stream.finish(o.finish_reason)
        reasoning += more_reasoning
        if not calls:
            return [self.chunk(index, o, content + rest, finish_reason, reasoning)]
        ended = {"index": index, "delta": {}, "logprobs": None, "finish_reason": finish_reason}
        return [self.chunk(index, o, content + rest, None, reasoning), self._body([
            {"index": index, "delta": {"tool_calls": calls}, "logprobs": None, "finish_reason": None}]),
            self._body([ended])]

    def chunk(self, index: int, o, text: str, finish_reason: str | None, reasoning: str = "") -> dict[str, Any]:
        choice: dict[str, Any] = {"index": index, "finish_reason": finish_reason,
                                  "token_ids": [] if o.token_id is None else [o.token_id]}
        logprobs = None
        if self.with_logprobs and o.sampled is not None and o.sampled.logprob is not None:
            logprobs = chat_logprobs([o.sampled], self.decode, self.token_bytes) if self.chat else \
                completion_logprobs(_generated([o.sampled]), self.decode, self.offsets.get(index, 0),
                                    self.token_bytes)
        self.offsets[index] = self.offsets.get(index, 0) + len(o.text_delta)
        if self.chat:
            choice["delta"] = {"content": text, **({"reasoning_content": reasoning} if reasoning else {})}
        else:
            choice["text"] = text
        choice["logprobs"] = logprobs
        if o.routing is not None:
            choice["routing"] = [routing_json(o.routing)]
        return self._body([choice])

    def closing(self, choices: list[ChoiceResult], n: int) -> dict[str, Any] | None:
        if not self.include_usage:
            return None
        return {**self._body([]), "usage": usage(choices, n)}
