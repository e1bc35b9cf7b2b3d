"""Mistral / Mixtral: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]` (v3 tokenizers), or
`[TOOL_CALLS]name[ARGS]{...}` once per call (v11 and later)."""
from __future__ import annotations

import json

from cluster.engine.grammar import GrammarSpec
from deployments.api.tool_parsers.base import ToolCall, arguments_text, call_object

START = "[TOOL_CALLS]"
TOKENS = (START, "[ARGS]")
_DECODER = json.JSONDecoder()


def calls(section: str, schemas: dict) -> list[ToolCall] | None:
    out: list[ToolCall] = []
    for piece in section.split(START)[1:]:
        found = _v11(piece) if "[ARGS]" in piece else _v3(piece)
        if found is None:
            return None
        out.extend(found)
    return out or None


def _decode(text: str):
    """One JSON value at the start of `text` and nothing but whitespace after it, else None."""
    try:
        value, end = _DECODER.raw_decode(text.strip())
    except (ValueError, RecursionError):
        return None
    return value if not text.strip()[end:].strip() else None


def _v3(piece: str) -> list[ToolCall] | None:
    items = _decode(piece)
    if not isinstance(items, list) or not items:
        return None
    out = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) \
                or not isinstance(item.get("arguments", {}), dict):
            return None
        out.append(ToolCall(item["name"], arguments_text(item.get("arguments", {}))))
    return out


def _v11(piece: str) -> list[ToolCall] | None:
    name, _, rest = piece.partition("[ARGS]")
    arguments = _decode(rest)
    if not name.strip() or not isinstance(arguments, dict):
        return None
    return [ToolCall(name.strip(), arguments_text(arguments))]


def forced(schemas: dict[str, dict]) -> GrammarSpec:
    calls = [call_object(name, schema) for name, schema in schemas.items()]
    return GrammarSpec.wrapped(calls[0] if len(calls) == 1 else {"anyOf": calls}, "[TOOL_CALLS][", "]")
