"""What every tool-call parser returns, and the helpers they share.

A parser is a module with `START` (the text where a message's tool calls begin: what comes before it is
content) and `calls(section, schemas) -> list[ToolCall] | None` over the text from `START` on. `None`
means the section is not a complete, well-formed run of calls (e.g. cut off by max_tokens): the whole
message is then returned as content, never a broken call (vLLM does the same).
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


def only_blocks(section: str, spans: list[tuple[int, int]], markers: tuple[str, ...] = ()) -> bool:
    """True when `section` is nothing but the matched call blocks, the format's wrapper markers and
    whitespace: anything else (an unclosed call, text after the calls) makes it incomplete."""
    rest, at = [], 0
    for start, end in spans:
        rest.append(section[at:start])
        at = end
    rest.append(section[at:])
    leftover = "".join(rest)
    for marker in markers:
        leftover = leftover.replace(marker, "")
    return bool(spans) and not leftover.strip()
