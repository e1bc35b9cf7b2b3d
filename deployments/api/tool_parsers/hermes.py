"""Hermes / Qwen2.5 / Qwen3: `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`, one block per call."""
from __future__ import annotations

from deployments.api.markers import blocks
from cluster.engine.grammar import GrammarSpec
from deployments.api.tool_parsers.base import ToolCall, arguments_text, call_object, json_object

START = "<tool_call>"
TOKENS = (START, "</tool_call>")


def calls(section: str, schemas: dict) -> list[ToolCall] | None:
    out = []
    for block in blocks(section, START, "</tool_call>") or ():
        call = json_object(block)
        arguments = None if call is None else call.get("arguments", call.get("parameters", {}))
        if call is None or not isinstance(call.get("name"), str) or not isinstance(arguments, dict):
            return None
        out.append(ToolCall(call["name"], arguments_text(arguments)))
    return out or None


def forced(schemas: dict[str, dict]) -> GrammarSpec:
    calls = [call_object(name, schema) for name, schema in schemas.items()]
    return GrammarSpec.wrapped(calls[0] if len(calls) == 1 else {"anyOf": calls}, "<tool_call>\n", "\n</tool_call>")
