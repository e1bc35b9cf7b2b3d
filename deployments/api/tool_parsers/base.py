"""What every tool-call parser returns, and the helpers they share.

A parser is a module with `START` (the text where a message's tool calls begin: what comes before it is
content), `TOKENS` (every marker text the format reads: a tokenizer may hold them as special tokens, which
the parser's view keeps) and `calls(section, schemas) -> list[ToolCall] | None` over the text from `START`
on; most formats are blocks between fixed markers, read with `markers.blocks`. `None` means the section
is not a complete, well-formed run of calls (e.g. cut off by max_tokens): the whole message is then
returned as content, never a broken call (vLLM does the same).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object, as text (OpenAI's `function.arguments`)
    id: str | None = None  # the model's own id where its format carries one (Kimi-K2: functions.name:0)


@dataclass(frozen=True)
class Parsed:
    content: str
    calls: tuple[ToolCall, ...] = ()
    reasoning: str | None = None  # formats that carry it apart (gpt-oss's analysis channel)


def json_object(text: str) -> dict[str, Any] | None:
    """`text` as a JSON object, or None when it is not one."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def arguments_text(arguments: dict[str, Any]) -> str:
    return json.dumps(arguments, ensure_ascii=False)


def typed_value(raw: str, name: str, schema: dict[str, Any] | None) -> Any:
    """A parameter written as bare text (Qwen3-Coder, GLM-4.5): strings stay text, anything else is read as
    JSON, as those templates render it (`value if string else value | tojson`). The tool's schema decides
    where it says the type; without one, text that parses as JSON is taken as JSON."""
    kind = ((schema or {}).get("properties", {}).get(name) or {}).get("type")
    if kind == "string":
        return raw
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        return raw


def json_calls(found: list[tuple[str, str, str | None]]) -> list[ToolCall] | None:
    """Calls from (name, arguments as JSON text, the model's id or None) per call; None when there are
    none or any arguments are not a JSON object."""
    arguments = [json_object(raw) for _, raw, _ in found]
    if not found or any(a is None for a in arguments):
        return None
    return [ToolCall(name.strip(), arguments_text(a), id=call_id)
            for (name, _, call_id), a in zip(found, arguments)]
