"""OpenAI response bodies and stream chunks built from the engine's outputs.

Completions' logprobs use the legacy shape (`tokens`, `token_logprobs`,
`top_logprobs`, `text_offset`); chat's use `logprobs.content` (a list of
`{token, logprob, bytes, top_logprobs}`), which is what the openai client reads.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from cluster.engine.sampling import Sampled
from cluster.tokenizer import TextTokenizer
from deployments.api.chat_reply import ChatReply


@dataclass(frozen=True)
class TokenText:
    """How a response names tokens and places them in its text (no tokenizer: token ids only, no text)."""

    tokenizer: TextTokenizer | None = None

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids) if self.tokenizer else ""

    def token_bytes(self, token_id: int) -> bytes:
        """A token's own bytes: a part of a UTF-8 character too (its decoded text is U+FFFD then)."""
        return self.tokenizer.token_bytes(token_id) if self.tokenizer else b""

    def name(self, token_id: int) -> str:
        """A token's text after other text; a special token (which the text skips) written out, as vLLM does."""
        return self.tokenizer.token_text(token_id) if self.tokenizer else ""

    def placer(self) -> "TokenPlacer":
        return TokenPlacer(self.tokenizer.decode_stream(skip_special_tokens=True) if self.tokenizer else None)

    def starts(self, ids: list[int], start: int = 0) -> list[int]:
        """`text_offset` of tokens that make one text (from `start` on)."""
        place = self.placer()
        return [start + place(t) for t in ids]


class TokenPlacer:
    """Where each next token of one text starts in it (`text_offset`), as the text is decoded token by
    token: special tokens add nothing (the text skips them) and a character split over several tokens
    is placed where it starts. Summing each token's own decoded length counted a U+FFFD for every
    part of a split character, and offsets ran past the text."""

    def __init__(self, stream):
        self.stream, self.at = stream, 0

    def __call__(self, token_id: int) -> int:
        at = self.at
        if self.stream is not None:
            self.at += len(self.stream.step(token_id))
        return at


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


def completion_logprobs(scored: list[tuple[int, Sampled | None]], text: TokenText,
                        starts: list[int]) -> dict[str, Any]:
    """Legacy shape from (token id, its Sampled) pairs and where each starts in the text (TokenText.starts);
    an echoed first prompt token has no logprob (None)."""
    return {"tokens": [text.name(t) for t, _ in scored],
            "token_logprobs": [s.logprob if s is not None else None for _, s in scored],
            "top_logprobs": [_top_with_chosen(s, text) if s is not None else None for _, s in scored],
            "text_offset": starts}


def _top_with_chosen(s: Sampled, text: TokenText) -> dict[str, float]:
    """The top alternatives and the chosen token, also where it is not among them (up to logprobs + 1
    entries, as OpenAI's and vLLM's legacy completions give)."""
    top = {text.name(t): lp for t, lp in s.top_logprobs}
    if s.token_id not in {t for t, _ in s.top_logprobs}:
        top.setdefault(text.name(s.token_id), s.logprob)
    return top


def _generated(sampled: list[Sampled]) -> list[tuple[int, Sampled | None]]:
    return [(s.token_id, s) for s in sampled]


def _scored_prompt(c: ChoiceResult) -> list[tuple[int, Sampled | None]]:
    """Echoed prompt tokens (the first has no logprob)."""
    return list(zip(c.prompt_ids, c.prompt_logprobs or [None] * len(c.prompt_ids)))


def _echoed_and_generated(c: ChoiceResult, text: TokenText, echo: bool) -> dict[str, Any]:
    """Echoed prompt tokens first, then the generated ones, each placed in its own part of the text
    (the echoed prompt's text, then the reply's, decoded apart as they are)."""
    generated = _generated(c.logprobs)
    out = completion_logprobs(generated, text, text.starts([t for t, _ in generated],
                                                          len(c.echo_text) if echo else 0))
    if not echo:
        return out
    prompt = completion_logprobs(_scored_prompt(c), text, text.starts(c.prompt_ids))
    return {key: prompt[key] + out[key] for key in prompt}


