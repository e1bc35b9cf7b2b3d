"""A chat reply's text turned into the OpenAI message: `content` and `tool_calls`, whole (non-streaming)
or as deltas (streaming).

    reply = ChatReply(parser="hermes", schemas={"f": {...}})      # per request (None: text only)
    message, finish_reason = reply.message(text, "stop")           # {"role", "content", "tool_calls"}
    stream = reply.stream()                                        # per choice
    reasoning, content = stream.feed(text_delta, token_id)         # what can be sent now
    content, call_deltas, finish_reason = stream.finish("stop")    # the rest, when the choice ends

Streaming sends content until the parser's start marker (holding back text that may be the marker's
beginning), then holds the rest: at the end the calls go out in OpenAI's delta shape (id, type and name
first, arguments after), or, when the calls did not parse (cut off), the held text goes out as content.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from deployments.api import reasoning as thinking
from deployments.api.chat import ChatTemplateError, ChatTemplates
from deployments.api.markers import Holdback
from deployments.api.reasoning import ThinkStream
from deployments.api.reply_view import ReplyView
from deployments.api.tool_parsers import Parsed, ToolCall, detect, marker_tokens, parse, start_marker


@dataclass(frozen=True)
class ChatReply:
    parser: str | None = None  # None: no tool calls are read (no tools, tool_choice none, or no parser)
    schemas: dict[str, dict] = field(default_factory=dict)  # tools' parameter schemas by name
    parallel: bool = True  # parallel_tool_calls: false keeps the first call only
    reasoning: str | None = None  # reasoning.THINK / HARMONY: thinking goes to reasoning_content
    opened: bool = False  # the prompt left a <think> block open: the reply starts inside it
    view: ReplyView | None = None  # where the format's markers are special tokens: read from the token ids

    @property
    def reads_channels(self) -> bool:
        """harmony replies are read whole by its parser, for reasoning even without tools."""
        return self.parser == "openai" or self.reasoning == thinking.HARMONY

    @property
    def markers(self) -> frozenset[str]:
        """Every marker text this reply's parsers read."""
        kept = set(marker_tokens(self.parser)) if self.parser else set()
        if self.reads_channels:
            kept.update(marker_tokens("openai"))
        if self.reasoning == thinking.THINK:
            kept.update((thinking.OPEN, thinking.CLOSE))
        return frozenset(kept)

    def parsed(self, text: str) -> Parsed:
        if self.reads_channels:
            parsed = parse(text, "openai", self.schemas)
            if self.parser is None:
                parsed = Parsed(parsed.content, (), parsed.reasoning)
        elif self.parser is None:
            parsed = Parsed(text)
        else:
            parsed = parse(text, self.parser, self.schemas)
        if self.reasoning != thinking.HARMONY:
            parsed = Parsed(parsed.content, parsed.calls)
        return parsed if self.parallel else Parsed(parsed.content, parsed.calls[:1], parsed.reasoning)

    def message(self, text: str, finish_reason: str | None,
                token_ids: list[int] | None = None) -> tuple[dict[str, Any], str | None]:
        """`text` as the engine decoded it; with a view, the reply is read from `token_ids` instead."""
        if self.view is not None and token_ids is not None:
            text = self.view.text(token_ids, text)
        reasoning = None
        if self.reasoning == thinking.THINK:
            reasoning, text = thinking.split(text, self.opened)
        parsed = self.parsed(text)
        message: dict[str, Any] = {"role": "assistant", "content": self.clean(parsed.content)}
        reasoning = reasoning if reasoning is not None else parsed.reasoning
        if reasoning is not None:
            message["reasoning_content"] = self.clean(reasoning)
        if parsed.calls:
            message["content"] = message["content"] or None
            message["tool_calls"] = [call_json(c) for c in parsed.calls]
            finish_reason = "tool_calls"
        return message, finish_reason

    def clean(self, text: str) -> str:
        """What the user sees: no special tokens (the engine's own text has none)."""
        return self.view.clean(text) if self.view is not None else text

    def stream(self) -> ReplyStream:
        return ReplyStream(self)


def detect_tool_parser(templates: ChatTemplates) -> str | None:
    """The parser a checkpoint's template implies (the tool-use template where it has one)."""
    try:
        return detect(templates.template_for(with_tools=True))
    except ChatTemplateError:
        return None


def detect_reasoning(templates: ChatTemplates) -> str | None:
    try:
        return thinking.detect(templates.template_for())
    except ChatTemplateError:
        return None


def call_json(call: ToolCall) -> dict[str, Any]:
    return {"id": call.id or f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": call.name, "arguments": call.arguments}}


def call_deltas(calls: tuple[ToolCall, ...]) -> list[dict[str, Any]]:
    """Per call: the id, type and name with empty arguments, then the arguments (OpenAI's shape)."""
    out = []
    for i, call in enumerate(calls):
        whole = call_json(call)
        out.append({"index": i, "id": whole["id"], "type": "function", "function": {"name": call.name,
                                                                                    "arguments": ""}})
        out.append({"index": i, "function": {"arguments": call.arguments}})
    return out


class ReplyStream:
    def __init__(self, reply: ChatReply):
        self.reply = reply
        self.content = Holdback(start_marker("openai") if reply.reads_channels else
                                start_marker(reply.parser) if reply.parser else None)
        self.think = ThinkStream(reply.opened) if reply.reasoning == thinking.THINK else None
        self.tokens = reply.view.stream() if reply.view is not None else None

    def feed(self, delta: str, token_id: int | None = None) -> tuple[str, str]:
        """(reasoning delta, content delta) that can be sent now. `delta` is the engine's text; with a
        view the reply is read from `token_id` instead."""
        if self.tokens is not None:
            delta = self.tokens.step(token_id, delta)
        return self._feed(delta)

    def _feed(self, delta: str) -> tuple[str, str]:
        reasoning = ""
        if self.think is not None:
            reasoning, delta = self.think.feed(delta)
        return self.reply.clean(reasoning), self.reply.clean(self.content.feed(delta))

    def finish(self, finish_reason: str | None) -> tuple[str, str, list[dict[str, Any]], str | None]:
        """(reasoning, content, tool-call deltas, finish_reason) for what is left when the reply ends."""
        # the view's last markers (a call section's end), released once the engine's text is all in
        early_reasoning, early_content = self._feed(self.tokens.finish()) if self.tokens is not None else ("", "")
        reasoning, content = self.think.finish() if self.think is not None else ("", "")
        content = self.content.feed(content)
        text, sent = self.content.text, self.content.sent
        parsed = self.reply.parsed(text)
        reasoning = early_reasoning + self.reply.clean(reasoning + (parsed.reasoning or ""))
        rest = parsed.content[sent:] if parsed.content.startswith(text[:sent]) else ""
        content = early_content + self.reply.clean(content + rest)
        if not parsed.calls:
            return reasoning, content, [], finish_reason
        return reasoning, content, call_deltas(parsed.calls), "tool_calls"