def chat_logprobs(sampled: list[Sampled], text: TokenText) -> dict[str, Any]:
    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        return {"token": text.name(token_id), "logprob": logprob, "bytes": list(text.token_bytes(token_id))}

    return {"content": [{**entry(s.token_id, s.logprob),
                         "top_logprobs": [entry(t, lp) for t, lp in s.top_logprobs]} for s in sampled]}


def _choice(c: ChoiceResult, text: TokenText, chat: bool, echo: bool, with_logprobs: bool,
            reply: ChatReply) -> dict[str, Any]:
    out: dict[str, Any] = {"index": c.index, "finish_reason": c.finish_reason}
    if chat:
        out["message"], out["finish_reason"] = reply.message(c.text, c.finish_reason, c.token_ids)
        out["logprobs"] = chat_logprobs(c.logprobs, text) if with_logprobs else None
    else:
        out["text"] = (c.echo_text if echo else "") + c.text
        out["logprobs"] = _echoed_and_generated(c, text, echo) if with_logprobs else None
    if c.routing:
        out["routing"] = [routing_json(r) for r in c.routing]
    out["token_ids"] = c.token_ids
    return out


def completion_body(rid: str, model: str, choices: list[ChoiceResult], n: int, text: TokenText, *, chat: bool,
                    echo: bool = False, with_logprobs: bool = False,
                    reply: ChatReply = ChatReply()) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model,
            "choices": [_choice(c, text, chat, echo, with_logprobs, reply) for c in choices],
            "usage": usage(choices, n)}


class ChunkWriter:
    """Stream chunks of one request (all its choices): the first chat chunk of a choice carries the
    role, the first completion chunk the echoed prompt; with include_usage a last chunk has
    `choices: []` and the usage, and the others `usage: null`."""

    def __init__(self, rid: str, model: str, text: TokenText, *, chat: bool, echo: bool, with_logprobs: bool,
                 include_usage: bool, reply: ChatReply = ChatReply()):
        self.rid, self.model, self.text, self.chat = rid, model, text, chat
        self.reply, self.replies = reply, {}  # choice index -> its ReplyStream
        self.echo, self.with_logprobs, self.include_usage = echo, with_logprobs, include_usage
        self.created = int(time.time())
        self.started: set[int] = set()
        # text_offset of each choice's tokens: its echoed prompt's length, and where in the reply's text
        # a token starts (from its tokens, not from the text sent so far: a stop string holds text back)
        self.echoed: dict[int, int] = {}
        self.placers: dict[int, TokenPlacer] = {}

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
            logprobs = completion_logprobs(_scored_prompt(c), self.text, self.text.starts(c.prompt_ids)) \
                if self.with_logprobs else None
            self.echoed[c.index] = len(c.echo_text)
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
        logprobs, start = None, self._start(index, o.token_id)
        if self.with_logprobs and o.sampled is not None and o.sampled.logprob is not None:
            logprobs = chat_logprobs([o.sampled], self.text) if self.chat else \
                completion_logprobs(_generated([o.sampled]), self.text, [start])
        if self.chat:
            choice["delta"] = {"content": text, **({"reasoning_content": reasoning} if reasoning else {})}
        else:
            choice["text"] = text
        choice["logprobs"] = logprobs
        if o.routing is not None:
            choice["routing"] = [routing_json(o.routing)]
        return self._body([choice])

    def _start(self, index: int, token_id: int | None) -> int:
        """Where this token starts in the choice's text (every token placed, whether it has a logprob or not)."""
        if self.chat or not self.with_logprobs or token_id is None:
            return 0
        if index not in self.placers:
            self.placers[index] = self.text.placer()
        return self.echoed.get(index, 0) + self.placers[index](token_id)

    def closing(self, choices: list[ChoiceResult], n: int) -> dict[str, Any] | None:
        if not self.include_usage:
            return None
        return {**self._body([]), "usage": usage(choices, n)}
